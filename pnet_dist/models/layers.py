"""Shared vision layers: channel rounding, stochastic depth, squeeze-excite and the conv factory.

The conv factory is the one seam through which a network varies between static and dynamic
convolution: blocks call `conv_factory(in, out, kernel, stride=..., padding=..., groups=...)` and
never look at what comes back. `StaticConvFactory` returns `nn.Conv2d`, `DynamicConvFactory`
returns `DynamicConv2d`; a benchmark can pass any other callable with the same signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pnet_dist.models.dynamic_conv import DynamicConv2d


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round `value` to the nearest multiple of `divisor`, never dropping more than 10% below it.

    Same rule as timm/TF-Slim (the released ParameterNet rounds every width with divisor 4).
    """
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    """Module form of `drop_path` (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with a hard-sigmoid gate (GhostNet's SE; its convs are always static)."""

    def __init__(self, channels: int, reduced_channels: int, act_layer: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1, bias=True)
        self.act = act_layer()
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.conv_expand(self.act(self.conv_reduce(scale)))
        return x * self.gate(scale)


class ConvFactory(Protocol):
    """What a block calls to get one (possibly dynamic) convolution."""

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = False) -> nn.Module: ...


@dataclass(frozen=True)
class StaticConvFactory:
    """Plain `nn.Conv2d` (GhostNet)."""

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = False) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, bias=bias)


@dataclass(frozen=True)
class DynamicConvFactory:
    """`DynamicConv2d` with `num_experts` kernels (ParameterNet)."""

    num_experts: int = 4
    gate: str = "sigmoid"
    router_layers: int = 1

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = False) -> nn.Module:
        return DynamicConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             groups=groups, bias=bias, num_experts=self.num_experts, gate=self.gate,
                             router_layers=self.router_layers)


def build_conv_factory(dynamic: bool, num_experts: int = 4, gate: str = "sigmoid",
                       router_layers: int = 1) -> ConvFactory:
    """The static or dynamic conv factory; validates the dynamic options up front."""
    if not dynamic:
        return StaticConvFactory()
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if gate not in ("sigmoid", "softmax"):
        raise ValueError(f"gate must be 'sigmoid' or 'softmax', got {gate!r}")
    if router_layers not in (1, 2):
        raise ValueError(f"router_layers must be 1 or 2, got {router_layers}")
    return DynamicConvFactory(num_experts=num_experts, gate=gate, router_layers=router_layers)

