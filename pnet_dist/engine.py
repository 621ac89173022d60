"""The DeepSpeed engine: ds_config from the job config, optimizer and schedule, deepspeed.initialize.

This is the only module of the training path that imports deepspeed (pnet_dist.moe_deepspeed is
the MoE glue it calls; pnet_dist.engine_checkpoint saves and loads the engine object it is handed,
all DeepSpeed checkpoint formats in one place beside this module). The loop
in train.py uses the engine's own methods: engine(batch), backward, step, was_step_applied,
get_global_grad_norm, get_lr.

Choices, and why:
- The optimizer is torch's AdamW, passed to deepspeed.initialize as an object: DeepSpeed's
  FusedAdam is a 69 s JIT build on first use (STACK.md) and buys nothing on CPU. Parameter groups
  (no decay on norms/biases, layer-wise lr decay) come from pnet_dist.optim.
- deepspeed.zero_stage 0 is DeepSpeed's data parallelism without ZeRO: bucketed gradient
  all-reduce, the whole AdamW state on every rank, no parameter all-gather -- plain DDP's
  collectives, for models whose optimizer state fits on every GPU (ParameterNet's does many times
  over). ZeRO-1/2 add a parameter all-gather, per-group gradient-norm reductions and (ZeRO-2)
  per-parameter gradient hooks: 14-35% of a step of these small models on the 2-core CPU
  (tools/bench_engine.py).
  DeepSpeed leaves the step to the client optimizer there, so it is optim.GuardedAdamW, which
  clips and skips non-finite steps like the ZeRO optimizers do. Stage 0 takes fp32 weights (fp32,
  or bf16 autocast for BatchNorm models): with bf16 weights DeepSpeed's bf16 optimizer shards its
  fp32 masters like ZeRO-1, and with MoE expert parallelism the expert gradients need ZeRO-1/2.
- The schedule is a torch LambdaLR (warm-up + cosine) handed to DeepSpeed, which steps it after
  every applied optimizer step and saves it in its checkpoint.
- Non-finite gradients: DeepSpeed's ZeRO optimizers (every stage, fp32, bf16 and fp16) and, at
  stage 0, optim.GuardedAdamW check the gradients before the update and skip the step --
  dropping the accumulated gradients -- when any rank has an inf/NaN. The loop relies on that
  single mechanism for non-finite losses (see train.train_step); `poison_nonfinite` makes sure a
  non-finite loss always yields non-finite gradients, even in the rare case (an inf loss) whose
  backward would be finite.
- bf16 means two things. Models with BatchNorm (the vision family) train under torch autocast
  (DeepSpeed's torch_autocast): fp32 weights, bf16 convolutions and matmuls, BatchNorm and its
  running statistics in fp32 -- the AMP recipe timm uses, and the only one CPU BatchNorm accepts
  (DeepSpeed's bf16 mode casts weights but not running statistics). Models without BatchNorm
  (the language family) hold bf16 weights with fp32 masters in the ZeRO optimizer (DeepSpeed
  bf16), the usual LLM recipe. fp16 is refused for BatchNorm models.
- Expert parallelism (ep_size > 1) goes through pnet_dist.moe_deepspeed: expert groups and the
  MoE optimizer-group split, in the order that module documents.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

import torch
from torch import nn

# A quiet console: each line below came once per rank and again in every restarted worker, and
# none asks anything of the user. Filtered at its source, and only that line.
# - DeepSpeed warns that it fell back to its CPU accelerator when no GPU is visible; on such a
#   host the CPU is what we want, so name it before DeepSpeed looks.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
# - torch's extension builder, which DeepSpeed imports for its CPU ops, warns that CUDA_HOME
#   exists without a CUDA runtime (CUDA-enabled torch wheels on a CPU host).
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not record.getMessage().startswith("No CUDA runtime is found"))
# - DeepSpeed 0.19.8's ZeRO calls torch.distributed.all_gather_into_tensor, which torch 2.14
#   deprecates with a FutureWarning at the first call of every run.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)

import deepspeed  # noqa: E402

from pnet_dist.config import JobConfig, check_moe_deepspeed  # noqa: E402
from pnet_dist.models.moe import moe_layers  # noqa: E402
from pnet_dist.optim import GuardedAdamW, build_lr_scheduler, build_param_groups  # noqa: E402

# deepspeed.init_distributed prints this on every rank, also when the op only loads from the cache.
_SHM_OP_PRINT = re.compile(r"^DeepSpeed \S+ built successfully\n?$")


@contextlib.contextmanager
def _without_shm_op_print():
    """Drop _SHM_OP_PRINT from what the block prints, and pass the rest on. Ray Train replaces
    `print` in its workers with one that also logs to the root logger, hence the logging filter."""
    def keep(record: logging.LogRecord) -> bool:
        return not _SHM_OP_PRINT.match(record.getMessage())
    printed = io.StringIO()
    logging.getLogger().addFilter(keep)
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logging.getLogger().removeFilter(keep)
        sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                 if not _SHM_OP_PRINT.match(line)))



def build_ds_config(cfg: JobConfig, world_size: int, model: nn.Module) -> dict:
    """The ds_config dict: typed sections first, then deepspeed.raw merged over it."""
    ds = cfg.deepspeed
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if ds.precision == "fp16" and has_batchnorm:
        raise ValueError(f"deepspeed.precision=fp16 is not supported for {cfg.model.name} (BatchNorm); use bf16")
    if ds.zero_stage == 0 and not has_batchnorm and ds.precision != "fp32":
        # With bf16/fp16 weights DeepSpeed wraps the optimizer in its own (the bf16 one shards the
        # fp32 masters over the ranks like ZeRO-1); stage 0 is for a client optimizer kept whole.
        raise ValueError(f"deepspeed.zero_stage=0 with precision={ds.precision} on {cfg.model.name} (no BatchNorm: "
                         "low-precision weights): use zero_stage 1 or 2, or precision fp32")
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * ds.grad_accum_steps * world_size,
        # Stage 0: GuardedAdamW clips (and skips non-finite steps) itself; see build_engine.
        "gradient_clipping": cfg.optim.grad_clip if ds.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16" and not has_batchnorm},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "torch_autocast": {"enabled": ds.precision == "bf16" and has_batchnorm, "dtype": "bfloat16"},
        # torch AdamW is not on DeepSpeed's list of tested ZeRO optimizers; it is what we run.
        "zero_allow_untested_optimizer": True,
        # With offload, DeepSpeed would insist on its CPUAdam (a 55 s JIT build); torch AdamW
        # runs on the offloaded fp32 partitions correctly, if slower on GPU nodes.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    _deep_merge(config, ds.raw)
    return config


def _deep_merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def build_engine(cfg: JobConfig, model: nn.Module, world_size: int):
    """deepspeed.initialize over `model` with AdamW param groups and the cosine LambdaLR."""
    if moe_layers(model):
        check_moe_deepspeed(cfg, source="the job's deepspeed section")
    ds_config = build_ds_config(cfg, world_size, model)
    with _without_shm_op_print():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if cfg.deepspeed.ep_size > 1:
        _setup_expert_parallel(cfg, model, world_size)
    param_groups = build_param_groups(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                      layer_decay=cfg.optim.layer_decay)
    if cfg.deepspeed.ep_size > 1:
        from pnet_dist.moe_deepspeed import moe_param_groups
        param_groups = moe_param_groups(param_groups)
    adamw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    if cfg.deepspeed.zero_stage == 0:
        optimizer = GuardedAdamW(param_groups, max_grad_norm=cfg.optim.grad_clip, **adamw)
    else:
        optimizer = torch.optim.AdamW(param_groups, **adamw)
    scheduler = build_lr_scheduler(optimizer, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                   warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine


def _setup_expert_parallel(cfg: JobConfig, model: nn.Module, world_size: int) -> None:
    """Expert groups and this rank's experts (pnet_dist.moe_deepspeed), before the optimizer exists."""
    from pnet_dist import moe_deepspeed

    ep_size = cfg.deepspeed.ep_size
    if not moe_layers(model):
        raise ValueError(f"deepspeed.ep_size={ep_size} but model {cfg.model.name!r} has no MoE layers; "
                         "set deepspeed.ep_size=1")
    if world_size % ep_size:
        raise ValueError(f"deepspeed.ep_size={ep_size} must divide the number of ranks ({world_size})")
    moe_deepspeed.setup_expert_parallel(model, ep_size)


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged if finite; otherwise a loss whose gradients are all NaN, so DeepSpeed's
    overflow check discards the whole step (every accumulated micro-batch).

    A multiplier of 1 or NaN, not a branch on the value: no host sync per micro-batch, and every
    rank still runs backward, keeping ZeRO's reduction collectives and micro-step counter in
    lock-step. Multiplying (not adding) matters: an inf loss can have finite gradients.
    """
    scale = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
    return loss * scale
