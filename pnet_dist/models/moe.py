"""Top-1 mixture-of-experts projection (ParameterNet's language half) and expert parallelism.

Owns `MoEProjection`, the drop-in replacement for ONE projection of a SwiGLU FFN (gate, up or
down), whose experts map d_in -> d_out with d_in != d_out allowed (2048 -> 8192 or 8192 -> 2048 in
LLaMA-1B), the Switch load-balancing loss, routing statistics for logging, and expert parallelism
in pure torch.distributed (no DeepSpeed import here; see pnet_dist/moe_deepspeed.py for that glue).

Routing (released ParameterNet code, paper Table 7):
    probs = softmax(router(x))      router = Linear(d_in, E, bias=False), computed in fp32
    e = argmax(probs);  y = probs[e] * expert_e(x)
Experts are `nn.Linear(d_in, d_out, bias=expert_bias)`; the released code keeps nn.Linear's
default bias, so expert_bias=True is the default (that is what gives 1.541B / 2.347B parameters).

Load-balancing loss (Switch Transformer), E^2 * mean_e(f_e * P_e), where f_e is the fraction of
tokens whose top-1 choice is e (counted before any capacity drop) and P_e the mean router
probability of e. `switch_loss(balances, mode)` offers both forms:
    mode="joint"      (default; released code) groups are sequences, and the tokens of ALL MoE
                      layers of a sequence are pooled: f and P are [B, E] over L*T tokens,
                      loss = E^2 * mean_{b,e}(f * P).
    mode="per_layer"  the Switch paper's form per layer over all local tokens of the batch,
                      averaged over layers.
Tokens are always those of the local rank (as in Switch and DeepSpeed): with data parallelism the
loss is a per-rank quantity like the LM loss.

Capacity (optional, default None = no token is ever dropped): with capacity_factor c each expert
accepts at most ceil(c * N / E) of a rank's N tokens; overflow policy: tokens are admitted in
flattened (batch, position) order and the rest are dropped -- a dropped token's projection output
is zero (so the FFN contributes nothing and the residual stream carries the token), exactly like
the released router's cumsum capacity mask.

Expert computation sorts tokens by expert and runs one matmul per expert (a Python loop over the
<= 8 experts, never over tokens); every local expert is called even with zero tokens so all expert
parameters always receive a gradient and the module call order stays fixed.

Expert parallelism: `shard_experts(model, ep_group)` keeps experts [r*E/P, (r+1)*E/P) on rank r of
an ep_group of size P (DeepSpeed's placement: global id = ep_rank * num_local + local id). Forward
exchanges per-expert token counts, then tokens, with all_to_all_single (uneven splits; the
backward sends gradients back along the same routes), computes, and sends results back. Expert
parameters are tagged `allreduce=False`, `group_name=f"ep_size_{P}"` (DeepSpeed's convention: ZeRO
1/2 reduce them only inside the expert-data-parallel group). State-dict names always carry the
GLOBAL expert index (`...experts.3.weight` on rank 1 of EP=2 with E=4), a load pre-hook drops the
experts a rank does not hold, so `model.load_state_dict(full_state_dict)` works at any ep_size.
`expert_state_dict` / `load_expert_state_dict` move just the local experts.

Statistics: each MoEProjection keeps detached statistics of its last forward; `moe_stats(model)`
returns them per layer k (MoE projections in module order: one per decoder block, so k is the
block index), over the local rank's tokens: the fraction of tokens routed to each expert, the
router entropy, the max/min expert load ratio (an expert with no token counts as one) and, where
tokens can be dropped (a capacity factor is set), the dropped fraction.

Shape legend: B batch, T sequence, N tokens (B*T), I d_in, O d_out, E experts, L local experts,
P expert-parallel ranks, S statistics per layer (E + 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

AUX_LOSS_MODES = ("joint", "per_layer")


@dataclass
class RouterBalance:
    """What one MoE layer contributes to the load-balancing loss (per sequence)."""

    tokens_BE: torch.Tensor      # float count of tokens whose top-1 is e; no gradient
    prob_sum_BE: torch.Tensor    # sum over positions of router probabilities; carries gradient
    seq_len: int


class Router(nn.Linear):
    """Linear(d_in, E, bias=False) evaluated in fp32 (also under autocast), returning softmax probs.

    A module (not a bare F.linear on the weight) so that module hooks -- ZeRO-3 gathering among
    them -- see the router like any other layer.
    """

    def __init__(self, d_in: int, num_experts: int):
        super().__init__(d_in, num_experts, bias=False)

    def forward(self, x_NI: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_NI.device.type, enabled=False):
            return F.linear(x_NI.float(), self.weight.float()).softmax(dim=-1)


class MoEProjection(nn.Module):
    """Top-1 MoE replacing one Linear(d_in, d_out); forward returns (y_BTO, RouterBalance)."""

    def __init__(self, d_in: int, d_out: int, num_experts: int, *, expert_bias: bool = True,
                 capacity_factor: float | None = None):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"MoEProjection needs num_experts >= 2, got {num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (no drop), got {capacity_factor}")
        self.d_in, self.d_out, self.num_experts = d_in, d_out, num_experts
        self.capacity_factor = capacity_factor
        self.router = Router(d_in, num_experts)
        # Keys are GLOBAL expert indices, so parameter names stay the same at any ep_size.
        self.experts = nn.ModuleDict(
            {str(e): nn.Linear(d_in, d_out, bias=expert_bias) for e in range(num_experts)})
        self.ep_group: dist.ProcessGroup | None = None
        self.ep_size, self.ep_rank = 1, 0
        self.last_stats_S: torch.Tensor | None = None
        self.register_load_state_dict_pre_hook(_drop_foreign_experts)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def local_expert_ids(self) -> range:
        start = self.ep_rank * self.num_local_experts
        return range(start, start + self.num_local_experts)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, num_experts={self.num_experts}, "
                f"ep_size={self.ep_size}, capacity_factor={self.capacity_factor}")

    def shard(self, ep_group: dist.ProcessGroup) -> None:
        """Keep only this rank's experts of `ep_group` and tag them for expert-data-parallel reduction."""
        ep_size = dist.get_world_size(group=ep_group)
        if self.num_experts % ep_size:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by the expert-parallel "
                             f"size {ep_size}; choose ep_size among the divisors of {self.num_experts}")
        if self.ep_group is not None:
            raise ValueError("experts are already sharded; build a fresh model to change ep_size")
        if ep_size == 1:
            return
        self.ep_group, self.ep_size, self.ep_rank = ep_group, ep_size, dist.get_rank(group=ep_group)
        keep = {str(e) for e in self.local_expert_ids}
        for key in [k for k in self.experts if k not in keep]:
            del self.experts[key]
        self._tag_expert_params()

    def _tag_expert_params(self) -> None:
        for param in self.experts.parameters():
            param.allreduce = False
            param.group_name = f"ep_size_{self.ep_size}"

    def _apply(self, fn, recurse=True):
        # .to(), .to_empty(), .bfloat16() may create new Parameter objects, which lose the tags.
        super()._apply(fn, recurse)
        if self.ep_size > 1:
            self._tag_expert_params()
        return self

    def forward(self, x_BTI: torch.Tensor) -> tuple[torch.Tensor, RouterBalance]:
        B, T, _ = x_BTI.shape
        N, E = B * T, self.num_experts
        x_NI = x_BTI.reshape(N, self.d_in)

        probs_NE = self.router(x_NI)
        gate_N, expert_N = probs_NE.max(dim=-1)

        # Stable sort keeps (batch, position) order inside each expert: the capacity priority.
        order_N = torch.argsort(expert_N, stable=True)
        tokens_E = torch.bincount(expert_N, minlength=E)
        if self.capacity_factor is None:
            kept_order, sent_E = order_N, tokens_E
        else:
            capacity = math.ceil(self.capacity_factor * N / E)
            first_of_expert_E = torch.cumsum(tokens_E, 0) - tokens_E
            slot_N = torch.arange(N, device=x_NI.device) - first_of_expert_E[expert_N[order_N]]
            kept_order = order_N[slot_N < capacity]
            sent_E = tokens_E.clamp(max=capacity)

        position_N = _sorted_position(kept_order, N)
        y_sorted = self._run_experts(_SortRows.apply(x_NI, kept_order, position_N), sent_E)
        y_NO = _UnsortAndScale.apply(y_sorted, gate_N.index_select(0, kept_order), kept_order, position_N)

        tokens_BE = F.one_hot(expert_N.view(B, T), E).sum(dim=1).float()
        balance = RouterBalance(tokens_BE=tokens_BE, prob_sum_BE=probs_NE.view(B, T, E).sum(dim=1),
                                seq_len=T)
        with torch.no_grad():
            entropy = -(probs_NE * torch.log(probs_NE.clamp_min(1e-20))).sum(-1).mean()
            dropped = 1.0 - kept_order.numel() / max(N, 1)
            max_min_ratio = tokens_E.max().float() / tokens_E.min().clamp_min(1).float()
            self.last_stats_S = torch.cat([tokens_E.float() / max(N, 1), entropy.view(1), max_min_ratio.view(1),
                                           entropy.new_full((1,), dropped)])
        return y_NO.view(B, T, self.d_out), balance

    def _run_experts(self, x_sorted: torch.Tensor, sent_E: torch.Tensor) -> torch.Tensor:
        """Expert outputs for tokens sorted by expert (sent_E rows per expert), in the same order."""
        if self.ep_size == 1:
            return self._apply_local_experts(x_sorted, sent_E.tolist())
        P, L = self.ep_size, self.num_local_experts
        # recv_PL[s, l]: tokens rank s sends to my local expert l.
        recv_PL = torch.empty_like(sent_E)
        dist.all_to_all_single(recv_PL, sent_E, group=self.ep_group)
        recv_PL = recv_PL.view(P, L)
        send_splits = sent_E.view(P, L).sum(dim=1).tolist()
        recv_splits = recv_PL.sum(dim=1).tolist()
        x_recv = _AllToAll.apply(x_sorted, recv_splits, send_splits, self.ep_group)
        # Received rows are grouped by (source rank, local expert); regroup by local expert.
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(L, device=recv_PL.device).repeat(P), recv_PL.flatten())
        regroup = torch.argsort(local_expert_of_row, stable=True)
        position = _sorted_position(regroup, regroup.numel())
        y_grouped = self._apply_local_experts(_SortRows.apply(x_recv, regroup, position),
                                              recv_PL.sum(dim=0).tolist())
        y_recv = _SortRows.apply(y_grouped, position, regroup)   # inverse permutation
        return _AllToAll.apply(y_recv, send_splits, recv_splits, self.ep_group)

    def _apply_local_experts(self, x_grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        chunks = torch.split(x_grouped, counts)
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts.values(), chunks)])


def _sorted_position(order_K: torch.Tensor, num_rows: int) -> torch.Tensor:
    """position_N[order[k]] = k; rows that order leaves out point at K (a zero row)."""
    position_N = order_K.new_full((num_rows,), order_K.numel())
    position_N[order_K] = torch.arange(order_K.numel(), device=order_K.device)
    return position_N


def _gather_with_zero_row(src_KD: torch.Tensor, position_N: torch.Tensor) -> torch.Tensor:
    """src[position[n]], zero where position[n] == K. A gather (index_select) rather than a
    scatter (index_copy_/index_add_), which was slower on CPU and needs a zero-filled buffer."""
    if position_N.numel() != src_KD.shape[0]:
        src_KD = torch.cat([src_KD, src_KD.new_zeros(1, src_KD.shape[1])])
    return src_KD.index_select(0, position_N)


class _SortRows(torch.autograd.Function):
    """x[order] (distinct indices); the backward un-sorts by gathering through `position`."""

    @staticmethod
    def forward(ctx, x_ND, order_K, position_N):
        ctx.save_for_backward(position_N)
        return x_ND.index_select(0, order_K)

    @staticmethod
    def backward(ctx, grad_KD):
        (position_N,) = ctx.saved_tensors
        return _gather_with_zero_row(grad_KD, position_N), None, None


class _UnsortAndScale(torch.autograd.Function):
    """y[n] = gate[n] * src[position[n]] (zero for dropped tokens), one output buffer.

    Fused because on the N x d_out side every extra buffer is a full pass over memory: the
    scale happens in place, and the backward needs one gathered buffer plus a row-wise dot.
    """

    @staticmethod
    def forward(ctx, src_KO, gate_K, order_K, position_N):
        ctx.save_for_backward(src_KO, gate_K, order_K)
        gate_N = _gather_with_zero_row(gate_K.unsqueeze(1), position_N)
        return _gather_with_zero_row(src_KO, position_N).mul_(gate_N.to(src_KO.dtype))

    @staticmethod
    def backward(ctx, grad_NO):
        src_KO, gate_K, order_K = ctx.saved_tensors
        grad_KO = grad_NO.index_select(0, order_K)
        grad_gate_K = torch.einsum("ko,ko->k", grad_KO, src_KO).to(gate_K.dtype)
        return grad_KO.mul_(gate_K.unsqueeze(1).to(grad_KO.dtype)), grad_gate_K, None, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x_NI, recv_splits: list[int], send_splits: list[int], group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x_NI.new_empty(sum(recv_splits), *x_NI.shape[1:])
        dist.all_to_all_single(out, x_NI.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        recv_splits, send_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(send_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_in, None, None, None


def _drop_foreign_experts(module: MoEProjection, state_dict, prefix, *_args) -> None:
    """Load pre-hook: ignore experts this rank does not hold, so any-topology state dicts load."""
    local = set(module.local_expert_ids)
    expert_prefix = prefix + "experts."
    for key in [k for k in state_dict if k.startswith(expert_prefix)]:
        if int(key[len(expert_prefix):].split(".", 1)[0]) not in local:
            del state_dict[key]


def switch_loss(balances: Sequence[RouterBalance], mode: str = "joint") -> torch.Tensor:
    """Switch load-balancing loss E^2 * mean(f * P) over the MoE layers' balances (fp32 scalar)."""
    if mode not in AUX_LOSS_MODES:
        raise ValueError(f"aux loss mode must be one of {AUX_LOSS_MODES}, got {mode!r}")
    E = balances[0].tokens_BE.shape[1]
    assert all(b.tokens_BE.shape[1] == E for b in balances), "MoE layers differ in expert count"
    if mode == "per_layer":
        losses = []
        for b in balances:
            num_tokens = b.tokens_BE.shape[0] * b.seq_len
            losses.append(E * E * torch.mean((b.tokens_BE.sum(0) / num_tokens)
                                             * (b.prob_sum_BE.sum(0) / num_tokens)))
        return torch.stack(losses).mean()
    num_tokens = sum(b.seq_len for b in balances)
    fraction_BE = sum(b.tokens_BE for b in balances) / num_tokens
    mean_prob_BE = sum(b.prob_sum_BE for b in balances) / num_tokens
    return E * E * torch.mean(fraction_BE * mean_prob_BE)


def moe_layers(model: nn.Module) -> list[MoEProjection]:
    """The model's MoE projections in module order."""
    return [m for m in model.modules() if isinstance(m, MoEProjection)]


def moe_stats(model: nn.Module) -> dict[str, list]:
    """Routing statistics of the last forward (local tokens), one host transfer for all layers:
    {"expert_load": [[fraction of tokens per expert] per layer], "router_entropy": [per layer],
    "max_min_load_ratio": [per layer], "dropped_frac": [per layer, only where a capacity is set]};
    {} for a model without MoE."""
    layers = [m for m in moe_layers(model) if m.last_stats_S is not None]
    if not layers:
        return {}
    rows = torch.stack([m.last_stats_S for m in layers]).tolist()
    stats = {"expert_load": [row[:-3] for row in rows], "router_entropy": [row[-3] for row in rows],
             "max_min_load_ratio": [row[-2] for row in rows]}
    if any(m.capacity_factor is not None for m in layers):  # otherwise it is 0 by construction
        stats["dropped_frac"] = [row[-1] for row in rows]
    return stats


def shard_experts(model: nn.Module, ep_group: dist.ProcessGroup) -> None:
    """Keep only the local experts of every MoE projection (works on the meta device too)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("shard_experts: the model has no MoE projection (a dense model needs no "
                         "expert parallelism; use ep_size=1)")
    for layer in layers:
        layer.shard(ep_group)


def ep_size_of(model: nn.Module) -> int:
    """Expert-parallel size the model is sharded for (1 when unsharded or dense)."""
    return max((m.ep_size for m in moe_layers(model)), default=1)


def _expert_param_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, MoEProjection):
            prefix = f"{module_name}.experts." if module_name else "experts."
            names.update(prefix + n for n, _ in module.experts.named_parameters())
    return names


def global_expert_index(name: str) -> int:
    """Global expert index in a parameter name such as 'layers.0.ffn.up_proj.experts.3.weight'."""
    head, sep, tail = name.rpartition(".experts.")
    if not sep:
        raise ValueError(f"{name!r} is not an expert parameter name")
    return int(tail.split(".", 1)[0])


def expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{global name: tensor} of the experts this rank holds (detached views, not copies)."""
    names = _expert_param_names(model)
    return {k: v for k, v in model.state_dict().items() if k in names}


def load_expert_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's experts from `state` (full or partial, global names); ignores other keys.

    Raises ValueError naming the first local expert parameter that `state` lacks.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(_expert_param_names(model)):
            if name not in state:
                raise ValueError(f"expert state lacks {name!r} (global expert "
                                 f"{global_expert_index(name)}); pass the files of every expert")
            params[name].copy_(state[name])


def iter_expert_params(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """(global name, parameter) of every local expert parameter, in module order."""
    names = _expert_param_names(model)
    return ((n, p) for n, p in model.named_parameters() if n in names)
