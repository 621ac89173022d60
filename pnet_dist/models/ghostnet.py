"""GhostNet-V1 / ParameterNet vision models and their registry entries.

One network definition serves both families: every convolution that ParameterNet makes dynamic
is obtained from a conv factory (layers.StaticConvFactory -> GhostNet, layers.DynamicConvFactory
-> ParameterNet); the blocks never branch on the kind of convolution they get. Convolutions the
released code keeps static (stride-2 depthwise, SE, conv_head) and the classifier are plain
modules.

parameternet_600m follows the released definition (huawei-noah/Efficient-AI-Backbones,
parameternet_pytorch/cv/parameternet.py) without its defects: no per-layer debug print, and
`reset_classifier` sizes the new head from the 1280 head features (the released one uses the
1824 pooled channels, which breaks 22K -> 1K finetuning).

The network answers timm's model interface: `pretrained_cfg` (from `default_cfgs` below, attached
by the registry), `forward_features` / `forward_head(pre_logits=)`, `get_classifier` /
`reset_classifier`, `set_grad_checkpointing` (one checkpointed segment per stage, BatchNorm
statistics counted once: see pnet_dist.models.checkpointing) and `no_weight_decay`.

Shapes: B batch, C channels, H/W spatial size, K classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pnet_dist.models.checkpointing import checkpointed
from pnet_dist.models.layers import ConvFactory, DropPath, SqueezeExcite, build_conv_factory, make_divisible
from pnet_dist.models.registry import register_model


@dataclass(frozen=True)
class BlockSpec:
    """One Ghost bottleneck before width scaling."""

    kernel_size: int
    expansion_channels: int
    out_channels: int
    se_ratio: float
    stride: int


def _stages(rows: list[list[tuple[int, int, int, float, int]]]) -> tuple[tuple[BlockSpec, ...], ...]:
    return tuple(tuple(BlockSpec(*row) for row in stage) for stage in rows)


# The released ParameterNet-600M table (k, expansion, out, SE ratio, stride); nine stages, which
# also set the stochastic-depth schedule (one rate per stage, as released).
ARCH_PARAMETERNET_600M = _stages([
    [(3, 16, 16, 0, 1)],
    [(3, 48, 24, 0, 2)],
    [(3, 72, 24, 0, 1)],
    [(5, 72, 40, 0.25, 2)],
    [(3, 120, 40, 0.25, 1), (3, 120, 40, 0.25, 1)],
    [(3, 240, 80, 0, 2)],
    [(3, 200, 80, 0, 1), (3, 200, 80, 0, 1), (3, 200, 80, 0, 1),
     (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1), (3, 672, 112, 0.25, 1)],
    [(5, 672, 160, 0.25, 2)],
    [(3, 960, 160, 0.25, 1), (3, 960, 160, 0.25, 1), (3, 960, 160, 0.25, 1),
     (3, 960, 160, 0.25, 1), (3, 960, 160, 0.25, 1)],
])

# The original GhostNet-V1 table (Han et al. 2020), used for the 300M pair.
ARCH_GHOSTNET_V1 = _stages([
    [(3, 16, 16, 0, 1)],
    [(3, 48, 24, 0, 2)],
    [(3, 72, 24, 0, 1)],
    [(5, 72, 40, 0.25, 2)],
    [(5, 120, 40, 0.25, 1)],
    [(3, 240, 80, 0, 2)],
    [(3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1),
     (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)],
    [(5, 672, 160, 0.25, 2)],
    [(5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)],
])

# CPU-test network: every block kind (identity and projected shortcuts, SE, stride-2 depthwise,
# 5x5) in four stages; 32x32 input ends at 4x4.
ARCH_DEBUG = _stages([
    [(3, 16, 16, 0, 1)],
    [(3, 32, 24, 0.25, 2)],
    [(5, 48, 32, 0.25, 2), (3, 64, 32, 0, 1)],
])

WIDTH_300M = 1.45


class ConvBnAct(nn.Module):
    """conv -> BatchNorm -> activation (activation may be absent)."""

    def __init__(self, conv: nn.Module, out_channels: int, act_layer: type[nn.Module] | None):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x_BCHW)))


class GhostModule(nn.Module):
    """Half the output from a 1x1 conv, the other half from a cheap depthwise conv on it."""

    def __init__(self, in_channels: int, out_channels: int, conv_factory: ConvFactory,
                 act_layer: type[nn.Module] | None, ratio: int = 2, dw_size: int = 3):
        super().__init__()
        self.out_channels = out_channels
        init_channels = math.ceil(out_channels / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = ConvBnAct(conv_factory(in_channels, init_channels, 1), init_channels, act_layer)
        cheap = conv_factory(init_channels, new_channels, dw_size, padding=dw_size // 2, groups=init_channels)
        self.cheap_operation = ConvBnAct(cheap, new_channels, act_layer)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        primary_BCHW = self.primary_conv(x_BCHW)
        cheap_BCHW = self.cheap_operation(primary_BCHW)
        return torch.cat([primary_BCHW, cheap_BCHW], dim=1)[:, :self.out_channels]


class GhostBottleneck(nn.Module):
    """ghost1 -> (stride 2: static depthwise) -> SE -> ghost2, plus identity or projected shortcut."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_size: int, stride: int,
                 se_ratio: float, conv_factory: ConvFactory, act_layer: type[nn.Module], drop_path_rate: float):
        super().__init__()
        self.ghost1 = GhostModule(in_channels, mid_channels, conv_factory, act_layer)
        if stride > 1:
            self.conv_dw = nn.Sequential(
                nn.Conv2d(mid_channels, mid_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                          groups=mid_channels, bias=False),
                nn.BatchNorm2d(mid_channels))
        else:
            self.conv_dw = nn.Identity()
        if se_ratio > 0:
            self.se = SqueezeExcite(mid_channels, make_divisible(mid_channels * se_ratio, 4), act_layer)
        else:
            self.se = nn.Identity()
        self.ghost2 = GhostModule(mid_channels, out_channels, conv_factory, act_layer=None)
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                conv_factory(in_channels, in_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                             groups=in_channels),
                nn.BatchNorm2d(in_channels),
                conv_factory(in_channels, out_channels, 1),
                nn.BatchNorm2d(out_channels))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        y_BCHW = self.ghost2(self.se(self.conv_dw(self.ghost1(x_BCHW))))
        return self.shortcut(x_BCHW) + self.drop_path(y_BCHW)


class GhostNet(nn.Module):
    """GhostNet-V1 body with every factory-built conv static or dynamic.

    stem 3x3/2 -> stages of Ghost bottlenecks -> 1x1 ConvBnAct -> global pool -> conv_head (static,
    bias) -> act -> dropout -> classifier.
    """

    def __init__(self, arch: tuple[tuple[BlockSpec, ...], ...], conv_factory: ConvFactory, width: float = 1.0,
                 num_classes: int = 1000, drop_rate: float = 0.2, drop_path_rate: float = 0.0,
                 act_layer: type[nn.Module] = nn.Hardswish, stem_channels: int = 16, num_features: int = 1280,
                 in_channels: int = 3, input_size: tuple[int, int, int] = (3, 224, 224)):
        super().__init__()
        for name, value, kind in (("num_classes", num_classes, int), ("drop_rate", drop_rate, float),
                                  ("drop_path_rate", drop_path_rate, float)):
            if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
                raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r} "
                                 f"({type(value).__name__})")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.input_size = input_size
        self.grad_checkpointing = False

        stem_out = make_divisible(stem_channels * width, 4)
        self.conv_stem = ConvBnAct(conv_factory(in_channels, stem_out, 3, stride=2, padding=1), stem_out, act_layer)
        prev_channels = stem_out
        stage_drop_path = torch.linspace(0, drop_path_rate, len(arch), device="cpu").tolist()
        stages = []
        for stage, rate in zip(arch, stage_drop_path):
            blocks = []
            for spec in stage:
                out_channels = make_divisible(spec.out_channels * width, 4)
                mid_channels = make_divisible(spec.expansion_channels * width, 4)
                blocks.append(GhostBottleneck(prev_channels, mid_channels, out_channels, spec.kernel_size,
                                              spec.stride, spec.se_ratio, conv_factory, act_layer, rate))
                prev_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        pool_channels = make_divisible(arch[-1][-1].expansion_channels * width, 4)
        stages.append(ConvBnAct(conv_factory(prev_channels, pool_channels, 1), pool_channels, act_layer))
        self.blocks = nn.Sequential(*stages)
        self.pool_channels = pool_channels

        self.num_features = num_features
        self.conv_head = nn.Conv2d(pool_channels, num_features, 1, bias=True)
        self.act2 = act_layer()
        self.classifier = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and BatchNorm buffer in place.

        The engine calls this after `create_model(..., device="meta").to_empty(device=...)`.
        Every leaf resets only its own tensors (PyTorch defaults for conv/linear/BN; per-expert
        default conv init for dynamic convs, as the released code via timm's CondConv2d), in
        construction order, so under one seed the result equals an eagerly built model.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per stage in training (timm's name); eval is never checkpointed."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay beyond timm's rule (1-d parameters and biases): none.

        The released recipe decays every other weight, expert kernels and routers included.
        """
        return set()

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """New head for `num_classes` (0 removes it), sized from the 1280 head features."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        weight = self.conv_head.weight
        self.classifier = (nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
                           if num_classes > 0 else nn.Identity())

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Image -> the final (B, pool_channels, H/32, W/32) feature map."""
        x_BCHW = self.conv_stem(x_BCHW)
        if not (self.grad_checkpointing and self.training):
            return self.blocks(x_BCHW)
        for stage in self.blocks:
            x_BCHW = checkpointed(stage, x_BCHW)
        return x_BCHW

    def forward_head(self, x_BCHW: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits, or (pre_logits=True) the head features the classifier takes."""
        x_BC11 = x_BCHW.mean((2, 3), keepdim=True)
        x_BC = self.act2(self.conv_head(x_BC11)).flatten(1)
        x_BC = F.dropout(x_BC, p=self.drop_rate, training=self.training)
        return x_BC if pre_logits else self.classifier(x_BC)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, K) logits."""
        return self.forward_head(self.forward_features(x_BCHW))


def build_ghostnet(arch: tuple[tuple[BlockSpec, ...], ...], width: float, dynamic: bool, *,
                   num_classes: int = 1000, drop_rate: float = 0.2, drop_path_rate: float = 0.0,
                   num_experts: int = 4, gate: str = "sigmoid", router_layers: int = 1,
                   conv_factory: ConvFactory | None = None, **network_kwargs) -> GhostNet:
    """A GhostNet body with static (dynamic=False) or dynamic convs, or with `conv_factory` given."""
    if conv_factory is None:
        conv_factory = build_conv_factory(dynamic, num_experts=num_experts, gate=gate, router_layers=router_layers)
    return GhostNet(arch, conv_factory, width=width, num_classes=num_classes, drop_rate=drop_rate,
                    drop_path_rate=drop_path_rate, **network_kwargs)


def _cfg(**overrides) -> dict:
    """timm PretrainedCfg fields of a variant: the input our eval transform makes (pnet_dist.data.augment:
    resize the short side to size / crop_pct, bilinear and antialiased, centre crop, ImageNet mean/std)."""
    return {"input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875, "crop_mode": "center",
            "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "num_classes": 1000, "first_conv": "conv_stem.conv", "classifier": "classifier",
            "paper_name": "ParameterNet: Parameters Are All You Need", "paper_ids": "arXiv:2306.14525",
            "origin_url": "https://github.com/huawei-noah/Efficient-AI-Backbones", **overrides}


_DEBUG_CFG = {"input_size": (3, 32, 32), "pool_size": (4, 4), "num_classes": 10}
default_cfgs = {
    "parameternet_600m": _cfg(), "ghostnet_600m": _cfg(), "parameternet_300m": _cfg(), "ghostnet_300m": _cfg(),
    "parameternet_debug": _cfg(**_DEBUG_CFG), "ghostnet_debug": _cfg(**_DEBUG_CFG),
}


_DYNAMIC_ONLY_KWARGS = ("num_experts", "gate", "router_layers")


def _static(name: str, kwargs: dict) -> dict:
    given = [key for key in _DYNAMIC_ONLY_KWARGS if key in kwargs]
    if given:
        raise ValueError(f"{name} has static convolutions; {', '.join(given)} only apply to parameternet_* models")
    return kwargs


@register_model
def parameternet_600m(**kwargs) -> GhostNet:
    """ParameterNet-600M: released definition, width 1.9, Hardswish, 4 experts, 34.5M params, ~0.59 GMACs."""
    return build_ghostnet(ARCH_PARAMETERNET_600M, 1.9, dynamic=True, **kwargs)


@register_model
def ghostnet_600m(**kwargs) -> GhostNet:
    """GhostNet-600M: parameternet_600m with static convolutions (19.8M params, 570M MACs)."""
    return build_ghostnet(ARCH_PARAMETERNET_600M, 1.9, dynamic=False, **_static("ghostnet_600m", kwargs))


@register_model
def parameternet_300m(**kwargs) -> GhostNet:
    """ParameterNet-300M: the original GhostNet-V1 table at width 1.45, Hardswish, 4 experts.

    Not released. Width 1.45 (chosen) reproduces the paper's 300M ablation when counted with
    pnet_dist.models.counting at 224x224: M=1 -> 8.65M params (paper 8.6M), M=8 -> 25.18M (paper
    25.2M) and +18.9M MACs over static (paper +19M). M=4: 15.74M params, 292M MACs; the static
    twin: 8.63M params, 283M MACs (paper: ~300M / ~290M FLOPs).
    """
    return build_ghostnet(ARCH_GHOSTNET_V1, WIDTH_300M, dynamic=True, **kwargs)


@register_model
def ghostnet_300m(**kwargs) -> GhostNet:
    """GhostNet-300M: parameternet_300m (GhostNet-V1 table, width 1.45) with static convolutions."""
    return build_ghostnet(ARCH_GHOSTNET_V1, WIDTH_300M, dynamic=False, **_static("ghostnet_300m", kwargs))


_DEBUG_NETWORK = dict(stem_channels=16, num_features=128, input_size=(3, 32, 32))


@register_model
def parameternet_debug(**kwargs) -> GhostNet:
    """Tiny ParameterNet for CPU tests: 4 blocks, width 0.5, 128 head features, 32x32 input, 10 classes."""
    kwargs.setdefault("num_classes", 10)
    return build_ghostnet(ARCH_DEBUG, 0.5, dynamic=True, **_DEBUG_NETWORK, **kwargs)


@register_model
def ghostnet_debug(**kwargs) -> GhostNet:
    """parameternet_debug with static convolutions."""
    kwargs.setdefault("num_classes", 10)
    return build_ghostnet(ARCH_DEBUG, 0.5, dynamic=False, **_DEBUG_NETWORK, **_static("ghostnet_debug", kwargs))
