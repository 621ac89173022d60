"""Training metrics: TensorBoard scalars on rank 0, throughput/MFU/data-wait accounting.

TensorBoard lives here and nowhere else. The writer always writes event files to a local folder:
an s3:// logdir is served by a local staging folder that is uploaded through pnet_dist.storage
every `sync_every_s` and at close -- TensorBoard's own S3 writer re-uploads the whole event file
on every flush (STACK.md), and our storage layer brings retries and the endpoint configuration.

MFU = achieved model FLOP/s per rank / peak FLOP/s per rank, with model FLOPs counted, not
measured, as the task reports them per sample (vision: counted MACs x 2 FLOPs x 3 for forward +
backward; language: 6 x active parameters x tokens). The peak comes from
metrics.peak_tflops_per_rank, else a table of known GPUs; on a CPU without an explicit peak MFU
is not logged.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from pnet_dist import storage


# Dense bf16/fp16 tensor-core peaks (vendor datasheets, SXM parts).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops_per_rank(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one rank for MFU, or None when unknown (then MFU is not logged)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class MetricsWriter:
    """Scalars to TensorBoard from rank 0; every method is a no-op on other ranks."""

    def __init__(self, logdir: str, *, enabled: bool, sync_every_s: float = 60.0):
        self.logdir = logdir
        self.enabled = enabled
        self.sync_every_s = sync_every_s
        self._writer: SummaryWriter | None = None
        self._remote: storage.Storage | None = None
        self._staging: tempfile.TemporaryDirectory | None = None
        self._last_sync = time.monotonic()
        if not enabled:
            return
        if storage.is_s3(logdir):
            self._remote = storage.open_storage(logdir)
            self._staging = tempfile.TemporaryDirectory(prefix="pnet_tb_")
            local_dir = self._staging.name
        else:
            local_dir = logdir
            Path(local_dir).mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=local_dir, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        if self._remote is not None and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Flush event files; for an s3:// logdir, upload them (whole files: S3 has no append)."""
        if self._writer is None:
            return
        self._writer.flush()
        if self._remote is not None:
            for path in sorted(Path(self._staging.name).rglob("*")):
                if path.is_file():
                    self._remote.put_file(path, str(path.relative_to(self._staging.name)))
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._writer is None:
            return
        self.sync()
        self._writer.close()
        self._writer = None
        if self._staging is not None:
            self._staging.cleanup()


@dataclass
class ThroughputMeter:
    """Accumulates one logging interval of this rank: wall time, time blocked on data, steps,
    samples, tokens."""

    flops_per_sample: float
    peak_flops: float | None
    world_size: int
    steps: int = 0
    data_wait_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    _start: float = field(default_factory=time.perf_counter)

    def add(self, *, data_wait_s: float, samples: int, tokens: int) -> None:
        self.steps += 1
        self.data_wait_s += data_wait_s
        self.samples += samples
        self.tokens += tokens

    def restart(self) -> None:
        """Leave time spent outside training steps (eval, checkpoints) out of the next interval."""
        self.steps, self.data_wait_s, self.samples, self.tokens = 0, 0.0, 0, 0
        self._start = time.perf_counter()

    def summary(self) -> dict[str, float]:
        """Rates of the interval (global: this rank's counts x world size), then restart."""
        wall = max(time.perf_counter() - self._start, 1e-9)
        out = {
            "perf/samples_per_s": self.samples * self.world_size / wall,
            "perf/data_wait_frac": self.data_wait_s / wall,
            "perf/step_time_s": wall / max(self.steps, 1),
        }
        if self.tokens:
            out["perf/tokens_per_s"] = self.tokens * self.world_size / wall
        flops_per_s_per_rank = self.samples * self.flops_per_sample / wall
        out["perf/tflops_per_rank"] = flops_per_s_per_rank / 1e12
        if self.peak_flops:
            out["perf/mfu"] = flops_per_s_per_rank / self.peak_flops
        self.restart()
        return out


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `logdir` (local or s3://), read with TensorBoard's
    EventAccumulator: {tag: [(step, value), ...]} in file order."""
    with tempfile.TemporaryDirectory(prefix="pnet_tb_read_") as tmp:
        local = logdir
        if storage.is_s3(logdir):
            remote = storage.open_storage(logdir)
            for key in remote.list():
                remote.get_file(key, os.path.join(tmp, key))
            local = tmp
        scalars: dict[str, list[tuple[int, float]]] = {}
        for event_dir in sorted({p.parent for p in Path(local).rglob("events.out.tfevents.*")}):
            accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        return scalars
