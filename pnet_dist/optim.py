"""Optimizer pieces the engine assembles: parameter groups, the lr schedule, and weight EMA.

Parameter groups: no weight decay on norms, biases and other 1-d parameters; optional layer-wise
lr decay (finetuning) with layer ids found from parameter names, so one rule serves GhostNet
("conv_stem" -> "blocks.3.1.*" -> "conv_head"/"classifier") and LLaMA ("embed_tokens" ->
"layers.7.*" -> "norm"/"lm_head") without per-model tables.

Schedule: linear warm-up then cosine from `lr` to `min_lr`, as a multiplier for torch's LambdaLR
(DeepSpeed steps it and saves its state in the checkpoint). Pure torch; no deepspeed here.

GuardedAdamW: AdamW with the guard DeepSpeed's ZeRO and bf16 optimizers put around their step
(clip by the global gradient norm; skip the step when a gradient is not finite), for
deepspeed.zero_stage 0, where DeepSpeed hands the step to the client optimizer unguarded.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


def is_no_decay(name: str, param: torch.Tensor, extra_names: frozenset[str] = frozenset()) -> bool:
    """Norm weights, biases (every parameter with <= 1 dimension) and names the model lists."""
    return param.ndim <= 1 or name.endswith(".bias") or name in extra_names


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({param name: layer id}, number of ids). Layer id 0 = before the first indexed block
    (stem/embedding), 1..L = indexed blocks in order of appearance, L+1 = after them (head)."""
    block_of: dict[str, tuple[str, ...] | None] = {}
    order: dict[tuple[str, ...], int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        first = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        if first is None:
            block_of[name] = None
            continue
        end = first
        while end < len(parts) - 1 and parts[end].isdigit():
            end += 1
        key = tuple(parts[:end])
        order.setdefault(key, len(order) + 1)
        block_of[name] = key
    num_blocks = len(order)
    ids: dict[str, int] = {}
    seen_block = False
    for name, key in block_of.items():
        if key is not None:
            seen_block = True
            ids[name] = order[key]
        else:
            ids[name] = num_blocks + 1 if seen_block else 0
    return ids, num_blocks + 2


def build_param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                       layer_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups: {params, name, lr, weight_decay}; frozen parameters are left out."""
    no_decay_names = frozenset(getattr(model, "no_weight_decay", lambda: ())())
    ids, num_ids = layer_ids(model) if layer_decay is not None else ({}, 1)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not is_no_decay(name, param, no_decay_names)
        layer = ids.get(name, 0)
        scale = layer_decay ** (num_ids - 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault((layer, decay), {
            "params": [], "name": f"layer{layer}_{'decay' if decay else 'no_decay'}",
            "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW that, like DeepSpeed's ZeRO optimizers, clips the gradients by their global norm
    and skips the update when that norm is not finite, reporting it as DeepSpeed expects of a
    client optimizer: `overflow` (read by the engine after step(): a skipped step leaves the LR
    schedule alone and makes engine.was_step_applied() False) and `_global_grad_norm` (what
    engine.get_global_grad_norm() returns).

    For deepspeed.zero_stage 0, whose engine all-reduces the gradients before step(): a NaN on any
    rank is a NaN on every rank by then, so every rank takes the same decision without a
    collective of its own. The norm costs one host sync per step, as DeepSpeed's check does.
    Clipping is torch.nn.utils.clip_grad_norm_'s: scale by max_norm / (norm + 1e-6) when below 1.
    """

    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("GuardedAdamW.step takes no closure")
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        self._global_grad_norm = norm.item()
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        scale = self.max_grad_norm / (self._global_grad_norm + 1e-6)
        if self.max_grad_norm > 0 and scale < 1.0:
            torch._foreach_mul_(grads, scale)
        return super().step()


@dataclass
class CosineSchedule:
    """lr multiplier at optimizer step `step` (0-based): linear warm-up, then cosine to min_ratio.

    A callable object rather than a lambda so LambdaLR.state_dict() can carry it.
    """
    warmup_steps: int
    max_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                       max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = CosineSchedule(warmup_steps=warmup_steps, max_steps=max_steps, min_ratio=min_lr / lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class ModelEma:
    """Exponential moving average of a model's weights and buffers, kept in fp32 on every rank.

    Under bf16 the average is of the bf16 module weights (the fp32 masters are partitioned across
    ranks by ZeRO); at decay ~0.9998 the bf16 rounding of each update averages out.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = model.state_dict()
        averaged, sources, copied, copied_from = [], [], [], []
        for name, ema_value in self.module.state_dict().items():
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                sources.append(source[name].to(ema_value.dtype))
            else:
                copied.append(ema_value)
                copied_from.append(source[name])
        # the same element-wise ops as ema.mul_(decay).add_(value, alpha=1 - decay) per tensor,
        # in one foreach call each: run every step, over every tensor of the model
        torch._foreach_mul_(averaged, self.decay)
        torch._foreach_add_(averaged, sources, alpha=1.0 - self.decay)
        if copied:
            torch._foreach_copy_(copied, copied_from)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average at the model's current weights."""
        source = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            ema_value.copy_(source[name])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
