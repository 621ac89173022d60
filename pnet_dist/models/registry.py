"""Model registry: named variants built by `create_model(name, **kwargs)`.

Model files register builder functions with `@register_model`; the registry owns the
`device="meta"` path (build without allocating) so every builder stays a plain constructor.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn` under its function name; names must be unique."""
    name = fn.__name__
    assert name not in _MODEL_BUILDERS, f"model {name!r} registered twice"
    _MODEL_BUILDERS[name] = fn
    return fn


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_MODEL_BUILDERS)


def create_model(name: str, device: str | torch.device | None = None, **kwargs) -> nn.Module:
    """Build the registered model `name`.

    device="meta" builds the full structure without allocating parameter memory (for counting
    and for sharded initialisation); any other device builds on the CPU and moves there.
    """
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return _MODEL_BUILDERS[name](**kwargs)
    model = _MODEL_BUILDERS[name](**kwargs)
    return model.to(device) if device is not None else model
