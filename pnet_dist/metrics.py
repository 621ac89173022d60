"""Training metrics: TensorBoard scalars on rank 0, throughput/MFU/data-wait accounting.

TensorBoard lives here and nowhere else. The writer always writes event files to a local folder:
an s3:// logdir is served by a local staging folder that is uploaded through pnet_dist.storage
every `sync_every_s` and at close -- TensorBoard's own S3 writer re-uploads the whole event file
on every flush (STACK.md), and our storage layer brings retries and the endpoint configuration.

Layout on TensorBoard's pages. Callers name a metric "<group>/<name>" (train/loss, ckpt/save_s);
TensorBoard groups charts by the part before the first "/" and sorts the groups by name, so the
writer prefixes each group with its place in TAG_GROUPS ("1_train/loss" ... "7_ckpt/save_s"), the
way TensorBoard's maintainers suggest for controlling that order (tensorflow/tensorboard#865):
loss, lr and throughput first, then eval, routing, and the timing and storage details last.
Several lines in one chart (one per expert, per MoE layer, the EMA beside the model) are the same
tag in several runs: `lines()` writes each line into its own sub-folder of the logdir, which
TensorBoard shows as a run and overlays on every chart with that tag. Series that do not change
during a run (the eval set's size) are not written.

MFU = achieved model FLOP/s per rank / peak FLOP/s per rank, with model FLOPs counted, not
measured, as the task reports them per sample (vision: counted MACs x 2 FLOPs x 3 for forward +
backward; language: 6 x active parameters x tokens). The peak comes from
metrics.peak_tflops_per_rank, else a table of known GPUs; on a CPU without an explicit peak MFU
is not logged.
"""
from __future__ import annotations

import os
import re
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


# Reading order of the tag groups (see the module docstring).
TAG_GROUPS = ("train", "eval", "moe", "moe_load", "step", "perf", "ckpt")
ROOT_RUN = "."          # TensorBoard's name for the event files directly in the logdir
_GROUP_PLACE = re.compile(r"^\d+_")


def display_tag(name: str) -> str:
    """The TensorBoard tag of metric "<group>/<name>": its group prefixed with its place."""
    group = name.partition("/")[0]
    assert group in TAG_GROUPS, f"metric {name!r}: its group is not one of {TAG_GROUPS}"
    return f"{TAG_GROUPS.index(group) + 1}_{name}"


class MetricsWriter:
    """Scalars to TensorBoard from rank 0; every method is a no-op on other ranks."""

    def __init__(self, logdir: str, *, enabled: bool, sync_every_s: float = 60.0):
        self.logdir = logdir
        self.enabled = enabled
        self.sync_every_s = sync_every_s
        self._writers: dict[str, SummaryWriter] = {}
        self._local_dir: str | None = None
        self._remote: storage.Storage | None = None
        self._staging: tempfile.TemporaryDirectory | None = None
        self._last_sync = time.monotonic()
        if not enabled:
            return
        if storage.is_s3(logdir):
            self._remote = storage.open_storage(logdir)
            self._staging = tempfile.TemporaryDirectory(prefix="pnet_tb_")
            self._local_dir = self._staging.name
        else:
            self._local_dir = logdir
            Path(logdir).mkdir(parents=True, exist_ok=True)
        self._run_writer(ROOT_RUN)

    def _run_writer(self, run: str) -> SummaryWriter:
        if run not in self._writers:
            self._writers[run] = SummaryWriter(log_dir=os.path.join(self._local_dir, run), flush_secs=30)
        return self._writers[run]

    def scalars(self, step: int, values: dict[str, float], run: str = ROOT_RUN) -> None:
        """One point per metric ("<group>/<name>": value) at `step`, in `run` (a line of its charts)."""
        if self._local_dir is None:
            return
        writer = self._run_writer(run)
        for name, value in values.items():
            writer.add_scalar(display_tag(name), value, global_step=step)
        if self._remote is not None and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def lines(self, step: int, name: str, values: dict[str, float]) -> None:
        """One chart `name` with a line per key of `values` (each key is a run)."""
        for run, value in values.items():
            self.scalars(step, {name: value}, run=run)

    def sync(self) -> None:
        """Flush event files; for an s3:// logdir, upload them (whole files: S3 has no append)."""
        if self._local_dir is None:
            return
        for writer in self._writers.values():
            writer.flush()
        if self._remote is not None:
            for path in sorted(Path(self._local_dir).rglob("*")):
                if path.is_file():
                    self._remote.put_file(path, str(path.relative_to(self._local_dir)))
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._local_dir is None:
            return
        self.sync()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._local_dir = None
        if self._staging is not None:
            self._staging.cleanup()


def moe_lines(stats: dict[str, list]) -> dict[str, dict[str, float]]:
    """Charts of pnet_dist.models.moe.moe_stats: {chart name: {line (run): value}}.

    Figures compared across layers (router entropy, max/min expert load, dropped fraction) are one
    chart each with a line per layer; each layer's expert load is one chart with a line per expert.
    """
    charts: dict[str, dict[str, float]] = {}
    for key in ("router_entropy", "max_min_load_ratio", "dropped_frac"):
        if key in stats:
            charts[f"moe/{key}"] = {f"layer_{k:02d}": value for k, value in enumerate(stats[key])}
    for k, loads in enumerate(stats.get("expert_load", [])):
        charts[f"moe_load/layer_{k:02d}"] = {f"expert_{e}": value for e, value in enumerate(loads)}
    return charts


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
            "train/samples_per_s": self.samples * self.world_size / wall,
            "perf/data_wait_frac": self.data_wait_s / wall,
            "perf/step_time_s": wall / max(self.steps, 1),
        }
        if self.tokens:
            out["train/tokens_per_s"] = self.tokens * self.world_size / wall
        flops_per_s_per_rank = self.samples * self.flops_per_sample / wall
        out["perf/tflops_per_rank"] = flops_per_s_per_rank / 1e12
        if self.peak_flops:
            out["train/mfu"] = flops_per_s_per_rank / self.peak_flops
        self.restart()
        return out


def read_events(logdir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every scalar in the event files under `logdir` (local or s3://), read with TensorBoard's
    EventAccumulator: {run: {tag as TensorBoard shows it: [(step, value), ...]}}; the logdir's own
    event files are run "."."""
    with tempfile.TemporaryDirectory(prefix="pnet_tb_read_") as tmp:
        local = logdir
        if storage.is_s3(logdir):
            remote = storage.open_storage(logdir)
            for key in remote.list():
                remote.get_file(key, os.path.join(tmp, key))
            local = tmp
        runs: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for event_dir in sorted({p.parent for p in Path(local).rglob("events.out.tfevents.*")}):
            accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
            accumulator.Reload()
            scalars = runs.setdefault(str(event_dir.relative_to(local)), {})
            for tag in accumulator.Tags()["scalars"]:
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        return runs


def read_scalars(logdir: str, run: str = ROOT_RUN) -> dict[str, list[tuple[int, float]]]:
    """The scalars of one run under `logdir` by metric name as logged ("train/loss", without the
    group's place that the writer puts in front): {name: [(step, value), ...]} in file order."""
    return {_GROUP_PLACE.sub("", tag): points for tag, points in read_events(logdir).get(run, {}).items()}
