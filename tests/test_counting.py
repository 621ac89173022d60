"""Parameter/MAC counting against the paper's figures and against torch's independent FLOP counter;
the model report over the whole registry."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pnet_dist.models import create_model, list_models
from pnet_dist.models.counting import count_macs, count_model, count_token_macs, count_token_model, image_input
from pnet_dist.models.report import build_report, format_report

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def counts_of(name: str, **kwargs):
    model = create_model(name, device="meta", **kwargs)
    return count_model(model, image_input(model))


def test_parameternet_600m_matches_paper():
    counts = counts_of("parameternet_600m")
    assert counts.params == pytest.approx(34.50e6, rel=0.01)
    assert counts.expert_params == pytest.approx(19.41e6, rel=0.01)
    assert counts.macs == pytest.approx(0.59e9, rel=0.02)
    kinds = counts.macs_by_kind
    assert kinds["conv"] + kinds["linear"] == pytest.approx(570.1e6, rel=0.001)
    assert kinds["mixing"] == pytest.approx(19.4e6, rel=0.01)
    assert kinds["routing"] == pytest.approx(0.12e6, rel=0.05)


def test_ghostnet_600m_matches_paper():
    counts = counts_of("ghostnet_600m")
    assert counts.params == pytest.approx(19.82e6, rel=0.01)
    assert counts.macs == pytest.approx(570e6, rel=0.01)
    assert counts.expert_params == 0 and set(counts.macs_by_kind) == {"conv", "linear"}


def test_imagenet22k_head_size():
    head_22k = counts_of("parameternet_600m", num_classes=21841).params - counts_of("parameternet_600m", num_classes=0).params
    assert head_22k == pytest.approx(27.98e6, rel=0.001)


def test_300m_width_reproduces_paper_ablation():
    one_expert = counts_of("parameternet_300m", num_experts=1)
    eight_experts = counts_of("parameternet_300m", num_experts=8)
    static = counts_of("ghostnet_300m")
    assert one_expert.params == pytest.approx(8.6e6, rel=0.01)
    assert eight_experts.params == pytest.approx(25.2e6, rel=0.01)
    assert eight_experts.macs - static.macs == pytest.approx(19e6, rel=0.05)
    assert static.macs == pytest.approx(290e6, rel=0.05)
    assert counts_of("parameternet_300m").macs == pytest.approx(300e6, rel=0.05)


@pytest.mark.parametrize("name", ["parameternet_debug", "ghostnet_debug"])
def test_vision_hooks_equal_torch_flop_counter(name):
    # An independent count on a real forward: torch's dispatch-level FLOP counter sees the
    # mixing matmul, the bmm/unfold/grouped convs and the routers; its FLOPs are 2 x MACs.
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = torch.randn(3, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    ours = count_macs(model, images)
    assert sum(ours.values()) * images.shape[0] * 2 == counter.get_total_flops()
    assert ours == count_macs(create_model(name, device="meta"), image_input(model))


@pytest.mark.parametrize("name", ["llama_debug", "pnet_llama_debug_up_e4", "pnet_llama_debug_down_e8"])
def test_token_analytic_count_equals_hooks_and_torch_counter(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    seq_len = 48
    tokens = torch.randint(0, model.cfg.vocab_size, (2, seq_len))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(tokens)
    hooked = count_macs(model, tokens)  # real top-1 routing: each expert sees its own tokens
    analytic = count_token_macs(model, seq_len)
    assert hooked == {kind: macs for kind, macs in analytic.items() if kind != "attention"}
    assert sum(analytic.values()) * tokens.shape[0] * 2 == counter.get_total_flops()


def test_llama_1b_counts_on_meta():
    counts = count_token_model(create_model("llama_1b", device="meta"), 512)
    assert counts.params == pytest.approx(0.94e9, rel=0.01)
    assert 2 * counts.macs == pytest.approx(919e9, rel=0.01)  # the paper's per-sequence GFLOPs
    moe = count_token_model(create_model("pnet_llama_1b_up_e8", device="meta"), 512)
    assert moe.params == pytest.approx(2.35e9, rel=0.01)
    assert moe.macs == pytest.approx(counts.macs, rel=0.001)  # top-1: FLOPs stay the same


def test_report_rows_for_every_family():
    rows = build_report(["parameternet_debug", "ghostnet_debug", "llama_debug", "pnet_llama_debug_up_e4",
                         "llama_1b"], repeats=1)
    by_name = {row.name: row for row in rows}
    assert by_name["parameternet_debug"].latency_ms > 0 and by_name["parameternet_debug"].per == "image 32x32"
    assert by_name["parameternet_debug"].counts.expert_params > 0
    assert by_name["llama_debug"].per == "seq 128" and by_name["llama_debug"].latency_ms > 0
    assert by_name["llama_1b"].latency_ms is None and "skipped" in by_name["llama_1b"].note
    table = format_report(rows)
    assert all(name in table for name in by_name)


def test_report_tool_runs_over_the_whole_registry(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["model_report.py", "--no-latency"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / "model_report.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    monkeypatch.setattr(sys, "argv", ["model_report.py", "--models", "no_such_model"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "tools" / "model_report.py"), run_name="__main__")
    assert "no_such_model" in capsys.readouterr().err
