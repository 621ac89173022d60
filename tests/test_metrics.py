"""TensorBoard writing (local and s3://) read back with TensorBoard's EventAccumulator; throughput/MFU."""
from __future__ import annotations

import pytest
import torch

from pnet_dist.metrics import MetricsWriter, ThroughputMeter, peak_flops_per_rank, read_scalars

pytestmark = pytest.mark.unit


def test_local_event_files_hold_every_scalar(tmp_path):
    writer = MetricsWriter(str(tmp_path / "tb"), enabled=True)
    for step in (1, 2, 3):
        writer.scalars(step, {"train/loss": 1.0 / step, "train/lr": 0.1 * step})
    writer.close()
    scalars = read_scalars(str(tmp_path / "tb"))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([0.1, 0.2, 0.3])


def test_disabled_writer_on_other_ranks_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "tb"), enabled=False)
    writer.scalars(1, {"train/loss": 1.0})
    writer.close()
    assert not (tmp_path / "tb").exists()


def test_s3_logdir_is_staged_locally_and_uploaded(s3_bucket):
    logdir = f"{s3_bucket}/run/tb"
    writer = MetricsWriter(logdir, enabled=True, sync_every_s=3600)
    writer.scalars(1, {"eval/top1": 12.5})
    assert read_scalars(logdir) == {}          # nothing uploaded before a sync
    writer.sync()
    assert read_scalars(logdir)["eval/top1"] == [(1, 12.5)]
    writer.scalars(2, {"eval/top1": 50.0})
    writer.close()
    assert read_scalars(logdir)["eval/top1"] == [(1, 12.5), (2, 50.0)]


def test_throughput_summary_is_consistent():
    meter = ThroughputMeter(flops_per_sample=1e9, peak_flops=1e12, world_size=2)
    meter.add(data_wait_s=0.0, samples=8, tokens=800)
    meter.add(data_wait_s=0.0, samples=8, tokens=800)
    out = meter.summary()
    assert out["perf/tokens_per_s"] == pytest.approx(out["perf/samples_per_s"] * 100)
    per_rank_flops = out["perf/samples_per_s"] / 2 * 1e9
    assert out["perf/mfu"] == pytest.approx(per_rank_flops / 1e12)
    assert out["perf/tflops_per_rank"] == pytest.approx(per_rank_flops / 1e12)
    assert 0.0 <= out["perf/data_wait_frac"] <= 1.0
    assert meter.steps == 0 and meter.samples == 0          # the interval restarted


def test_peak_flops():
    assert peak_flops_per_rank(torch.device("cpu"), "bf16", None) is None
    assert peak_flops_per_rank(torch.device("cpu"), "fp32", 2.0) == 2e12
