"""DynamicConv2d against a plain per-sample loop: forward and every gradient, on every path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pnet_dist.models import DynamicConv2d
from pnet_dist.models.dynamic_conv import IMPLS

pytestmark = pytest.mark.unit

# (name, in, out, kernel, stride, padding, dilation, groups, bias, batch, size)
CASES = [
    ("1x1", 8, 12, 1, 1, 0, 1, 1, False, 3, 7),
    ("1x1_strided_bias", 8, 12, 1, 2, 0, 1, 1, True, 2, 9),
    ("1x1_grouped", 8, 12, 1, 1, 0, 1, 4, True, 5, 6),
    ("3x3", 6, 10, 3, 1, 1, 1, 1, False, 3, 8),
    ("3x3_strided", 3, 8, 3, 2, 1, 1, 1, True, 1, 11),
    ("3x3_grouped", 8, 12, 3, 1, 1, 1, 2, False, 3, 7),
    ("3x3_dilated", 6, 6, 3, 1, 2, 2, 1, True, 3, 9),
    ("depthwise3x3", 12, 12, 3, 1, 1, 1, 12, False, 5, 8),
    ("depthwise5x5_strided", 12, 12, 5, 2, 2, 1, 12, False, 3, 9),
    ("depthwise_multiplier", 6, 12, 3, 1, 1, 1, 6, True, 1, 6),
    ("rect_kernel", 4, 6, (1, 3), (2, 1), (0, 1), 1, 1, False, 3, 7),
]


def loop_reference(layer: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """Each sample convolved on its own with its own mixed kernel (the definition)."""
    alpha = layer.routing(x)
    outputs = []
    for b in range(x.shape[0]):
        weight = sum(alpha[b, i] * layer.weight[i] for i in range(layer.num_experts))
        bias = sum(alpha[b, i] * layer.bias[i] for i in range(layer.num_experts)) if layer.bias is not None else None
        outputs.append(F.conv2d(x[b:b + 1], weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outputs)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= 1e-5, f"{what}: relative error {err:.2e}"


def run_forward_backward(layer: DynamicConv2d, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = forward(x)
    # A fixed random cotangent makes every output element matter to every gradient.
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device)
    y.backward(grad_y)
    grads = {"y": y.detach(), "x.grad": x.grad}
    grads.update({f"{name}.grad": p.grad for name, p in layer.named_parameters()})
    return grads


def make_layer(case, impl: str, **kwargs) -> tuple[DynamicConv2d, torch.Tensor]:
    _, cin, cout, k, s, p, d, g, bias, batch, size = case
    torch.manual_seed(0)
    layer = DynamicConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias, impl=impl, **kwargs)
    x = torch.randn(batch, cin, size, size)
    return layer, x


def impls_for(case) -> list[str]:
    _, _, _, k, _, p, *_ = case
    pointwise = k == 1 and p == 0
    return ["auto", *(impl for impl in IMPLS if impl != "bmm" or pointwise)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_loop_reference_every_path(case):
    for impl in impls_for(case):
        layer, x = make_layer(case, impl)
        ours = run_forward_backward(layer, x, layer)
        reference = run_forward_backward(layer, x, lambda inp: loop_reference(layer, inp))
        assert ours.keys() == reference.keys()
        for key in reference:
            assert reference[key] is not None, key
            assert_close_rel(ours[key], reference[key], f"{case[0]} impl={layer.impl} {key}")


@pytest.mark.parametrize("gate,router_layers", [("softmax", 1), ("sigmoid", 2), ("softmax", 2)])
def test_gate_and_router_options_match_loop_reference(gate, router_layers):
    case = CASES[3]
    layer, x = make_layer(case, "auto", gate=gate, router_layers=router_layers, num_experts=3)
    ours = run_forward_backward(layer, x, layer)
    reference = run_forward_backward(layer, x, lambda inp: loop_reference(layer, inp))
    for key in reference:
        assert_close_rel(ours[key], reference[key], f"{gate}/{router_layers} {key}")
    alpha = layer.routing(x)
    assert alpha.shape == (x.shape[0], 3)
    if gate == "softmax":
        torch.testing.assert_close(alpha.sum(1), torch.ones(x.shape[0]))


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[7], CASES[5]], ids=lambda c: c[0])
def test_one_expert_with_unit_gate_is_a_static_conv(case):
    # softmax over a single expert is exactly 1, so the layer must be conv(x, W_0).
    for impl in impls_for(case):
        layer, x = make_layer(case, impl, num_experts=1, gate="softmax")
        torch.testing.assert_close(layer.routing(x), torch.ones(x.shape[0], 1), rtol=0, atol=0)
        bias = layer.bias[0] if layer.bias is not None else None
        expected = F.conv2d(x, layer.weight[0], bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        assert_close_rel(layer(x), expected, f"{case[0]} impl={impl}")


def test_weight_layout_and_routing_shape():
    layer = DynamicConv2d(16, 32, 3, padding=1, groups=4, num_experts=5)
    assert layer.weight.shape == (5, 32, 4, 3, 3)
    assert layer.routing(torch.randn(2, 16, 5, 5)).shape == (2, 5)
    assert layer.bias is None
    assert isinstance(layer.router, torch.nn.Linear) and layer.router.bias is not None


def test_auto_path_per_layer_kind():
    assert DynamicConv2d(8, 16, 1).impl == "bmm"
    assert DynamicConv2d(8, 8, 3, padding=1, groups=8).impl == "grouped"
    assert DynamicConv2d(3, 16, 3, stride=2, padding=1).impl == "unfold"
    assert DynamicConv2d(8, 16, 1, padding=1).impl == "unfold"  # padded 1x1 cannot take bmm


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="divisible by groups"):
        DynamicConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="gate"):
        DynamicConv2d(4, 4, 1, gate="relu")
    with pytest.raises(ValueError, match="router_layers"):
        DynamicConv2d(4, 4, 1, router_layers=3)
    with pytest.raises(ValueError, match="impl"):
        DynamicConv2d(4, 4, 3, impl="bmm")
    with pytest.raises(ValueError, match="expects"):
        DynamicConv2d(4, 4, 1)(torch.randn(2, 5, 3, 3))


def test_meta_build_and_reset_parameters_after_to_empty():
    with torch.device("meta"):
        layer = DynamicConv2d(8, 8, 3, padding=1, groups=8, bias=True)
    assert layer.weight.is_meta
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    layer.router.reset_parameters()
    bound = 1 / 3  # kaiming_uniform(a=sqrt 5) bound = 1/sqrt(fan_in), fan_in = 9
    assert torch.isfinite(layer.weight).all() and layer.weight.abs().max() <= bound + 1e-6
    assert layer.weight.std() > 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_loop_reference_on_cuda(case):
    for impl in impls_for(case):
        layer, x = make_layer(case, impl)
        layer, x = layer.cuda(), x.cuda()
        # TF32 would make both sides differ by ~1e-3; compare true fp32 math.
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                ours = run_forward_backward(layer, x, layer)
                reference = run_forward_backward(layer, x, lambda inp: loop_reference(layer, inp))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved
        for key in reference:
            assert_close_rel(ours[key].cpu(), reference[key].cpu(), f"cuda {case[0]} impl={layer.impl} {key}")
