"""TensorBoard writing (local and s3://) read back with TensorBoard's EventAccumulator; throughput/MFU."""
from __future__ import annotations

import pytest
import torch

from pnet_dist.metrics import (TAG_GROUPS, MetricsWriter, ThroughputMeter, moe_lines, peak_flops_per_rank,
                               read_events, read_scalars)

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


def test_groups_sort_in_reading_order_and_multi_line_charts_are_runs(tmp_path):
    from pnet_dist.models import create_model, moe_stats
    model = create_model("pnet_llama_debug_up_e4")            # 2 MoE layers of 4 experts
    model(torch.randint(0, 512, (2, 16)))
    writer = MetricsWriter(str(tmp_path / "tb"), enabled=True)
    writer.scalars(5, {"ckpt/save_s": 0.5, "perf/step_time_s": 0.1, "step/grad_norm": 1.0, "eval/loss": 2.0,
                       "train/samples_per_s": 90.0, "train/loss": 2.5, "train/lr": 1e-3})
    writer.scalars(5, {"eval/loss": 2.1}, run="ema")
    for name, lines in moe_lines(moe_stats(model)).items():
        writer.lines(5, name, lines)
    writer.close()
    runs = read_events(str(tmp_path / "tb"))
    # TensorBoard sorts groups by name: the writer's prefixes make that the reading order.
    groups = sorted({tag.split("/")[0] for run in runs.values() for tag in run})
    assert groups == ["1_train", "2_eval", "3_moe", "4_moe_load", "5_step", "6_perf", "7_ckpt"]
    assert [g.split("_", 1)[1] for g in groups] == list(TAG_GROUPS)
    assert sorted(runs["."]) == ["1_train/loss", "1_train/lr", "1_train/samples_per_s", "2_eval/loss",
                                 "5_step/grad_norm", "6_perf/step_time_s", "7_ckpt/save_s"]
    # One chart per MoE layer with a line (run) per expert; one chart per cross-layer figure with a
    # line per layer; no capacity factor, so no dropped-fraction chart (always 0).
    charts = {tag: sorted(run for run, tags in runs.items() if tag in tags) for tags in runs.values() for tag in tags}
    experts, layers = [f"expert_{e}" for e in range(4)], ["layer_00", "layer_01"]
    assert charts["4_moe_load/layer_00"] == charts["4_moe_load/layer_01"] == experts
    assert charts["3_moe/router_entropy"] == charts["3_moe/max_min_load_ratio"] == layers
    assert charts["2_eval/loss"] == [".", "ema"]
    assert len(charts) == 7 + 2 + 2
    loads = [runs[e]["4_moe_load/layer_01"][0][1] for e in experts]
    assert sum(loads) == pytest.approx(1.0)
    assert read_scalars(str(tmp_path / "tb"), run="ema") == {"eval/loss": [(5, pytest.approx(2.1))]}


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
    assert out["train/tokens_per_s"] == pytest.approx(out["train/samples_per_s"] * 100)
    per_rank_flops = out["train/samples_per_s"] / 2 * 1e9
    assert out["train/mfu"] == pytest.approx(per_rank_flops / 1e12)
    assert out["perf/tflops_per_rank"] == pytest.approx(per_rank_flops / 1e12)
    assert 0.0 <= out["perf/data_wait_frac"] <= 1.0
    assert meter.steps == 0 and meter.samples == 0          # the interval restarted


def test_peak_flops():
    assert peak_flops_per_rank(torch.device("cpu"), "bf16", None) is None
    assert peak_flops_per_rank(torch.device("cpu"), "fp32", 2.0) == 2e12
