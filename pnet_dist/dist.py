"""Rank/world helpers over torch.distributed: set-up from the environment, collectives on scalars.

Owns process-group set-up for the two ways a run starts: torchrun (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK in the environment) and Ray Train (the group already exists).

torchrun --max-restarts: by default the workers of every restart round build their process group
in the rendezvous's shared TCP store under the same keys as the round before, so a restarted gloo
group reads the dead round's addresses ("Gloo connectFullMesh failed ... Connection refused,
remote=[127.0.0.1]:<port of the previous round>") and every restart fails. With
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment each round gets a store of its own,
and restarts resume. A run with restarts but without that setting is refused at start, naming it.

A plain `python -m pnet_dist.train` without either runs as a world of one on 127.0.0.1. Teardown
destroys only a group this module created, after an explicit barrier (without it ~1 in 8 two-rank
gloo runs aborted at exit, see STACK.md).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

_CREATED_HERE = False
T = TypeVar("T")


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Join the process group described by the environment, unless one exists already."""
    global _CREATED_HERE
    if dist.is_initialized():
        # DeepSpeed insists on LOCAL_RANK; a group made by another launcher may not have set it.
        os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))
        return
    check_torchrun_restarts(os.environ)
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    _CREATED_HERE = True


def check_torchrun_restarts(env) -> None:
    """ValueError if torchrun may restart this worker group into its shared store (see the docstring)."""
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ValueError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                         "environment: with the shared rendezvous store every restarted group fails to connect (it reads the "
                         "previous round's addresses). Run: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun "
                         "--max-restarts=N ... -m pnet_dist.train JOB.yaml (see README, Preemption and resume)")


def teardown() -> None:
    """Barrier, then destroy the process group if this module created it."""
    global _CREATED_HERE
    if dist.is_initialized() and _CREATED_HERE:
        dist.barrier()
        dist.destroy_process_group()
        _CREATED_HERE = False


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return get_rank() == 0


def device() -> torch.device:
    """This rank's compute device: its GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def sum_and_average(stats: torch.Tensor, average: list[torch.Tensor] = ()) -> list[float]:
    """Sum the `stats` vector over ranks (returned as floats) and replace each tensor in `average`
    by its mean over ranks, in place -- all in ONE collective, in float64."""
    return start_sum_and_average(stats, average).wait()


class PendingSum:
    """A `start_sum_and_average` in flight; `wait()` finishes it and returns the summed stats."""

    def __init__(self, flat: torch.Tensor, work, num_stats: int, groups: dict[torch.dtype, list[torch.Tensor]]):
        self.flat, self.work, self.num_stats, self.groups = flat, work, num_stats, groups

    @torch.no_grad()
    def wait(self) -> list[float]:
        if self.work is not None:
            self.work.wait()
            world_size, offset = get_world_size(), self.num_stats
            for group in self.groups.values():
                size = sum(t.numel() for t in group)
                means = (self.flat[offset:offset + size] / world_size).to(group[0].device, group[0].dtype)
                torch._foreach_copy_(group, split_like(means, group))
                offset += size
        return self.flat[:self.num_stats].tolist()


@torch.no_grad()
def start_sum_and_average(stats: torch.Tensor, average: list[torch.Tensor] = ()) -> PendingSum:
    """`sum_and_average` as an asynchronous collective: the values are taken now, the caller computes
    on while the collective travels, and wait() sets each tensor of `average` to the mean over ranks
    of its value at the start (overwriting whatever it was changed to in between).

    A fixed handful of ops whatever the number of tensors (per dtype: one cat, one split, one
    foreach copy): the loop calls this every step with every BatchNorm buffer, and ops per buffer
    were most of what the loop added to DeepSpeed's step (tools/bench_engine.py profile)."""
    world_size = get_world_size()
    device = _collective_device()
    groups = by_dtype(average) if world_size > 1 else {}
    parts = [stats.reshape(-1)] + [torch.cat([t.reshape(-1) for t in group]) for group in groups.values()]
    flat = torch.cat([part.to(device, torch.float64) for part in parts])
    work = dist.all_reduce(flat, async_op=True) if world_size > 1 else None
    return PendingSum(flat, work, stats.numel(), groups)


def by_dtype(tensors) -> dict[torch.dtype, list[torch.Tensor]]:
    """`tensors` grouped by dtype, in order: each group can be one flat tensor (torch.cat)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def split_like(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the flat tensor, one per tensor of `tensors`, in its order and shape."""
    pieces = flat.split([t.numel() for t in tensors])
    return [p if p.shape == t.shape else p.view_as(t) for t, p in zip(tensors, pieces)]


def broadcast_object(obj):
    """rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_decides(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 and give its result -- or its error -- to every rank: a failure on rank 0
    raises everywhere instead of leaving the other ranks waiting in the broadcast."""
    outcome: tuple[str, Any] | None = None
    error = None
    if get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
            error = exc
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    status, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device()
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
