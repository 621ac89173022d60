"""DeepSpeed glue for ParameterNet MoE models: expert-parallel groups, optimizer groups, checkpoints.

The models (pnet_dist.models.moe) are pure torch; this module is the only place where they meet
DeepSpeed. The training engine calls, in this order:

    pnet_dist.config.check_moe_deepspeed(cfg)             # before anything else: clear ValueErrors
    ep_group = setup_expert_parallel(model, ep_size)      # after deepspeed.init_distributed();
                                                          # model may still be on the meta device
    groups = moe_param_groups([{"params": ..., "name": ...}, ...])   # -> optimizer(groups)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, ...)
    save_checkpoint(engine, save_dir, tag, client_state) / load_checkpoint(engine, load_dir, tag)

Why each piece exists (DeepSpeed 0.19.8, read in runtime/engine.py and zero/stage_1_and_2.py):
- The engine switches on its MoE paths (expert-data-parallel gradient reduction in ZeRO-1/2,
  `_configure_moe_settings`, the non-ZeRO expert allreduce) only when `has_moe_layers`, which it
  sets from `isinstance(module, deepspeed.moe.layer.MoE)`. Our MoE projection cannot be a DeepSpeed
  MoE (its experts change dimension, d_in != d_out), so `setup_expert_parallel` attaches a
  parameter-free `_ExpertParallelMarker` (a MoE subclass that never runs) to the model. With it,
  ZeRO-1/2 divide every gradient by the full data-parallel size and sum expert gradients only over
  the expert-data-parallel group -- the same averaging as EP=1. Expert parameters carry
  `allreduce=False`, `group_name="ep_size_N"`, and `moe_param_groups` puts them in optimizer
  groups marked 'moe' (deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer).
- Checkpoints: `engine.save_checkpoint` on an MoE model writes the module states of data-parallel
  rank 0 only and per-expert files only for DeepSpeed MoE layers, so the experts of other EP ranks
  would be lost; its ZeRO optimizer shards are also tied to the (dp, ep) topology, and
  ds_to_universal fails on MoE checkpoints. `save_checkpoint` here therefore writes a
  topology-independent checkpoint: full fp32 master weights and full optimizer states per
  parameter NAME, gathered with DeepSpeed's tensor-fragment API (safe_get_full_fp32_param /
  safe_get_full_optimizer_state), dense parameters in one file written by rank 0, experts in one
  file per GLOBAL expert index written by the expert-data-parallel rank 0 holding it, plus the
  scalar optimizer state (Adam's step), per-parameter-group hyperparameters (lr, ...), the LR
  scheduler, the engine counters, the module's persistent buffers and the caller's client_state. A marker file written last makes
  the checkpoint complete. `load_checkpoint` reads it into an engine of ANY ep_size / data-parallel
  size, each rank picking its own experts. Do not call engine.save_checkpoint on an EP model.
- Which DeepSpeed settings an MoE model may use (ZeRO-1/2, no fp16, no optimizer offload) is decided
  by pnet_dist.config.check_moe_deepspeed, at any ep_size; the engine calls it for every model with
  MoE layers.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import deepspeed.comm as ds_dist
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import (groups, safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)
from torch import nn

from pnet_dist.models.moe import (ep_size_of, global_expert_index, iter_expert_params, moe_layers,
                                  shard_experts)

CHECKPOINT_MARKER = "moe_checkpoint.json"
DENSE_FILE = "dense.pt"
_STRUCTURAL_GROUP_KEYS = ("params", "name", "moe")


def expert_file_name(global_expert: int) -> str:
    return f"expert_{global_expert:03d}.pt"


class _ExpertParallelMarker(DeepSpeedMoE):
    """Parameter-free DeepSpeed MoE stand-in: makes DeepSpeedEngine set has_moe_layers.

    It is never called. num_local_experts = 0 so DeepSpeed's own MoE checkpoint code finds no
    expert of it to save or load (experts are checkpointed by save_checkpoint in this module).
    """

    def __init__(self, ep_size: int, num_experts: int):
        nn.Module.__init__(self)  # DeepSpeed MoE's __init__ would build d->d experts and a gate
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = 0
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        assert self.expert_group_name in groups._get_expert_parallel_group_dict(), \
            "setup_expert_parallel creates the expert groups before deepspeed.initialize"

    def forward(self, *args, **kwargs):
        raise RuntimeError("_ExpertParallelMarker only flags the model as MoE for DeepSpeed")


def setup_expert_parallel(model: nn.Module, ep_size: int, *,
                          use_data_before_expert_parallel: bool = False) -> dist.ProcessGroup | None:
    """Create DeepSpeed's expert groups, keep this rank's experts, flag the model as MoE.

    Call after deepspeed.init_distributed() and before deepspeed.initialize(); the model may be on
    the meta device. ep_size=1 changes nothing (dense or MoE model) and returns None. Consecutive
    ranks [k*ep_size, (k+1)*ep_size) form an expert-parallel group (DeepSpeed's default placement);
    ranks holding the same experts form the expert-data-parallel group that reduces their grads.
    """
    if ep_size == 1:
        return None
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"ep_size={ep_size} but the model has no MoE projection; use ep_size=1")
    if not ds_dist.is_initialized():
        raise ValueError("setup_expert_parallel: call deepspeed.init_distributed() first")
    world_size = ds_dist.get_world_size()
    if world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world_size}")
    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    ep_group = groups._get_expert_parallel_group(group_name)
    shard_experts(model, ep_group)
    model.add_module("deepspeed_moe_marker", _ExpertParallelMarker(ep_size, layers[0].num_experts))
    return ep_group


def moe_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split optimizer param groups so expert params sit in DeepSpeed 'moe' groups.

    Each input group is {"params": [...], "name": str, **hyperparameters}; a missing name becomes
    "group{i}". Each group's expert-parallel params move to a new group with the same
    hyperparameters, 'moe': True and name "ep_size_N"; groups left empty are dropped.
    """
    named = [{**group, "name": group.get("name", f"group{i}")} for i, group in enumerate(param_groups)]
    split = split_params_into_different_moe_groups_for_optimizer(named)
    # A group that held only expert params is left empty by the split; ZeRO cannot flatten it.
    return [group for group in split if group["params"]]


def _zero_optimizer(engine):
    if engine.zero_optimization_stage() not in (1, 2):
        raise ValueError(f"MoE checkpoints need ZeRO stage 1 or 2, the engine runs stage "
                         f"{engine.zero_optimization_stage()} (see pnet_dist.config.check_moe_deepspeed)")
    return engine.optimizer


def _flat_partitions(zero_opt) -> list[torch.Tensor]:
    return list(zero_opt.single_partition_of_fp32_groups)


def _optimizer_state_keys(zero_opt) -> tuple[list[str], dict[str, Any]] | None:
    """(per-element state keys, scalar state) of the inner optimizer; None before its first step."""
    flat = _flat_partitions(zero_opt)[0]
    state = zero_opt.optimizer.state.get(flat)
    if not state:
        return None
    tensor_keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]
    scalars = {k: (v.item() if torch.is_tensor(v) else v) for k, v in state.items() if k not in tensor_keys}
    return tensor_keys, scalars


def _materialize_optimizer_state(zero_opt) -> None:
    """Give a fresh ZeRO optimizer its per-partition state so fragments can be written into it.

    One inner step on zero gradients creates the state tensors (their values, and the weight
    decay it applies to the fp32 partition, are all overwritten by the caller), then DeepSpeed
    links each parameter's fragment to them as it does after a first real step.
    """
    flats = _flat_partitions(zero_opt)
    if all(zero_opt.optimizer.state.get(flat) for flat in flats):
        return
    for flat in flats:
        flat.grad = torch.zeros_like(flat)
    zero_opt.optimizer.step()
    for flat in flats:
        flat.grad = None


def _link_optimizer_fragments(zero_opt) -> None:
    """Point every parameter's optimizer-state fragment at the current state tensors.

    DeepSpeed links them once, right after the FIRST param group's first step, when the other
    groups (the MoE groups among them) have no state yet -- their fragments stay empty and
    safe_get_full_optimizer_state fails for expert parameters. Relinking is idempotent.
    """
    zero_opt._hp_optimizer_states_linked = False
    zero_opt._lazy_init_hp_params_optimizer_state()


def _group_index_by_param(zero_opt, name_of: dict[int, str]) -> dict[str, int]:
    """Optimizer group index of every parameter, gathered from all ranks (collective).

    Gathered because each EP rank holds only its own experts; the group list itself is the same
    on every rank.
    """
    local = {name_of[id(param)]: index for index, params in enumerate(zero_opt.bit16_groups)
             for param in params}
    gathered = [None] * ds_dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {name: index for part in gathered for name, index in part.items()}


def _remap_group_lists(state: dict, saved_index: list[int], num_saved_groups: int) -> dict:
    """Re-index per-group lists of a torch LR scheduler state (base_lrs, _last_lr, ...)."""
    return {key: [value[i] for i in saved_index]
            if isinstance(value, list) and len(value) == num_saved_groups else value
            for key, value in state.items()}


def _is_rank0() -> bool:
    return ds_dist.get_rank() == 0


def _is_expert_writer(model: nn.Module) -> bool:
    ep_size = ep_size_of(model)
    if ep_size == 1:
        return _is_rank0()
    return groups._get_expert_data_parallel_rank(f"ep_size_{ep_size}") == 0


def save_checkpoint(engine, save_dir: str | Path, tag: str,
                    client_state: dict[str, Any] | None = None) -> Path:
    """Write a topology-independent checkpoint of an MoE (or dense) model trained with ZeRO-1/2.

    Collective: every rank must call it. Returns the checkpoint directory save_dir/tag.
    Layout: dense.pt (rank 0), expert_{e:03d}.pt per global expert e (all MoE layers' expert e),
    moe_checkpoint.json last. Writers hold what they write in host memory until it is saved
    (fp32 weights + optimizer states: ~12 bytes per parameter of what they write).
    """
    zero_opt = _zero_optimizer(engine)
    model = engine.module
    ckpt_dir = Path(save_dir) / str(tag)
    if _is_rank0():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    ds_dist.barrier()

    keys_and_scalars = _optimizer_state_keys(zero_opt)
    state_keys = keys_and_scalars[0] if keys_and_scalars else []
    if keys_and_scalars:
        _link_optimizer_fragments(zero_opt)
    expert_names = {name for name, _ in iter_expert_params(model)}
    write_dense, write_experts = _is_rank0(), _is_expert_writer(model)
    dense = {"params": {}, "optim": {}}
    experts: dict[int, dict[str, dict]] = defaultdict(lambda: {"params": {}, "optim": {}})
    # Same parameter order on every rank; each gather is a collective within the parameter's
    # (expert-)data-parallel group, so all ranks walk the whole list.
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)
        states = {k: safe_get_full_optimizer_state(param, k) for k in state_keys}
        is_expert = name in expert_names
        if (write_experts if is_expert else write_dense):
            target = experts[global_expert_index(name)] if is_expert else dense
            target["params"][name] = full.cpu()
            target["optim"][name] = {k: v.cpu() for k, v in states.items()}

    for index, payload in experts.items():
        torch.save(payload, ckpt_dir / expert_file_name(index))
    group_of_param = _group_index_by_param(zero_opt, {id(p): n for n, p in model.named_parameters()})
    if write_dense:
        dense.update(
            optimizer_scalars=keys_and_scalars[1] if keys_and_scalars else None,
            group_of_param=group_of_param,
            group_hparams=[{k: v for k, v in group.items() if k not in _STRUCTURAL_GROUP_KEYS}
                           for group in zero_opt.optimizer.param_groups],
            lr_scheduler=engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            engine_counters={"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                             "skipped_steps": engine.skipped_steps},
            buffers=_persistent_buffers(model),
            client_state=client_state or {})
        torch.save(dense, ckpt_dir / DENSE_FILE)
    ds_dist.barrier()
    if _is_rank0():
        layers = moe_layers(model)
        num_experts = layers[0].num_experts if layers else 0
        meta = {"num_experts": num_experts, "saved_ep_size": ep_size_of(model),
                "num_moe_layers": len(layers), "global_steps": engine.global_steps,
                "files": [DENSE_FILE] + [expert_file_name(e) for e in range(num_experts)]}
        (ckpt_dir / CHECKPOINT_MARKER).write_text(json.dumps(meta, indent=1))
    ds_dist.barrier()
    return ckpt_dir


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"MoE checkpoint file {path} is missing; the checkpoint is incomplete")
    # Our own files (client_state may hold RNG states that weights_only refuses).
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(engine, load_dir: str | Path, tag: str) -> dict[str, Any]:
    """Load a save_checkpoint() checkpoint into `engine` at any ep_size; returns client_state.

    Collective: every rank must call it. Restores fp32 master weights and the model's own copy,
    per-element optimizer states, the scalar optimizer state, group hyperparameters, the LR
    scheduler and the engine counters.
    """
    ckpt_dir = Path(load_dir) / str(tag)
    if not (ckpt_dir / CHECKPOINT_MARKER).is_file():
        raise ValueError(f"{ckpt_dir} has no {CHECKPOINT_MARKER}: not a complete MoE checkpoint "
                         "(written by pnet_dist.moe_deepspeed.save_checkpoint)")
    zero_opt = _zero_optimizer(engine)
    model = engine.module
    dense = _load(ckpt_dir / DENSE_FILE)
    expert_names = {name for name, _ in iter_expert_params(model)}
    experts = {e: _load(ckpt_dir / expert_file_name(e))
               for e in sorted({global_expert_index(n) for n in expert_names})}

    if dense["optimizer_scalars"] is not None:
        _materialize_optimizer_state(zero_opt)
        _link_optimizer_fragments(zero_opt)
    for name, param in model.named_parameters():
        source = experts[global_expert_index(name)] if name in expert_names else dense
        if name not in source["params"]:
            raise ValueError(f"{ckpt_dir}: no entry for parameter {name!r}; the checkpoint is of "
                             "another model")
        value = source["params"][name]
        if value.shape != param.shape:
            raise ValueError(f"{ckpt_dir}: {name!r} has shape {tuple(value.shape)} in the checkpoint "
                             f"but {tuple(param.shape)} in the model")
        value = value.to(param.device)
        safe_set_full_fp32_param(param, value)
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        for key, state in source["optim"][name].items():
            safe_set_full_optimizer_state(param, state.to(param.device), key)

    if dense["optimizer_scalars"] is not None:
        for flat in _flat_partitions(zero_opt):
            state = zero_opt.optimizer.state[flat]
            for key, value in dense["optimizer_scalars"].items():
                if torch.is_tensor(state[key]):
                    state[key].fill_(value)
                else:
                    state[key] = value
    # Groups are matched through their parameters: EP=1 has no 'moe' groups, EP>1 has some.
    name_of = {id(p): n for n, p in model.named_parameters()}
    saved_index = [dense["group_of_param"][name_of[id(params[0])]] for params in zero_opt.bit16_groups]
    for group, index in zip(zero_opt.optimizer.param_groups, saved_index):
        group.update(dense["group_hparams"][index])
    if engine.lr_scheduler is not None and dense["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(
            _remap_group_lists(dense["lr_scheduler"], saved_index, len(dense["group_hparams"])))
    for key, value in dense["engine_counters"].items():
        setattr(engine, key, value)
    buffers = _persistent_buffers(model)
    missing = sorted(set(buffers) - set(dense.get("buffers", {})))
    if missing and "buffers" in dense:
        raise ValueError(f"{ckpt_dir}: no entry for buffers {missing[:3]}; the checkpoint is of another model")
    with torch.no_grad():
        for name, value in dense.get("buffers", {}).items():  # checkpoints before buffers were saved have none
            buffers[name].copy_(value)
    return dense["client_state"]


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's persistent buffers (the same on every rank; none live inside experts)."""
    persistent = set(model.state_dict())
    return {name: buffer for name, buffer in model.named_buffers() if name in persistent}
