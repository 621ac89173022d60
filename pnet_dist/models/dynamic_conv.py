"""Dynamic convolution (ParameterNet): y = conv(x, sum_i alpha_i(x) W_i) with per-sample kernels.

Owns `DynamicConv2d` and its execution paths. The router is global average pooling -> Linear
(one layer with bias as in the released code, or a 2-layer MLP) -> gate (sigmoid as released,
or softmax). The M expert kernels are mixed into one kernel per sample with a single matmul
(B x M) @ (M x P); the convolution with those B kernels then runs on one of four paths:

  "bmm"      1x1 convs (padding 0): y_b = W_b @ x_b as one batched matmul (strided input sliced).
  "grouped"  the released code's formulation: fold the batch into channels, one conv with B*G
             groups. For depthwise kernels this is just a depthwise conv over B*C channels.
  "unfold"   im2col + batched matmul (dense kxk kernels).
  "experts"  convolve with all M kernels stacked as M*O output channels, then mix the outputs:
             M times the conv work but a plain batched conv (no per-sample kernels).

`impl="auto"` picks per layer kind; the choice was made by measurement (fwd+bwd summed over
the dynamic convs of parameternet_600m at 224x224, batch 32, 2 shared CPU cores, paths timed
round-robin; `tools/bench_dynamic_conv.py` reprints the table):
  1x1           -> "bmm"      1.5x faster than the B-group conv; unfold and experts slower still
  depthwise kxk -> "grouped"  a depthwise conv over B*C channels; unfold 2.5x, experts 6x slower
  dense kxk     -> "unfold"   (the 3-channel stem) 2.3x faster than the B-group conv (B tiny convs)
On CUDA the same table is used (bmm and a B*C-channel depthwise conv are the natural GPU
kernels); `--device cuda` of the benchmark times every path there too. Any path can be forced
with `impl=`; all paths compute the same function (tests/test_dynamic_conv.py).

Shapes: B batch, C input channels, O output channels, G groups, M experts, H/W input size,
Ho/Wo output size, N = Ho*Wo, K = C/G*kH*kW (one output channel's kernel), P = O*K.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("bmm", "grouped", "unfold", "experts")
GATES = ("sigmoid", "softmax")


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return pair


def layer_kind(in_channels: int, out_channels: int, kernel_size: tuple[int, int], groups: int) -> str:
    """'pointwise' (1x1), 'depthwise' (one input channel per group) or 'dense' (kxk, grouped or not)."""
    if kernel_size == (1, 1):
        return "pointwise"
    if groups == in_channels:
        return "depthwise"
    return "dense"


_AUTO_IMPL = {"pointwise": "bmm", "depthwise": "grouped", "dense": "unfold"}


class DynamicConv2d(nn.Module):
    """Conv2d whose kernel is a per-sample mixture of `num_experts` expert kernels.

    weight: (num_experts, out_channels, in_channels // groups, kH, kW); bias (optional):
    (num_experts, out_channels), mixed with the same coefficients. `routing(x)` returns the
    mixing coefficients alpha of shape (B, num_experts).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False,
                 num_experts: int = 4, gate: str = "sigmoid", router_layers: int = 1,
                 impl: str = "auto"):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if router_layers not in (1, 2):
            raise ValueError(f"router_layers must be 1 or 2, got {router_layers}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.num_experts = num_experts
        self.gate = gate
        self.kind = layer_kind(in_channels, out_channels, self.kernel_size, groups)
        if impl == "auto":
            impl = _AUTO_IMPL[self.kind]
            if impl == "bmm" and self.padding != (0, 0):
                impl = "unfold"
        if impl not in IMPLS:
            raise ValueError(f"impl must be 'auto' or one of {IMPLS}, got {impl!r}")
        if impl == "bmm" and (self.kernel_size != (1, 1) or self.padding != (0, 0)):
            raise ValueError("impl='bmm' needs a 1x1 kernel with padding 0")
        self.impl = impl

        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        # Kernels first, router second: the same RNG order as a later `init_weights()` walk over
        # modules, so a meta-built model materialised with a seed equals one built eagerly.
        self.reset_parameters()
        if router_layers == 1:
            self.router = nn.Linear(in_channels, num_experts)
        else:
            # Paper text names a two-layer MLP without a width; a quarter of the input (as an SE
            # reduction) keeps routing cost negligible.
            hidden = max(in_channels // 4, num_experts)
            self.router = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def reset_parameters(self) -> None:
        """Each expert gets PyTorch's default conv init (as timm's CondConv2d in the released code).

        Resets only this module's own `weight`/`bias`; the router's Linear layers reset themselves.
        """
        for expert_weight in self.weight:
            nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0, 0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def routing(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Mixing coefficients alpha (B, M) from the globally pooled input."""
        logits_BM = self.router(x_BCHW.mean((2, 3)))
        if self.gate == "sigmoid":
            return torch.sigmoid(logits_BM)
        return torch.softmax(logits_BM, dim=1)

    def mix(self, alpha_BM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels (B, O, C/G, kH, kW) and biases (B, O) from one matmul each."""
        weight_BP = alpha_BM @ self.weight.flatten(1)
        weight_BOCkk = weight_BP.view(alpha_BM.shape[0], *self.weight.shape[1:])
        bias_BO = alpha_BM @ self.bias if self.bias is not None else None
        return weight_BOCkk, bias_BO

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != self.in_channels:
            raise ValueError(f"DynamicConv2d expects (B, {self.in_channels}, H, W), got {tuple(x_BCHW.shape)}")
        alpha_BM = self.routing(x_BCHW)
        if self.impl == "experts":
            return self._forward_experts(x_BCHW, alpha_BM)
        weight_BOCkk, bias_BO = self.mix(alpha_BM)
        if self.impl == "bmm":
            return self._forward_bmm(x_BCHW, weight_BOCkk, bias_BO)
        if self.impl == "grouped":
            return self._forward_grouped(x_BCHW, weight_BOCkk, bias_BO)
        return self._forward_unfold(x_BCHW, weight_BOCkk, bias_BO)

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        sizes = []
        for size, k, s, p, d in zip((height, width), self.kernel_size, self.stride, self.padding, self.dilation):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def _batched_matmul(self, weight_BOK: torch.Tensor, cols_BKN: torch.Tensor, bias_BO: torch.Tensor | None,
                        out_hw: tuple[int, int]) -> torch.Tensor:
        """Per-sample (and per-group) matmul; groups fold into the batch dimension of bmm."""
        batch, num_groups = cols_BKN.shape[0], self.groups
        num_out = self.out_channels // num_groups
        weight_XOK = weight_BOK.reshape(batch * num_groups, num_out, -1)
        cols_XKN = cols_BKN.reshape(batch * num_groups, weight_XOK.shape[2], -1)
        if bias_BO is None:
            y_XON = torch.bmm(weight_XOK, cols_XKN)
        else:
            bias_XO1 = bias_BO.reshape(batch * num_groups, num_out, 1)
            y_XON = torch.baddbmm(bias_XO1, weight_XOK, cols_XKN)
        return y_XON.view(batch, self.out_channels, *out_hw)

    def _forward_bmm(self, x_BCHW, weight_BOCkk, bias_BO):
        if self.stride != (1, 1):
            x_BCHW = x_BCHW[:, :, ::self.stride[0], ::self.stride[1]]
        out_hw = x_BCHW.shape[2:]
        cols_BCN = x_BCHW.reshape(x_BCHW.shape[0], self.in_channels, -1)
        return self._batched_matmul(weight_BOCkk.flatten(2), cols_BCN, bias_BO, out_hw)

    def _forward_unfold(self, x_BCHW, weight_BOCkk, bias_BO):
        out_hw = self._output_size(*x_BCHW.shape[2:])
        # unfold orders rows channel-major (C, kH, kW), so each group's rows are contiguous.
        cols_BKN = F.unfold(x_BCHW, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return self._batched_matmul(weight_BOCkk.flatten(2), cols_BKN, bias_BO, out_hw)

    def _forward_grouped(self, x_BCHW, weight_BOCkk, bias_BO):
        batch = x_BCHW.shape[0]
        x_1XHW = x_BCHW.reshape(1, batch * self.in_channels, *x_BCHW.shape[2:])
        weight_XCkk = weight_BOCkk.reshape(batch * self.out_channels, *weight_BOCkk.shape[2:])
        bias_X = bias_BO.reshape(-1) if bias_BO is not None else None
        y_1XHW = F.conv2d(x_1XHW, weight_XCkk, bias_X, self.stride, self.padding, self.dilation,
                          groups=batch * self.groups)
        return y_1XHW.view(batch, self.out_channels, *y_1XHW.shape[2:])

    def _forward_experts(self, x_BCHW, alpha_BM):
        num_groups, num_experts = self.groups, self.num_experts
        num_out = self.out_channels // num_groups
        # Order output channels (G, M, O/G) so each conv group emits all experts of its channels.
        weight = self.weight.view(num_experts, num_groups, num_out, *self.weight.shape[2:])
        weight = weight.transpose(0, 1).reshape(num_groups * num_experts * num_out, *self.weight.shape[2:])
        y_all = F.conv2d(x_BCHW, weight, None, self.stride, self.padding, self.dilation, groups=num_groups)
        batch, _, out_h, out_w = y_all.shape
        y_BGMON = y_all.view(batch, num_groups, num_experts, num_out, out_h * out_w)
        y_BGON = torch.einsum("bgmon,bm->bgon", y_BGMON, alpha_BM)
        y_BOHW = y_BGON.reshape(batch, self.out_channels, out_h, out_w)
        if self.bias is not None:
            y_BOHW = y_BOHW + (alpha_BM @ self.bias)[:, :, None, None]
        return y_BOHW

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, num_experts={self.num_experts}, gate={self.gate}, impl={self.impl}")
