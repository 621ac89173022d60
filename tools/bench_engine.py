"""Benchmark: step time of pnet_dist's training loop (DeepSpeed ZeRO-2, 2 ranks) vs a plain torch DDP
loop with the same model, batch, loss, optimizer groups and schedule, measured in one run.

    python tools/bench_engine.py [--steps 40] [--warmup 10] [--rounds 2] [--skip-checkpoint]

Both loops read the same synthetic batches (pnet_dist.tasks.SyntheticLoader) and compute the
loss with the same task object, so the ratio is the cost of the engine around the model:
ZeRO-2 partitioned optimizer, the per-step stats collective, BatchNorm statistics averaging,
non-finite handling, metrics. Ours is timed by the loop's own meter (perf/step_time_s in its
TensorBoard files, first interval dropped as warm-up); the baselines per step, warm-up dropped.
A third loop, the bare DeepSpeed engine, splits the ratio into DeepSpeed's share and the loop's.
Loops alternate for --rounds rounds and the median per loop is reported. Target: ratio <= 1.05.

The checkpoint rows come from tools/bench_checkpoint.py, run by this script after the step-time
loops (one DeepSpeed rank, a moto S3 server on 127.0.0.1; its docstring says what is measured):
training blocked by an asynchronous checkpoint vs the duration of a synchronous save (target
<= 0.10), and checkpoint upload throughput vs a raw boto3 upload of the same bytes (target >= 0.9).

Rows: (name, measured, baseline, unit, ratio, target) with target [op, value] or None for rows
that only explain the one above them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05
OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}

CASES = {
    # name: job overrides on top of the base config below
    "parameternet_debug 32px, batch 32/rank": [
        "model.name=parameternet_debug", "data.kind=image", "data.image_size=32", "data.batch_size=32"],
    "pnet_llama_debug_up_e4 seq 128, batch 8/rank": [
        "model.name=pnet_llama_debug_up_e4", "data.kind=text", "data.seq_len=128", "data.batch_size=8"],
}


def base_config(workdir: str, run_name: str, steps: int, log_every: int, overrides: list[str]):
    from pnet_dist.config import apply_override, config_from_dict
    raw = {"run_name": run_name, "model": {"name": "x"}, "data": {"train_uri": "synthetic:"},
           "optim": {"warmup_steps": 2}, "train": {"max_steps": steps, "log_every_steps": 10_000},
           "deepspeed": {"zero_stage": 2, "precision": "fp32"},
           "checkpoint": {"uri": workdir, "every_steps": 10_000_000, "async_upload": True},
           "metrics": {"log_every_steps": log_every}}
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw, source="bench_engine")


def time_ours(cfg) -> float:
    """Median per-step time of train_worker, from its own meter (TensorBoard), warm-up dropped."""
    from pnet_dist import dist
    from pnet_dist.metrics import read_scalars
    from pnet_dist.train import train_worker
    train_worker(cfg)
    if not dist.is_main():
        return float("nan")
    times = [value for _, value in read_scalars(cfg.metrics.logdir)["perf/step_time_s"]]
    return statistics.median(times[1:])


def median_step_time(cfg, warmup: int, task, model, backward_and_step) -> float:
    """Median per-step time (warm-up dropped) of: next batch, forward + loss with the task,
    backward_and_step(loss), loss.item() -- the baselines' loop, with ours' batches and seeds."""
    import torch

    from pnet_dist.train import BatchStream, micro_batch_seed

    rank = torch.distributed.get_rank()
    batches = BatchStream(task.build_loaders()[0])
    times = []
    for step in range(cfg.train.max_steps):
        started = time.perf_counter()
        _, (batch,) = batches.next(1)
        seed = micro_batch_seed(cfg.train.seed, step, rank)
        torch.manual_seed(seed)
        loss, _ = task.train_loss(model, batch, seed=seed)
        backward_and_step(loss)
        loss.item()
        times.append(time.perf_counter() - started)
    return statistics.median(times[warmup:])


def time_ddp(cfg, warmup: int) -> float:
    """Median per-step time of a plain DDP loop over the same model, data, loss and optimizer."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from pnet_dist.optim import build_lr_scheduler, build_param_groups
    from pnet_dist.tasks import build_task

    task = build_task(cfg)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model()
    optimizer = torch.optim.AdamW(build_param_groups(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay),
                                  lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = build_lr_scheduler(optimizer, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                   warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps)

    def backward_and_step(loss) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()

    return median_step_time(cfg, warmup, task, DistributedDataParallel(model), backward_and_step)


def time_bare_deepspeed(cfg, warmup: int) -> float:
    """Median per-step time of the bare DeepSpeed engine (pnet_dist.engine.build_engine) driven by
    a minimal loop: forward, backward, step, loss.item() -- no stats collective, no BatchNorm
    averaging, no skip handling, no metrics. Splits ours/DDP into DeepSpeed's share and ours."""
    import torch

    from pnet_dist.engine import build_engine
    from pnet_dist.tasks import build_task

    task = build_task(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, task.build_model(), torch.distributed.get_world_size())

    def backward_and_step(loss) -> None:
        engine.backward(loss)
        engine.step()

    return median_step_time(cfg, warmup, task, engine, backward_and_step)


def engine_vs_ddp(args, workdir: str) -> list[tuple[str, float, float, str]]:
    rows = []
    for index, (name, overrides) in enumerate(CASES.items()):
        ours, bare, baseline = [], [], []
        for round_index in range(args.rounds):
            cfg = base_config(workdir, f"bench_{index}_{round_index}", args.steps, args.warmup, overrides)
            baseline.append(time_ddp(cfg, args.warmup))
            bare.append(time_bare_deepspeed(cfg, args.warmup))
            ours.append(time_ours(cfg))
        ours_s, bare_s, ddp_s = (statistics.median(v) for v in (ours, bare, baseline))
        rows += [(f"step time, {name}: pnet_dist loop / DDP", ours_s, ddp_s, "s", ours_s / ddp_s, ["<=", TARGET_RATIO]),
                 ("  of which DeepSpeed: bare ZeRO-2 engine / DDP", bare_s, ddp_s, "s", bare_s / ddp_s, None),
                 ("  of which the loop: pnet_dist loop / bare engine", ours_s, bare_s, "s", ours_s / bare_s, None)]
    return rows


BENCHES = [engine_vs_ddp]


def worker(args) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")  # every loop below runs in this one group
    workdir = [tempfile.mkdtemp(prefix="bench_engine_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(workdir)
    rows = [row for bench in BENCHES for row in bench(args, workdir[0])]
    dist.barrier()
    if dist.get_rank() == 0:
        print("BENCH_ROWS " + json.dumps(rows), flush=True)
        shutil.rmtree(workdir[0], ignore_errors=True)
    dist.destroy_process_group()


def run_stage(cmd: list[str], env: dict[str, str]) -> list:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_ROWS ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"benchmark failed: {' '.join(cmd)} (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return json.loads(line[len("BENCH_ROWS "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped from the timing (also our log interval)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint-params-m", type=float, default=12.0,
                        help="model size of the checkpoint rows, millions of parameters")
    parser.add_argument("--checkpoint-repeats", type=int, default=5)
    parser.add_argument("--skip-checkpoint", action="store_true", help="only the step-time rows")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PNET_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    load_at_start = os.getloadavg()[0]
    rows = run_stage([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                      "--worker", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--rounds={args.rounds}"], env)
    if not args.skip_checkpoint:
        rows += run_stage([sys.executable, str(REPO / "tools" / "bench_checkpoint.py"), "--rows-json",
                           f"--params-m={args.checkpoint_params_m}", f"--repeats={args.checkpoint_repeats}"], env)
    print(f"step time: 2 ranks (gloo, CPU), ZeRO-2 fp32, {args.steps} steps, {args.warmup} warm-up, median of "
          f"{args.rounds} rounds; checkpoint: 1 rank, ZeRO-1, moto S3 on 127.0.0.1, median of "
          f"{args.checkpoint_repeats}; {os.cpu_count()} CPU cores, load average {load_at_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"| {'measure':<80} | {'measured':>12} | {'baseline':>12} | {'ratio':>6} | {'target':>12} |")
    print(f"|{'-' * 82}|{'-' * 14}|{'-' * 14}|{'-' * 8}|{'-' * 14}|")
    for name, ours, baseline, unit, ratio, target in rows:
        verdict = "" if target is None else f"{target[0]}{target[1]:g} {'ok' if OPS[target[0]](ratio, target[1]) else 'MISSED'}"
        print(f"| {name:<80} | {ours:>8.4f}{unit:>4} | {baseline:>8.4f}{unit:>4} | {ratio:>6.3f} | {verdict:>12} |")


if __name__ == "__main__":
    from pnet_dist.cli import run
    sys.exit(run(main))
