"""MoEProjection: routing equals a per-token reference, capacity policy, Switch loss, gradients, stats."""
from __future__ import annotations

import math

import pytest
import torch

from pnet_dist.models.moe import (MoEProjection, RouterBalance, _SortRows, _sorted_position,
                                  _UnsortAndScale, expert_state_dict, load_expert_state_dict, moe_stats,
                                  switch_loss)

pytestmark = pytest.mark.unit


def _layer(d_in=12, d_out=20, num_experts=4, seed=0, **kwargs) -> MoEProjection:
    torch.manual_seed(seed)
    layer = MoEProjection(d_in, d_out, num_experts, **kwargs)
    with torch.no_grad():   # a router sharp enough that every expert gets some tokens
        layer.router.weight.normal_(0, 1.0)
    return layer


def _reference(layer: MoEProjection, x_BTI: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Naive per-token top-1 MoE with first-come capacity (the documented overflow policy)."""
    x_NI = x_BTI.reshape(-1, layer.d_in)
    out = torch.zeros(x_NI.shape[0], layer.d_out)
    used = [0] * layer.num_experts
    for n, token in enumerate(x_NI):
        probs = torch.softmax(token.double() @ layer.router.weight.double().T, dim=-1)
        e = int(probs.argmax())
        used[e] += 1
        if capacity is not None and used[e] > capacity:
            continue
        expert = layer.experts[str(e)]
        out[n] = (probs[e] * (expert.weight.double() @ token.double() + expert.bias.double())).float()
    return out.view(*x_BTI.shape[:2], layer.d_out)


@pytest.mark.parametrize("d_in,d_out", [(12, 20), (20, 12)])
def test_output_equals_per_token_reference(d_in, d_out):
    layer = _layer(d_in, d_out)
    x = torch.randn(3, 7, d_in)
    y, _ = layer(x)
    assert y.shape == (3, 7, d_out)
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-5, atol=1e-5)


def _reference_differentiable(layer: MoEProjection, x_BTI: torch.Tensor, capacity: int | None):
    """Per-token loop built from autograd ops only (no custom Functions): the gradient oracle."""
    x_NI = x_BTI.reshape(-1, layer.d_in)
    probs_NE = torch.softmax(x_NI @ layer.router.weight.T, dim=-1)
    used, rows = [0] * layer.num_experts, []
    for n in range(x_NI.shape[0]):
        e = int(probs_NE[n].argmax())
        used[e] += 1
        if capacity is not None and used[e] > capacity:
            rows.append(x_NI.new_zeros(layer.d_out))
        else:
            rows.append(probs_NE[n, e] * layer.experts[str(e)](x_NI[n]))
    return torch.stack(rows).view(*x_BTI.shape[:2], layer.d_out)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_gradients_equal_per_token_reference(capacity_factor):
    layer = _layer(capacity_factor=capacity_factor)
    x = torch.randn(2, 16, 12, requires_grad=True)
    weight_BTO = torch.randn(2, 16, 20)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * 32 / 4)
    grads = []
    for forward in (lambda: layer(x)[0], lambda: _reference_differentiable(layer, x, capacity)):
        layer.zero_grad()
        x.grad = None
        (forward() * weight_BTO).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_kept", [6, 4])
def test_row_permutation_functions_pass_gradcheck(num_kept):
    order = torch.randperm(6)[:num_kept]
    position = _sorted_position(order, 6)
    x = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    src = torch.randn(num_kept, 3, dtype=torch.double, requires_grad=True)
    gate = torch.rand(num_kept, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _SortRows.apply(t, order, position), (x,))
    assert torch.autograd.gradcheck(lambda s, g: _UnsortAndScale.apply(s, g, order, position), (src, gate))
    y = _UnsortAndScale.apply(src, gate, order, position)
    expected = torch.zeros(6, 3, dtype=torch.double)
    expected[order] = gate.unsqueeze(1) * src
    torch.testing.assert_close(y, expected)


def test_capacity_drops_overflow_tokens_in_order_and_reports_them():
    layer = _layer(capacity_factor=0.5)
    x = torch.randn(2, 16, 12)
    y, _ = layer(x)
    capacity = math.ceil(0.5 * 32 / 4)
    expected = _reference(layer, x, capacity)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    num_dropped = int((expected.abs().sum(-1) == 0).sum())
    assert num_dropped > 0
    assert moe_stats(layer)["dropped_frac"] == [pytest.approx(num_dropped / 32)]


def test_no_token_is_dropped_by_default():
    layer = _layer()
    y, _ = layer(torch.randn(2, 64, 12))
    assert "dropped_frac" not in moe_stats(layer)      # nothing to chart: 0 by construction
    assert bool((y.abs().sum(-1) > 0).all())


def _hand_balance(layer, x_BTI):
    probs = torch.softmax(x_BTI.double() @ layer.router.weight.detach().double().T, dim=-1)   # B,T,E
    choice = probs.argmax(-1)
    return probs, choice


def test_switch_loss_per_layer_and_joint_equal_hand_computation():
    layers = [_layer(seed=1), _layer(seed=2)]
    x = torch.randn(2, 5, 12)
    balances = [layer(x)[1] for layer in layers]
    E = 4
    hand = [_hand_balance(layer, x) for layer in layers]

    per_layer = []
    for probs, choice in hand:
        fraction = [float((choice == e).sum()) / choice.numel() for e in range(E)]
        mean_prob = [float(probs[..., e].mean()) for e in range(E)]
        per_layer.append(E * E * sum(f * p for f, p in zip(fraction, mean_prob)) / E)
    assert switch_loss(balances, "per_layer").item() == pytest.approx(sum(per_layer) / 2, rel=1e-5)

    # Released code: per sequence, tokens of all layers pooled, then mean over (sequence, expert).
    joint = 0.0
    for b in range(2):
        choices = torch.cat([choice[b] for _, choice in hand])
        probs = torch.cat([p[b] for p, _ in hand])
        for e in range(E):
            joint += float((choices == e).float().mean()) * float(probs[:, e].mean())
    joint *= E * E / (2 * E)
    assert switch_loss(balances, "joint").item() == pytest.approx(joint, rel=1e-5)
    assert switch_loss(balances).item() == pytest.approx(joint, rel=1e-5)   # joint is the default


def test_switch_loss_is_one_when_perfectly_balanced():
    balance = RouterBalance(tokens_BE=torch.tensor([[2.0, 2.0]]), prob_sum_BE=torch.tensor([[2.0, 2.0]]),
                            seq_len=4)
    assert switch_loss([balance], "per_layer").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="aux loss mode"):
        switch_loss([balance], "sum")


def test_gradients_reach_router_and_every_expert():
    layer = _layer()
    x = torch.randn(2, 32, 12, requires_grad=True)
    y, balance = layer(x)
    (y.square().mean() + switch_loss([balance])).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for expert in layer.experts.values():
        assert expert.weight.grad is not None and expert.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_aux_loss_alone_trains_the_router():
    layer = _layer()
    _, balance = layer(torch.randn(2, 8, 12))
    switch_loss([balance]).backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_runs_in_fp32_under_bf16_autocast():
    layer = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = layer.router(torch.randn(5, 12))
        y, balance = layer(torch.randn(1, 5, 12))
    assert probs.dtype == torch.float32
    assert balance.prob_sum_BE.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_stats_load_sums_to_one_and_entropy_is_bounded():
    layer = _layer()
    layer(torch.randn(4, 16, 12))
    stats = moe_stats(layer)
    assert set(stats) == {"expert_load", "router_entropy", "max_min_load_ratio"}
    (loads,) = stats["expert_load"]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0)
    assert 0.0 < stats["router_entropy"][0] <= math.log(4) + 1e-6
    assert stats["max_min_load_ratio"] == [pytest.approx(max(loads) / max(min(loads), 1 / 64))]


def test_expert_state_dict_uses_global_names_and_loads_back():
    layer, other = _layer(seed=0), _layer(seed=5)
    state = expert_state_dict(layer)
    assert sorted(state) == sorted(f"experts.{e}.{k}" for e in range(4) for k in ("weight", "bias"))
    load_expert_state_dict(other, state)
    for name, value in expert_state_dict(other).items():
        assert torch.equal(value, state[name])
    with pytest.raises(ValueError, match="experts.3.bias"):
        load_expert_state_dict(other, {k: v for k, v in state.items() if k != "experts.3.bias"})


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_experts"):
        MoEProjection(4, 4, 1)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEProjection(4, 4, 4, capacity_factor=0.0)
