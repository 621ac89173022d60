"""Print one table of every registered model: params, MACs, CPU latency at batch 1.

    python tools/model_report.py                         # all models (~1 min on 2 cores)
    python tools/model_report.py --models parameternet_600m ghostnet_600m
    python tools/model_report.py --no-latency            # counts only (meta device, seconds)

The logic lives in pnet_dist.models.report.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnet_dist.cli import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="registered model names (default: every one)")
    parser.add_argument("--no-latency", action="store_true", help="skip the CPU timing")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per model (median)")
    parser.add_argument("--max-latency-params", type=float, default=100e6,
                        help="time only models with at most this many parameters")
    args = parser.parse_args()
    from pnet_dist.models import list_models   # torch: after --help
    from pnet_dist.models.report import build_report, format_report
    unknown = sorted(set(args.models or []) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    started = time.perf_counter()
    rows = build_report(args.models, latency=not args.no_latency, repeats=args.repeats,
                        max_latency_params=args.max_latency_params)
    print(format_report(rows))
    print(f"report took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(run(main))
