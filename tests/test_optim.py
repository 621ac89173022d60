"""Parameter groups (weight decay, layer-wise lr decay), the warm-up + cosine schedule, weight EMA,
and the guarded AdamW of deepspeed.zero_stage 0 (clip by global norm, skip non-finite steps)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pnet_dist.models import create_model
from pnet_dist.optim import (CosineSchedule, GuardedAdamW, ModelEma, build_lr_scheduler, build_param_groups,
                             layer_ids)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["parameternet_debug", "pnet_llama_debug_up_e4"])
def test_groups_cover_every_parameter_once_and_spare_norms_and_biases(name):
    model = create_model(name)
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.05)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for param in group["params"]:
            no_decay = param.ndim <= 1
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), names[id(param)]
            assert group["lr"] == 1e-3
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert not any(n.endswith(".bias") or "norm" in n.split(".")[-2] for n in decayed)


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    groups = build_param_groups(model, lr=1.0, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == 3


def test_layer_ids_follow_module_order_for_both_families():
    ids, num_ids = layer_ids(create_model("llama_debug"))
    assert ids["embed_tokens.weight"] == 0
    assert ids["layers.0.attn.q_proj.weight"] == 1 and ids["layers.1.ffn_norm.weight"] == 2
    assert ids["norm.weight"] == ids["lm_head.weight"] == num_ids - 1 == 3

    vision = create_model("parameternet_debug")
    ids, num_ids = layer_ids(vision)
    stem = [v for k, v in ids.items() if k.startswith("conv_stem.")]
    head = [v for k, v in ids.items() if k.startswith(("conv_head.", "classifier."))]
    blocks = [v for k, v in ids.items() if k.startswith("blocks.")]
    assert set(stem) == {0} and set(head) == {num_ids - 1}
    assert sorted(set(blocks)) == list(range(1, num_ids - 1))
    # Blocks inside a stage ("blocks.<stage>.<block>.") each get their own id, in order.
    assert ids["blocks.0.0.ghost1.primary_conv.conv.weight"] < ids["blocks.1.0.ghost1.primary_conv.conv.weight"]


def test_layer_decay_scales_lr_from_head_to_stem():
    model = create_model("llama_debug")
    groups = build_param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["lm_head.weight"])] == 1.0
    assert lr_of[id(named["layers.1.attn.q_proj.weight"])] == 0.5
    assert lr_of[id(named["layers.0.attn.q_proj.weight"])] == 0.25
    assert lr_of[id(named["embed_tokens.weight"])] == 0.125


def test_cosine_schedule_warms_up_then_decays_to_min():
    schedule = CosineSchedule(warmup_steps=4, max_steps=20, min_ratio=0.1)
    values = [schedule(s) for s in range(25)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert values[20] == values[24] == pytest.approx(0.1)


def test_lr_scheduler_multiplies_each_groups_lr_and_survives_state_dict():
    model = nn.Linear(3, 3)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}])
    scheduler = build_lr_scheduler(optimizer, lr=1.0, min_lr=0.0, warmup_steps=2, max_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}])
    fresh = build_lr_scheduler(fresh_optimizer, lr=1.0, min_lr=0.0, warmup_steps=2, max_steps=10)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 5
    expected = 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_ema_averages_weights_and_buffers_and_resets():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.5)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, before + 1.0)
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 2.0))
    assert int(ema.module[1].num_batches_tracked) == 7
    assert not any(p.requires_grad for p in ema.module.parameters())
    ema.reset(model)
    assert torch.equal(ema.module[0].weight, model[0].weight)
    other = ModelEma(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module[1].running_mean, model[1].running_mean)


def _two_models_with_grads(grad_scale: float):
    """Two identical small models whose gradients are set to the same values times grad_scale."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    b = copy.deepcopy(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa.grad = torch.randn_like(pa) * grad_scale
        pb.grad = pa.grad.clone()
    return a, b


@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])   # below and above the clipping threshold
def test_guarded_adamw_steps_like_clip_grad_norm_then_adamw(grad_scale):
    ours_model, torch_model = _two_models_with_grads(grad_scale)
    ours = GuardedAdamW(ours_model.parameters(), max_grad_norm=1.0, lr=1e-2, weight_decay=0.05)
    reference = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, weight_decay=0.05)
    expected_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    reference.step()
    ours.step()
    assert not ours.overflow and ours._global_grad_norm == pytest.approx(expected_norm.item(), rel=1e-6)
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert ours.state_dict()["state"].keys() == reference.state_dict()["state"].keys()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guarded_adamw_skips_a_nonfinite_step_leaving_weights_and_state_untouched(bad):
    model, _ = _two_models_with_grads(1.0)
    optimizer = GuardedAdamW(model.parameters(), max_grad_norm=1.0, lr=1e-2)
    optimizer.step()                                   # a normal step first: the state exists
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    next(model.parameters()).grad[0, 0] = bad
    optimizer.step()
    assert optimizer.overflow and not math.isfinite(optimizer._global_grad_norm)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = optimizer.state_dict()
    assert all(torch.equal(after["state"][i][k], state["state"][i][k]) for i in state["state"] for k in state["state"][i])
    for p in model.parameters():                       # the next finite step is applied again
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert not optimizer.overflow and not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
