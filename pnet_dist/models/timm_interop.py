"""timm interop: the vision models (those with a pretrained_cfg) in timm's model registry.

After `import pnet_dist.models`, `timm.create_model("parameternet_600m", num_classes=10)` and
`timm.list_models("parameternet*")` work, whichever of the two packages is imported first. timm
has no plugin entry points, so pnet_dist.models must be imported in the process first.

Why a watcher on `import timm` rather than importing timm here: importing timm (it imports every
timm model and torchvision) took as long as importing torch itself on the development machine,
and pnet_dist.models is imported by every training process and tool, which never use timm. So
when timm is already imported the models are registered at once; otherwise `_TimmImportWatcher`
waits on sys.meta_path for the first `import timm`, lets the normal finder load it, and registers
the models right after timm's own module code has run. Nothing is imported or registered when
timm is never imported.

timm calls an entrypoint as fn(pretrained=..., pretrained_cfg=..., pretrained_cfg_overlay=...,
cache_dir=..., **kwargs); `_timm_entrypoint` maps that onto `create_model` and timm's `in_chans`
onto our `in_channels`. timm reads each entrypoint's pretrained cfg from `default_cfgs` of the
entrypoint's module, which is this one.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Callable

from torch import nn

from pnet_dist.models.registry import create_model, get_pretrained_cfg, list_models

# timm's register_model looks here for each entrypoint's pretrained cfg (filled by register_with_timm).
default_cfgs: dict[str, dict[str, Any]] = {}


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
                   cache_dir: Any = None, **kwargs) -> nn.Module:
        if pretrained_cfg is not None:
            raise ValueError(f"{name} has no pretrained tags or weights to select with pretrained_cfg={pretrained_cfg!r}")
        if "in_chans" in kwargs:
            kwargs["in_channels"] = kwargs.pop("in_chans")
        model = create_model(name, pretrained=pretrained, **kwargs)
        model.pretrained_cfg.update(pretrained_cfg_overlay or {})
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    return entrypoint


def register_with_timm() -> None:
    """Register every model that has a pretrained_cfg in timm's registry (timm must be imported)."""
    from timm.models import register_model

    for name in list_models():
        cfg = get_pretrained_cfg(name)
        if cfg is not None:
            default_cfgs[name] = cfg
            register_model(_timm_entrypoint(name))


class _TimmImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first `import timm` it wraps timm's loader to register afterwards."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")   # the regular finders, this watcher now removed
        if spec is None or spec.loader is None:
            return None
        load_timm = spec.loader.exec_module

        def exec_module(module):
            load_timm(module)
            register_with_timm()

        spec.loader.exec_module = exec_module    # this spec's own loader object, used for this import only
        return spec


def register_when_timm_is_imported() -> None:
    """Register now if timm is imported, else at the first `import timm` of this process."""
    if "timm" in sys.modules:
        register_with_timm()
    elif not any(isinstance(finder, _TimmImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportWatcher())
