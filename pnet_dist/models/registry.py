"""Model registry: named variants built by `create_model(name, **kwargs)`, timm's calling convention.

Model files register builder functions with `@register_model`; the registry owns the
`device="meta"` path (build without allocating) so every builder stays a plain constructor.

Like timm, a model file may hold a module-level `default_cfgs = {name: {...}}`: the variant's
`pretrained_cfg` (input size, mean/std, crop_pct, interpolation, num_classes, first_conv,
classifier; timm's PretrainedCfg fields), which `create_model` attaches as `model.pretrained_cfg`.
`list_models(filter)` matches names with fnmatch patterns as timm's does. No weights are
published yet, so `pretrained=True` is refused with the way to load trained weights instead.
"""
from __future__ import annotations

import fnmatch
import sys
from typing import Any, Callable

import torch
from torch import nn

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn` under its function name; names must be unique."""
    name = fn.__name__
    assert name not in _MODEL_BUILDERS, f"model {name!r} registered twice"
    _MODEL_BUILDERS[name] = fn
    return fn


def list_models(filter: str | list[str] = "") -> list[str]:
    """Sorted names of the registered models matching any of the fnmatch patterns (all without one)."""
    patterns = [filter] if isinstance(filter, str) else list(filter)
    names = sorted(_MODEL_BUILDERS)
    if not any(patterns):
        return names
    return sorted({name for pattern in patterns for name in fnmatch.filter(names, pattern)})


def get_pretrained_cfg(name: str) -> dict[str, Any] | None:
    """A copy of the `default_cfgs[name]` entry of the model's file, or None (language models)."""
    builder = _builder(name)
    cfg = getattr(sys.modules[builder.__module__], "default_cfgs", {}).get(name)
    return dict(cfg) if cfg is not None else None


def create_model(name: str, pretrained: bool = False, device: str | torch.device | None = None,
                 **kwargs) -> nn.Module:
    """Build the registered model `name`.

    device="meta" builds the full structure without allocating parameter memory (for counting
    and for sharded initialisation); any other device builds on the CPU and moves there.
    """
    builder = _builder(name)
    if pretrained:
        raise ValueError(f"no pretrained weights are published for {name!r}; build it with pretrained=False and "
                         "load a state dict exported from a training run (tools/export_checkpoint.py writes "
                         "model_fp32.pt; train.init_from starts a job from one)")
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            model = builder(**kwargs)
    else:
        model = builder(**kwargs)
        model = model.to(device) if device is not None else model
    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is not None:
        model.pretrained_cfg = pretrained_cfg
    return model


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODEL_BUILDERS[name]
