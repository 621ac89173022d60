"""Parameter and multiply-accumulate (MAC) counting for every model in the registry.

Our own counter: forward hooks on the modules that do the arithmetic, run on "meta" tensors by
default, so even a 1B-parameter model is counted without allocating or computing anything. MACs
are those of each layer's definition (not of whichever execution path it takes), per sample of
the input given (per image; per sequence for token models), grouped into kinds:

  conv     nn.Conv2d, and the convolution of a DynamicConv2d with its mixed kernel
  linear   nn.Linear (classifier, projections)
  mixing   DynamicConv2d's per-sample kernel mixing: M * (kernel + bias) elements per sample
  routing  the routers' Linear layers (DynamicConv2d's GAP -> Linear; MoE routers)
  expert   the Linear experts of a top-1 MoE (on a real forward each sees only its tokens)

Pooling, normalisation and activations are not counted (as in the paper's FLOPs columns).

Token models (LLaMA, with or without top-1 MoE projections) are counted analytically by
`count_token_model`, because top-1 routing is data-dependent and cannot run on meta tensors:
every Linear counts in*out per token; a top-1 MoE (a module with `router` and `experts`) counts
its router plus ONE expert per token; attention (a module with q/k/v/o projections) adds the
full T x T score and value products, 2 * T * (heads * head_dim) per token, as the paper's LLaMA
FLOPs do (kind "attention"). tests/test_counting.py checks these rules against the hook counter
on a real forward and against torch's dispatch-level FLOP counter.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from pnet_dist.models.dynamic_conv import DynamicConv2d


@dataclass
class ModelCounts:
    """Parameters and MACs per sample of one model."""

    params: int
    expert_params: int
    macs_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(self.macs_by_kind.values())


def is_top1_moe(module: nn.Module) -> bool:
    """A top-1 mixture of Linear experts: has a Linear `router` and a container of `experts`."""
    experts = getattr(module, "experts", None)
    return (isinstance(getattr(module, "router", None), nn.Linear)
            and isinstance(experts, (nn.ModuleDict, nn.ModuleList))
            and all(isinstance(expert, nn.Linear) for expert in _children(experts)))


def _children(container: nn.Module) -> list[nn.Module]:
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, expert parameters); experts are DynamicConv2d kernels (+ biases) and the
    experts of top-1 MoE layers. Shared tensors count once."""
    total = sum(p.numel() for p in model.parameters())
    experts = 0
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            experts += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        elif is_top1_moe(module):
            experts += sum(p.numel() for p in module.experts.parameters())
    return total, experts


def _conv_macs(output: torch.Tensor, kernel_elements: int) -> int:
    return output.numel() * kernel_elements


def _module_macs(module: nn.Module, inputs: tuple, output) -> dict[str, int]:
    if isinstance(module, DynamicConv2d):
        batch = inputs[0].shape[0]
        mixed = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        return {"conv": _conv_macs(output, module.weight[0, 0].numel()), "mixing": batch * mixed}
    if isinstance(module, nn.Conv2d):
        return {"conv": _conv_macs(output, module.weight[0].numel())}
    if isinstance(module, nn.Linear):
        # Linear subclasses may return (y, extra), as LLaMA's projections do.
        y = output[0] if isinstance(output, (tuple, list)) else output
        return {"linear": y.numel() * module.in_features}
    return {}


def _counted_modules(model: nn.Module) -> dict[nn.Module, str | None]:
    """Modules to hook, each with a kind override (routers -> 'routing', MoE experts -> 'expert')."""
    chosen: dict[nn.Module, str | None] = {}
    override: dict[int, str] = {}
    for module in model.modules():
        if is_top1_moe(module):
            override.update((id(m), "routing") for m in module.router.modules())
            override.update((id(m), "expert") for m in module.experts.modules())
        if isinstance(module, DynamicConv2d):
            chosen[module] = None
            override.update((id(m), "routing") for m in module.router.modules())
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            chosen[module] = override.get(id(module))
    return chosen


def count_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per sample by kind for one forward of `example_input` (batch dimension first)."""
    totals: Counter[str] = Counter()
    handles = []

    def hook_for(kind_override: str | None):
        def hook(module, inputs, output):
            for kind, macs in _module_macs(module, inputs, output).items():
                totals[kind_override or kind] += int(macs)
        return hook

    for module, kind_override in _counted_modules(model).items():
        handles.append(module.register_forward_hook(hook_for(kind_override)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    batch = example_input.shape[0]
    assert all(value % batch == 0 for value in totals.values()), "MACs must scale with the batch"
    return {kind: value // batch for kind, value in sorted(totals.items())}


def count_model(model: nn.Module, example_input: torch.Tensor) -> ModelCounts:
    """Parameters and per-sample MACs; pass a meta model and a meta input to count without memory."""
    params, expert_params = count_params(model)
    return ModelCounts(params=params, expert_params=expert_params, macs_by_kind=count_macs(model, example_input))


def image_input(model: nn.Module, batch: int = 1, device: str | torch.device = "meta",
                size: int | None = None) -> torch.Tensor:
    """A (batch, 3, H, W) input at the model's `input_size` (or `size` x `size`)."""
    channels, height, width = getattr(model, "input_size", (3, 224, 224))
    if size is not None:
        height = width = size
    return torch.zeros(batch, channels, height, width, device=device)


def _is_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))


def count_token_macs(model: nn.Module, seq_len: int) -> dict[str, int]:
    """MACs per sequence of `seq_len` tokens by kind, from the module structure (see module doc)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    per_token: Counter[str] = Counter()
    inside_moe: set[int] = set()
    attention_macs = 0
    for module in model.modules():
        if is_top1_moe(module):
            experts = _children(module.experts)
            inside_moe.update(id(m) for m in module.modules())
            per_token["routing"] += module.router.in_features * module.router.out_features
            # Top-1: each token passes one expert; they all have the same shape.
            per_token["expert"] += experts[0].in_features * experts[0].out_features
        elif isinstance(module, nn.Linear) and id(module) not in inside_moe:
            per_token["linear"] += module.in_features * module.out_features
        if _is_attention(module):
            attention_macs += 2 * seq_len * seq_len * module.q_proj.out_features
    totals = {kind: macs * seq_len for kind, macs in per_token.items()}
    if attention_macs:
        totals["attention"] = attention_macs
    return dict(sorted(totals.items()))


def count_token_model(model: nn.Module, seq_len: int) -> ModelCounts:
    """Parameters and MACs per sequence of `seq_len` tokens (meta models are fine)."""
    params, expert_params = count_params(model)
    return ModelCounts(params=params, expert_params=expert_params, macs_by_kind=count_token_macs(model, seq_len))
