"""LLaMA decoder and ParameterNet-LLaMA variants: parameter counts, interface, attention, init."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pnet_dist.models import create_model, list_models, moe_stats
from pnet_dist.models.llama import LlamaConfig, apply_rotary, rotary_cos_sin
from pnet_dist.models.moe import switch_loss

pytestmark = pytest.mark.unit

MOE_1B = [f"pnet_llama_1b_{p}_e{e}" for p in ("gate", "up", "down") for e in (4, 8)]


def _num_params(name: str, **kwargs) -> int:
    return sum(p.numel() for p in create_model(name, device="meta", **kwargs).parameters())


def test_parameter_counts_match_the_paper():
    assert round(_num_params("llama_1b") / 1e9, 2) == 0.94
    assert round(_num_params("llama_1b") / 1e9, 3) == 0.936
    for name in MOE_1B:
        count = _num_params(name)
        paper, counted = (1.54, 1.541) if name.endswith("e4") else (2.35, 2.347)
        assert round(count / 1e9, 2) == paper, name
        assert round(count / 1e9, 3) == counted, name


def test_meta_build_allocates_nothing():
    model = create_model("pnet_llama_1b_up_e8", device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_every_variant_is_registered():
    names = set(list_models())
    assert {"llama_1b", "llama_debug", *MOE_1B} <= names
    assert {f"pnet_llama_debug_{p}_e{e}" for p in ("gate", "up", "down") for e in (4, 8)} <= names


@pytest.mark.parametrize("name", ["llama_debug", "pnet_llama_debug_gate_e4", "pnet_llama_debug_up_e8",
                                  "pnet_llama_debug_down_e4"])
def test_forward_returns_logits_and_scaled_aux_loss(name):
    model = create_model(name)
    ids = torch.randint(0, 512, (2, 16))
    logits, aux = model(ids)
    assert logits.shape == (2, 16, 512)
    assert aux.dtype == torch.float32 and aux.shape == ()
    if name == "llama_debug":
        assert aux.item() == 0.0
        assert moe_stats(model) == {}
    else:
        # coefficient 0.01 times a Switch loss that is ~1 for a near-uniform router
        assert 0.005 < aux.item() < 0.05
        stats = moe_stats(model)
        assert len(stats["router_entropy"]) == 2 and len(stats["expert_load"][1]) == int(name[-1])


def test_aux_loss_is_coefficient_times_switch_loss_of_the_layers():
    model = create_model("pnet_llama_debug_up_e4", aux_loss_coef=0.5, aux_loss_mode="per_layer")
    ids = torch.randint(0, 512, (2, 8))
    balances = []
    hooks = [block.ffn.register_forward_hook(lambda m, i, out: balances.extend(out[1]))
             for block in model.layers]
    _, aux = model(ids)
    for hook in hooks:
        hook.remove()
    assert len(balances) == 2
    assert aux.item() == pytest.approx(0.5 * switch_loss(balances, "per_layer").item(), rel=1e-6)


def test_attention_is_causal():
    model = create_model("pnet_llama_debug_up_e4")
    ids = torch.randint(0, 512, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 512
    logits, _ = model(ids)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :8], logits_changed[:, :8])
    assert not torch.allclose(logits[:, 8:], logits_changed[:, 8:])


def _reference_attention(attn, x_BTD, cos_TC, sin_TC):
    B, T, _ = x_BTD.shape
    H, K, C = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = apply_rotary(attn.q_proj(x_BTD).view(B, T, H, C).transpose(1, 2), cos_TC, sin_TC)
    k = apply_rotary(attn.k_proj(x_BTD).view(B, T, K, C).transpose(1, 2), cos_TC, sin_TC)
    v = attn.v_proj(x_BTD).view(B, T, K, C).transpose(1, 2)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-1, -2) / C ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * C))


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_attention_equals_explicit_softmax_reference(num_kv_heads):
    model = create_model("llama_debug", num_kv_heads=num_kv_heads)
    attn = model.layers[0].attn
    x = torch.randn(2, 10, 64)
    cos, sin = rotary_cos_sin(10, 16, 10000.0, "cpu")
    torch.testing.assert_close(attn(x, cos, sin), _reference_attention(attn, x, cos, sin),
                               rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_shrinks_kv_projections():
    dense, gqa = _num_params("llama_debug"), _num_params("llama_debug", num_kv_heads=1)
    assert dense - gqa == 2 * 2 * 64 * (64 - 16)   # k and v of 2 layers: 64 -> 16 outputs


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_cos_sin(20, 8, 10000.0, "cpu")
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        rq = apply_rotary(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1])
        rk = apply_rotary(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1])
        return (rq * rk).sum().item()

    assert score(3, 1) == pytest.approx(score(15, 13), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_meta_to_empty_init_equals_direct_build():
    direct = create_model("pnet_llama_debug_down_e4")
    lazy = create_model("pnet_llama_debug_down_e4", device="meta")
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=0)
    for (name, a), (_, b) in zip(direct.state_dict().items(), lazy.state_dict().items()):
        assert torch.equal(a, b), name
    expert = lazy.layers[0].ffn.down_proj.experts["2"]
    assert expert.bias.abs().sum() == 0 and abs(expert.weight.std().item() - 0.02) < 0.003
    assert torch.equal(lazy.norm.weight, torch.ones(64))
    lazy.init_weights(seed=1)
    assert not torch.equal(lazy.lm_head.weight, direct.lm_head.weight)


def test_moe_model_trains_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("pnet_llama_debug_down_e4")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (4, 32))
    losses = []
    for _ in range(8):
        logits, aux = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("name", ["pnet_llama_debug_gate_e4", "pnet_llama_debug_down_e4"])
def test_bf16_autocast_forward_and_backward(name):
    model = create_model(name, capacity_factor=1.0)
    ids = torch.randint(0, 512, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()) + aux
    assert logits.dtype == torch.bfloat16 and aux.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "router" in n)


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=16, num_kv_heads=3)
    with pytest.raises(ValueError, match="moe_placement"):
        LlamaConfig(moe_placement="attn", num_experts=4)
    with pytest.raises(ValueError, match="num_experts"):
        LlamaConfig(moe_placement="up", num_experts=1)
    with pytest.raises(ValueError, match="aux_loss_mode"):
        LlamaConfig(moe_placement="up", num_experts=4, aux_loss_mode="sum")
    with pytest.raises(ValueError, match="max_seq_len"):
        create_model("llama_debug")(torch.zeros(1, 129, dtype=torch.long))


def test_active_params_count_one_expert_and_no_embedding_table():
    dense = create_model("llama_1b", device="meta")
    moe = create_model("pnet_llama_1b_up_e8", device="meta")
    assert dense.num_active_params() == _num_params("llama_1b") - 32000 * 2048
    # per layer the MoE adds its router (2048 x 8) and the chosen expert's bias (8192)
    assert moe.num_active_params() - dense.num_active_params() == 12 * (2048 * 8 + 8192)
    assert dense.train_flops_per_token(2048) == 6 * dense.num_active_params() + 12 * 12 * 2048 * 2048
