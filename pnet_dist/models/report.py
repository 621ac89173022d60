"""Model report: one row per registered model -- params, MACs, CPU latency at batch 1.

Owns the timing helper shared with tools/bench_dynamic_conv.py (`median_seconds`, CUDA-synced).
Params and MACs come from pnet_dist.models.counting, on a meta build (nothing allocated).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pnet_dist.models.counting import ModelCounts, count_model, count_token_model, image_input
from pnet_dist.models.registry import create_model, list_models


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1,
                   device: str | torch.device = "cpu") -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls.

    On CUDA each call is bracketed by CUDA events and the stream is synchronised, so queued
    kernels are timed, not just their launch.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    is_cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if is_cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# The papers' own figures, shown beside ours for comparison (never used in any computation).
PAPER_FIGURES = {
    "parameternet_600m": "~600M FLOPs",
    "ghostnet_600m": "~580M FLOPs",
    "parameternet_300m": "~300M FLOPs",
    "ghostnet_300m": "~290M FLOPs",
    "llama_1b": "0.94B, 919 GFLOPs/seq",
    **{f"pnet_llama_1b_{p}_e{e}": f"{'1.54B' if e == 4 else '2.35B'}" for p in ("gate", "up", "down") for e in (4, 8)},
}

LATENCY_TOKENS = 128


@dataclass
class ReportRow:
    name: str
    family: str                      # "vision" | "token"
    counts: ModelCounts
    per: str                         # what one sample is: "image 224x224" or "seq 2048"
    macs_per_token: int | None       # token models: MACs per token without attention
    latency_ms: float | None
    note: str = ""
    paper: str = ""
    gflops_seq512: float | None = None  # token models: 2 x MACs of one 512-token sequence


def model_family(name: str, model: nn.Module) -> str:
    if hasattr(model, "input_size"):
        return "vision"
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "max_seq_len") and hasattr(cfg, "vocab_size"):
        return "token"
    raise ValueError(f"model {name!r} has neither `input_size` (vision) nor `cfg.max_seq_len`/`cfg.vocab_size` "
                     "(token model); give it one of them so the report knows its input")


def _latency_input(family: str, model: nn.Module) -> torch.Tensor:
    if family == "vision":
        return image_input(model, batch=1, device="cpu")
    seq_len = min(LATENCY_TOKENS, model.cfg.max_seq_len)
    return torch.randint(0, model.cfg.vocab_size, (1, seq_len))


def report_row(name: str, latency: bool = True, repeats: int = 7, max_latency_params: float = 100e6) -> ReportRow:
    """Count one registered model on the meta device; time it at batch 1 on the CPU if small enough."""
    meta_model = create_model(name, device="meta")
    family = model_family(name, meta_model)
    if family == "vision":
        counts = count_model(meta_model, image_input(meta_model))
        per = "image {}x{}".format(*meta_model.input_size[1:])
        macs_per_token = None
    else:
        seq_len = meta_model.cfg.max_seq_len
        counts = count_token_model(meta_model, seq_len)
        per = f"seq {seq_len}"
        macs_per_token = (counts.macs - counts.macs_by_kind.get("attention", 0)) // seq_len
    row = ReportRow(name, family, counts, per, macs_per_token, None, paper=PAPER_FIGURES.get(name, ""))
    if family == "token":
        row.gflops_seq512 = 2 * count_token_model(meta_model, 512).macs / 1e9
    if not latency:
        return row
    if counts.params > max_latency_params:
        row.note = f"latency skipped: {counts.params / 1e6:.0f}M params > {max_latency_params / 1e6:.0f}M"
        return row
    del meta_model
    model = create_model(name, device="cpu").eval()
    example = _latency_input(family, model)
    with torch.inference_mode():
        row.latency_ms = 1e3 * median_seconds(lambda: model(example), repeats=repeats, warmup=2)
    if family == "token":
        row.note = f"latency at {example.shape[1]} tokens"
    return row


def build_report(names: list[str] | None = None, latency: bool = True, repeats: int = 7,
                 max_latency_params: float = 100e6) -> list[ReportRow]:
    """One row per registered model (or per name in `names`)."""
    names = list_models() if names is None else names
    return [report_row(name, latency=latency, repeats=repeats, max_latency_params=max_latency_params)
            for name in names]


def _human(value: float, billion: str = "G") -> str:
    """1234567 -> '1.23M'; parameters use 'B' for billions, MACs 'G' (as in the papers)."""
    for scale, suffix in ((1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def format_report(rows: list[ReportRow]) -> str:
    """A fixed-width table plus notes."""
    header = (f"{'model':<26}{'params':>9}{'experts':>9}{'MACs':>9}  {'per':<15}{'MACs/tok':>9}"
              f"{'ms@b1':>9}  {'paper':<22}note")
    lines = [header, "-" * len(header)]
    for row in rows:
        latency = f"{row.latency_ms:.1f}" if row.latency_ms is not None else "-"
        per_token = _human(row.macs_per_token) if row.macs_per_token is not None else "-"
        lines.append(f"{row.name:<26}{_human(row.counts.params, 'B'):>9}{_human(row.counts.expert_params, 'B'):>9}"
                     f"{_human(row.counts.macs):>9}  {row.per:<15}{per_token:>9}{latency:>9}  "
                     f"{row.paper:<22}{row.note}")
    lines.append("")
    lines.append("params: all parameters; experts: dynamic-conv expert kernels / MoE expert weights (included in "
                 "params).")
    lines.append("MACs: per image (vision) or per sequence at max_seq_len (token models, full TxT attention); "
                 "MACs/tok: per token without attention. FLOPs = 2 x MACs for token models; the vision papers' "
                 "'FLOPs' are MACs.")
    lines.append("ms@b1: CPU forward latency at batch 1 (median), torch threads = "
                 f"{torch.get_num_threads()}.")
    seq512 = [f"{row.name} {row.gflops_seq512:.1f}" for row in rows if row.gflops_seq512 and row.paper]
    if seq512:
        lines.append("GFLOPs per 512-token sequence (2 x MACs; the paper's LLaMA-1B figure is 919): " + ", ".join(seq512))
    for row in rows:
        if row.family == "vision" and "mixing" in row.counts.macs_by_kind:
            kinds = ", ".join(f"{kind} {_human(macs)}" for kind, macs in row.counts.macs_by_kind.items())
            lines.append(f"{row.name}: {kinds}")
    return "\n".join(lines)
