"""LLaMA decoder and its ParameterNet variants (paper Table 7), pure torch.

Owns `LlamaConfig`, `LlamaForCausalLM` and the registered variants:
    llama_1b                       hidden 2048, 12 layers, 16 heads, SwiGLU 8192, vocab 32000,
                                   context 2048, RMSNorm eps 1e-6, untied embeddings (0.936B)
    pnet_llama_1b_{gate,up,down}_e{4,8}   one FFN projection is a top-1 MoE (1.541B / 2.347B)
    llama_debug, pnet_llama_debug_{gate,up,down}_e{4,8}   vocab 512, hidden 64, 2 layers (CPU tests)
Every builder accepts LlamaConfig field overrides, e.g. create_model("llama_1b", num_kv_heads=4)
for grouped-query attention or aux_loss_mode="per_layer". `model.set_grad_checkpointing()` (timm's
name, as the vision models) checkpoints each decoder block in training.

Interface the training engine relies on:
    model(input_ids_BT) -> (logits_BTV, aux_loss)
aux_loss is a scalar fp32 tensor already multiplied by config.aux_loss_coef (0.01 by default; a
zero tensor for dense models); cross-entropy is the caller's. `model.init_weights(seed)` fills
every parameter (normal(0, 0.02) for Linear/Embedding weights as in the released code, zero
biases, unit norms) from a generator seeded by (seed, parameter name), so a model built on the
meta device, moved with to_empty() and initialised gets the same weights at any expert-parallel
layout (expert names carry the global expert index).

For throughput logging: `model.num_active_params()` (what one token's matmuls use: no embedding
table, one expert per MoE layer, independent of ep_size) and `model.train_flops_per_token(seq_len)`
= 6 * active params + 12 * layers * dim * seq_len (PaLM's attention term).

Blocks never branch on the FFN type: `build_ffn` is the one seam that picks dense or MoE per
projection; every projection returns (y, RouterBalance | None).

Rotary embeddings follow the HF LLaMA convention the released code uses (rotate_half, cos/sin of
cat(freqs, freqs)); cos/sin are computed per forward from positions (no buffers, so nothing to
rebuild after meta -> to_empty). Attention is torch's scaled_dot_product_attention (causal,
enable_gqa when num_kv_heads < num_heads).

Shape legend: B batch, T sequence, D hidden, H heads, K kv heads, C head dim, F FFN hidden,
V vocab, E experts.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from pnet_dist.models.checkpointing import checkpointed
from pnet_dist.models.moe import AUX_LOSS_MODES, MoEProjection, RouterBalance, moe_layers, switch_loss
from pnet_dist.models.registry import register_model

MOE_PLACEMENTS = ("gate", "up", "down")


# LlamaConfig field annotations -> accepted Python types (an int is also a float; a bool is neither).
_FIELD_TYPES = {"int": int, "int | None": int, "float": (int, float), "float | None": (int, float), "bool": bool}


def _has_type(value, annotation: str) -> bool:
    if value is None:
        return annotation.endswith("| None")
    if isinstance(value, bool):
        return annotation == "bool"
    kinds = _FIELD_TYPES.get(annotation)
    return kinds is None or isinstance(value, kinds)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 2048
    num_layers: int = 12
    num_heads: int = 16
    num_kv_heads: int | None = None        # None: multi-head attention (= num_heads)
    ffn_dim: int = 8192
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    moe_placement: str | None = None       # None (dense) | "gate" | "up" | "down"
    num_experts: int = 1
    expert_bias: bool = True               # released code: nn.Linear default bias
    capacity_factor: float | None = None   # None: no token dropped
    aux_loss_coef: float = 0.01
    aux_loss_mode: str = "joint"           # "joint" (released code) | "per_layer"

    def __post_init__(self):
        for item in fields(self):   # a "10" from a config file must not reach the arithmetic below
            if not _has_type(getattr(self, item.name), item.type):
                value = getattr(self, item.name)
                raise ValueError(f"{item.name} must be {item.type}, got {value!r} ({type(value).__name__})")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into num_heads={self.num_heads} heads of "
                             "even size (rotary embeddings rotate pairs)")
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={kv_heads}")
        if self.moe_placement not in (None, *MOE_PLACEMENTS):
            raise ValueError(f"moe_placement must be None or one of {MOE_PLACEMENTS}, "
                             f"got {self.moe_placement!r}")
        if (self.moe_placement is None) != (self.num_experts == 1):
            raise ValueError(f"moe_placement={self.moe_placement!r} with num_experts={self.num_experts}: "
                             "a dense model has num_experts=1, an MoE model a placement and >= 2 experts")
        if self.aux_loss_mode not in AUX_LOSS_MODES:
            raise ValueError(f"aux_loss_mode must be one of {AUX_LOSS_MODES}, got {self.aux_loss_mode!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (HF LLaMA order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x_BTD.float(), (x_BTD.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x_BTD.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, C] (fp32) for positions 0..T-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs_TC = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    freqs_TC = torch.cat([freqs_TC, freqs_TC], dim=-1)
    return freqs_TC.cos(), freqs_TC.sin()


def apply_rotary(x_BHTC: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTC.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTC * cos_TC.to(x_BHTC.dtype) + rotated * sin_TC.to(x_BHTC.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTC = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BKTC = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTC = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTC, k_BKTC = apply_rotary(q_BHTC, cos_TC, sin_TC), apply_rotary(k_BKTC, cos_TC, sin_TC)
        out_BHTC = F.scaled_dot_product_attention(q_BHTC, k_BKTC, v_BKTC, is_causal=True,
                                                  enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out_BHTC.transpose(1, 2).reshape(B, T, -1))


class Projection(nn.Linear):
    """Dense bias-free projection with the MoE calling convention: returns (y, None)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class SwiGLUFFN(nn.Module):
    """down(silu(gate(x)) * up(x)); any projection may be an MoEProjection."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, list[RouterBalance]]:
        gate_BTF, gate_balance = self.gate_proj(x_BTD)
        up_BTF, up_balance = self.up_proj(x_BTD)
        y_BTD, down_balance = self.down_proj(F.silu(gate_BTF) * up_BTF)
        return y_BTD, [b for b in (gate_balance, up_balance, down_balance) if b is not None]


def build_ffn(cfg: LlamaConfig) -> SwiGLUFFN:
    """The one seam choosing dense or MoE per projection (cfg.moe_placement)."""
    shapes = {"gate": (cfg.dim, cfg.ffn_dim), "up": (cfg.dim, cfg.ffn_dim), "down": (cfg.ffn_dim, cfg.dim)}

    def projection(name: str) -> nn.Module:
        d_in, d_out = shapes[name]
        if name == cfg.moe_placement:
            return MoEProjection(d_in, d_out, cfg.num_experts, expert_bias=cfg.expert_bias,
                                 capacity_factor=cfg.capacity_factor)
        return Projection(d_in, d_out)

    return SwiGLUFFN(projection("gate"), projection("up"), projection("down"))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(cfg)

    def forward(self, x_BTD: torch.Tensor, cos_TC: torch.Tensor,
                sin_TC: torch.Tensor) -> tuple[torch.Tensor, list[RouterBalance]]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TC, sin_TC)
        ffn_BTD, balances = self.ffn(self.ffn_norm(x_BTD))
        return x_BTD + ffn_BTD, balances


class LlamaForCausalLM(nn.Module):
    """Token embedding -> decoder blocks -> RMSNorm -> untied LM head; returns (logits, aux_loss)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per decoder block in training; eval is never checkpointed."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay beyond the 1-d rule (norms, biases): none, as in LLaMA."""
        return set()

    def forward(self, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = input_ids_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos_TC, sin_TC = rotary_cos_sin(T, self.cfg.head_dim, self.cfg.rope_theta, input_ids_BT.device)
        x_BTD = self.embed_tokens(input_ids_BT)
        balances: list[RouterBalance] = []
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x_BTD, layer_balances = checkpointed(layer, x_BTD, cos_TC, sin_TC)
            else:
                x_BTD, layer_balances = layer(x_BTD, cos_TC, sin_TC)
            balances.extend(layer_balances)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if balances:
            aux_loss = self.cfg.aux_loss_coef * switch_loss(balances, self.cfg.aux_loss_mode)
        else:
            aux_loss = torch.zeros((), dtype=torch.float32, device=logits_BTV.device)
        return logits_BTV, aux_loss

    def num_active_params(self) -> int:
        """Parameters a token's matmuls use: all but the embedding table and the unchosen experts.

        Counted from one expert per MoE projection, so it is the same at any ep_size.
        """
        expert_params = {id(p) for layer in moe_layers(self) for p in layer.experts.parameters()}
        dense = sum(p.numel() for p in self.parameters()
                    if id(p) not in expert_params and p is not self.embed_tokens.weight)
        one_expert = sum(p.numel() for layer in moe_layers(self)
                         for p in next(iter(layer.experts.values())).parameters())
        return dense + one_expert

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * active params + attention 12 * layers * dim * seq_len.

        The attention term is PaLM's (appendix B) convention, which does not halve for the causal
        mask, so MFU figures compare with PaLM / Megatron reports.
        """
        return 6.0 * self.num_active_params() + 12.0 * self.cfg.num_layers * self.cfg.dim * seq_len

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """(Re)initialise every parameter deterministically from (seed, parameter name)."""
        for name, param in self.named_parameters():
            module_name, _, kind = name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            elif kind == "bias":
                param.zero_()
            else:
                generator = torch.Generator(device=param.device)
                generator.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                nn.init.normal_(param, 0.0, self.cfg.init_std, generator=generator)


LLAMA_1B = LlamaConfig()
LLAMA_DEBUG = LlamaConfig(vocab_size=512, dim=64, num_layers=2, num_heads=4, ffn_dim=256, max_seq_len=128)


@register_model
def llama_1b(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(replace(LLAMA_1B, **overrides))


@register_model
def llama_debug(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(replace(LLAMA_DEBUG, **overrides))


def _register_moe_variant(size: str, base: LlamaConfig, placement: str, num_experts: int) -> None:
    def builder(**overrides) -> LlamaForCausalLM:
        cfg = replace(base, moe_placement=placement, num_experts=num_experts)
        return LlamaForCausalLM(replace(cfg, **overrides))

    builder.__name__ = builder.__qualname__ = f"pnet_llama_{size}_{placement}_e{num_experts}"
    register_model(builder)


# pnet_llama_1b_{gate,up,down}_e{4,8} and pnet_llama_debug_{gate,up,down}_e{4,8}
for _size, _base in (("1b", LLAMA_1B), ("debug", LLAMA_DEBUG)):
    for _placement in MOE_PLACEMENTS:
        for _num_experts in (4, 8):
            _register_moe_variant(_size, _base, _placement, _num_experts)
