"""Benchmark: step time of pnet_dist's training loop (DeepSpeed at zero_stage 0, 1 and 2, 2 ranks) vs a
plain torch DDP loop with the same model, batch, loss, optimizer groups and schedule, in one run.

    python tools/bench_engine.py [--steps 60] [--warmup 10] [--rounds 5] [--skip-checkpoint]
                                 [--profile-steps 20] [--profile-top 12]
                                 [--cases vision,lm] [--stages 0,1,2]

--cases picks the models (vision, lm, and lm_long: the LM with 8x the tokens per step, to see
which part of a gap is a fixed cost per step); --stages the zero_stages timed.

Both loops read the same synthetic batches (pnet_dist.tasks.SyntheticLoader) and compute the
loss with the same task object, so the ratio is the cost of the engine around the model:
DeepSpeed's step (ZeRO partitioning where the stage has it), the per-step stats collective, BatchNorm statistics averaging,
non-finite handling, metrics. Ours is timed by the loop's own meter (perf/step_time_s in its
TensorBoard files: the mean step time of each --warmup-step log interval, the first dropped); the
baselines per step, reduced to the same statistic (interval_median). Our loop runs at each
deepspeed.zero_stage a job can choose for these models -- 0 (DeepSpeed data parallelism, the whole
AdamW state on every rank: the vision jobs' setting, ParameterNet-600M's state is ~1 GB), 1 and 2
-- and beside each, the bare DeepSpeed engine at that stage splits the ratio into DeepSpeed's
share and the loop's. Loops alternate for --rounds rounds (DDP first and last in each, the
stages in alternating order); the table has the median time per loop and, as the ratio, the
median of the rounds' ratios (each round's ratios are printed under it). Target: ratio <= 1.05.

After the timing rounds each loop runs once more under torch.profiler (--profile-steps steps after
the warm-up) and a table per case lists self CPU ms per step of the top ops of the three loops,
the Python time between ops, and the number of collectives per step: where the difference goes.

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
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05
# deepspeed.zero_stage -> its name in the table
STAGES = {0: "stage 0 (no ZeRO)", 1: "ZeRO-1", 2: "ZeRO-2"}
OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}

CASES = {
    # --cases key: (name in the tables, job overrides on top of the base config below)
    "vision": ("parameternet_debug 32px, batch 32/rank", [
        "model.name=parameternet_debug", "data.kind=image", "data.image_size=32", "data.batch_size=32"]),
    "lm": ("pnet_llama_debug_up_e4 seq 128, batch 8/rank", [
        "model.name=pnet_llama_debug_up_e4", "data.kind=text", "data.seq_len=128", "data.batch_size=8"]),
    # The same model and parameters with 8x the tokens per step: the compute per step grows, what
    # ZeRO adds per parameter (hooks, partition copies, the all-gather) does not.
    "lm_long": ("pnet_llama_debug_up_e4 seq 1024, batch 8/rank", [
        "model.name=pnet_llama_debug_up_e4", "model.kwargs.max_seq_len=1024", "data.kind=text", "data.seq_len=1024",
        "data.batch_size=8"]),
}
DEFAULT_CASES = "vision,lm"


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
    """Median over log intervals of train_worker's mean step time, from its own meter
    (perf/step_time_s in its TensorBoard files), the first interval dropped as warm-up."""
    from pnet_dist import dist
    from pnet_dist.metrics import read_scalars
    from pnet_dist.train import train_worker
    train_worker(cfg)
    if not dist.is_main():
        return float("nan")
    times = [value for _, value in read_scalars(cfg.metrics.logdir)["perf/step_time_s"]]
    return statistics.median(times[1:])


def interval_median(step_times: list[float], interval: int) -> float:
    """The statistic of time_ours for a baseline's per-step times: the first interval dropped, the
    mean of each following interval of `interval` steps, the median of those means. (A per-step
    median would drop the slow steps that a mean over ours keeps, and flatter the baselines.)"""
    means = [statistics.fmean(step_times[start:start + interval])
             for start in range(interval, len(step_times) - interval + 1, interval)]
    return statistics.median(means)


def step_times(cfg, task, model, backward_and_step, on_step=lambda: None) -> list[float]:
    """Per-step times of the baselines' loop: next batch, forward + loss with the task,
    backward_and_step(loss), loss.item() -- with ours' batches and seeds."""
    import torch

    from pnet_dist.train import BatchStream, micro_batch_seed, seed_step_rng

    rank = torch.distributed.get_rank()
    batches = BatchStream(task.build_loaders()[0])
    times = []
    for step in range(cfg.train.max_steps):
        started = time.perf_counter()
        _, (batch,) = batches.next(1)
        seed = micro_batch_seed(cfg.train.seed, step, rank)
        seed_step_rng(seed)
        loss, _ = task.train_loss(model, batch, seed=seed)
        backward_and_step(loss)
        loss.item()
        times.append(time.perf_counter() - started)
        on_step()
    return times


def ddp_loop(cfg):
    """(task, model, backward_and_step) of a plain DDP loop over the same model, data, loss,
    optimizer groups and schedule."""
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

    return task, DistributedDataParallel(model), backward_and_step


def bare_deepspeed_loop(cfg):
    """(task, engine, backward_and_step) of the bare DeepSpeed engine (pnet_dist.engine.build_engine,
    at stage 0 with its GuardedAdamW) driven by a minimal loop: forward, backward, step, loss.item()
    -- no stats collective, no BatchNorm averaging, no metrics. Splits ours/DDP into DeepSpeed's
    share and ours."""
    import torch

    from pnet_dist.engine import build_engine
    from pnet_dist.tasks import build_task

    task = build_task(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, task.build_model(), torch.distributed.get_world_size())

    def backward_and_step(loss) -> None:
        engine.backward(loss)
        engine.step()

    return task, engine, backward_and_step


def ours_loop(cfg):
    """One iteration of Trainer.fit without its eval/checkpoint/stop checks (modulo tests), for
    the profile: next micro-batches, train_step, account (counters, meter, logging)."""
    from pnet_dist import dist
    from pnet_dist.metrics import MetricsWriter
    from pnet_dist.tasks import build_task
    from pnet_dist.train import BatchStream, Trainer, train_step

    trainer = Trainer(cfg, build_task(cfg))
    trainer.writer = MetricsWriter(cfg.metrics.logdir, enabled=dist.is_main())
    batches = BatchStream(trainer.train_loader)

    def one_step() -> None:
        data_wait_s, micro_batches = batches.next(cfg.deepspeed.grad_accum_steps)
        result = train_step(trainer.engine, trainer.task, micro_batches, trainer.state.step, cfg.train.seed,
                            stop=False)
        trainer.account(result, micro_batches, data_wait_s)
    return trainer, one_step


def profile_case(cfg, stage0, name: str, num_steps: int, top: int) -> str:
    """A table of self CPU time per step by op (torch.profiler, rank 0) for the four loops (DDP, the
    bare ZeRO-2 engine, our loop on `cfg` (ZeRO-2) and on `stage0`), over num_steps steps after
    cfg.train.max_steps - num_steps warm-up steps; "(Python between ops)" is
    the profiler's step row: interpreter time outside any op (hooks, bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    warmup = cfg.train.max_steps - num_steps

    def profiled(run) -> tuple[dict[str, float], dict[str, float]]:
        with profile(activities=[ProfilerActivity.CPU],
                     schedule=schedule(wait=warmup - 1, warmup=1, active=num_steps)) as prof:
            run(prof.step)
        events = prof.key_averages()
        self_ms = {("(Python between ops)" if e.key.startswith("ProfilerStep") else e.key):
                   e.self_cpu_time_total / num_steps / 1e3 for e in events}
        calls = {e.key: e.count / num_steps for e in events}
        return self_ms, calls

    def ours(job) -> Callable:
        def run(on_step) -> None:
            trainer, one_step = ours_loop(job)
            for _ in range(job.train.max_steps):
                one_step()
                on_step()
            trainer.writer.close()
        return run

    loops = {"DDP": profiled(lambda on_step: step_times(cfg, *ddp_loop(cfg), on_step=on_step)),
             "bare ZeRO-2": profiled(lambda on_step: step_times(cfg, *bare_deepspeed_loop(cfg), on_step=on_step)),
             "loop ZeRO-2": profiled(ours(cfg)),
             "loop stage 0": profiled(ours(stage0))}
    ranked = sorted({key for self_ms, _ in loops.values() for key in self_ms},
                    key=lambda key: -max(self_ms.get(key, 0.0) for self_ms, _ in loops.values()))
    lines = [(f"profile, {name}: self CPU ms per step on rank 0 (torch.profiler, {num_steps} steps after "
              f"{warmup} warm-up), top {top} ops"),
             f"| {'op':<60} | " + " | ".join(f"{loop:>14}" for loop in loops) + " |",
             f"|{'-' * 62}|" + "|".join("-" * 16 for _ in loops) + "|"]
    for key in ranked[:top]:
        lines.append(f"| {key[:60]:<60} | " + " | ".join(f"{self_ms.get(key, 0.0):>14.2f}" for self_ms, _ in loops.values())
                     + " |")
    lines.append(f"| {'all ops + Python, total':<60} | "
                 + " | ".join(f"{sum(self_ms.values()):>14.2f}" for self_ms, _ in loops.values()) + " |")
    lines.append(f"| {'collectives per step (c10d:: calls)':<60} | "
                 + " | ".join(f"{sum(n for k, n in calls.items() if k.startswith('c10d::')):>14.1f}"
                              for _, calls in loops.values()) + " |")
    lines.append(f"| {'op calls per step':<60} | "
                 + " | ".join(f"{sum(calls.values()):>14.0f}" for _, calls in loops.values()) + " |")
    return "\n".join(lines)


def profiles(args, workdir: str) -> list[str]:
    def job(index: int, stage: int, overrides: list[str]):
        return base_config(workdir, f"profile_{index}_z{stage}", args.profile_steps + args.warmup, args.warmup,
                           [*overrides, f"deepspeed.zero_stage={stage}"])
    return [profile_case(job(index, 2, overrides), job(index, 0, overrides), name, args.profile_steps,
                         args.profile_top)
            for index, (name, overrides) in enumerate(selected_cases(args))]


def engine_vs_ddp(args, workdir: str, rounds_seen: dict) -> list[tuple[str, float, float, str]]:
    """The step-time rows; each round's ratios go into rounds_seen[case]."""
    rows = []
    stages = args.stages
    for index, (name, overrides) in enumerate(selected_cases(args)):
        ddp: list[float] = []
        ours: dict[int, list[float]] = {stage: [] for stage in stages}
        bare: dict[int, list[float]] = {stage: [] for stage in stages}
        for round_index in range(args.rounds):
            cfg = {stage: base_config(workdir, f"bench_{index}_{round_index}_z{stage}", args.steps, args.warmup,
                                      [*overrides, f"deepspeed.zero_stage={stage}"]) for stage in stages}
            # DDP before and after the round's DeepSpeed loops (their mean is the round's baseline),
            # the stages in alternating order: a machine that drifts during a round (a shared VM
            # does) shifts the baseline with the loops instead of against them.
            ddp_cfg = cfg[stages[0]]  # the DDP loop reads no deepspeed key
            ddp_before = interval_median(step_times(ddp_cfg, *ddp_loop(ddp_cfg)), args.warmup)
            for stage in (stages if round_index % 2 == 0 else stages[::-1]):
                bare[stage].append(interval_median(step_times(cfg[stage], *bare_deepspeed_loop(cfg[stage])),
                                                   args.warmup))
                ours[stage].append(time_ours(cfg[stage]))
            ddp_after = interval_median(step_times(ddp_cfg, *ddp_loop(ddp_cfg)), args.warmup)
            ddp.append((ddp_before + ddp_after) / 2)
        ddp_s = statistics.median(ddp)

        def paired(num: list[float], den: list[float]) -> float:
            """The median of the rounds' ratios: each round's loops ran back to back, so a slow
            phase of a shared machine hits both sides of a ratio alike."""
            return statistics.median(a / b for a, b in zip(num, den))

        for stage in stages:
            ours_s, bare_s = statistics.median(ours[stage]), statistics.median(bare[stage])
            rows += [(f"step time, {name}: pnet_dist loop at {STAGES[stage]} / DDP", ours_s, ddp_s, "s",
                      paired(ours[stage], ddp), ["<=", TARGET_RATIO]),
                     (f"  of which DeepSpeed: bare {STAGES[stage]} engine / DDP", bare_s, ddp_s, "s",
                      paired(bare[stage], ddp), None),
                     ("  of which the loop: pnet_dist loop / bare engine", ours_s, bare_s, "s",
                      paired(ours[stage], bare[stage]), None)]
        rounds_seen[name] = {f"{what} {STAGES[stage]}": [round(a / b, 3) for a, b in zip(times[stage], den)]
                             for stage in stages for what, times, den in (("loop / DDP", ours, ddp),
                                                                           ("bare / DDP", bare, ddp))}
    return rows


BENCHES = [engine_vs_ddp]


def case_keys(text: str) -> list[str]:
    """--cases: comma-separated keys of CASES, in the order given."""
    keys = [key for key in text.split(",") if key]
    if not keys or any(key not in CASES for key in keys):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(CASES)} (comma-separated)")
    return keys


def stage_list(text: str) -> list[int]:
    """--stages: comma-separated zero_stages of STAGES, in the order given."""
    try:
        stages = [int(stage) for stage in text.split(",") if stage]
    except ValueError:
        stages = []
    if not stages or any(stage not in STAGES for stage in stages):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, STAGES))} (comma-separated)")
    return stages


def selected_cases(args) -> list[tuple[str, list[str]]]:
    """(name, overrides) of the --cases keys."""
    return [CASES[key] for key in args.cases]


def worker(args) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")  # every loop below runs in this one group
    workdir = [tempfile.mkdtemp(prefix="bench_engine_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(workdir)
    rounds_seen: dict[str, dict[str, list[float]]] = {}
    rows = [row for bench in BENCHES for row in bench(args, workdir[0], rounds_seen)]
    tables = profiles(args, workdir[0]) if args.profile_steps else []
    dist.barrier()
    if dist.get_rank() == 0:
        print("BENCH_ROWS " + json.dumps(rows), flush=True)
        print("BENCH_PROFILE " + json.dumps(tables), flush=True)
        print("BENCH_ROUNDS " + json.dumps(rounds_seen), flush=True)
        shutil.rmtree(workdir[0], ignore_errors=True)
    dist.destroy_process_group()


def run_stage(cmd: list[str], env: dict[str, str]) -> dict:
    """{tag: JSON} of the stage's BENCH_ROWS / BENCH_PROFILE lines."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    printed = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith(("BENCH_ROWS ", "BENCH_PROFILE ", "BENCH_ROUNDS "))}
    if proc.returncode != 0 or "BENCH_ROWS" not in printed:
        sys.exit(f"benchmark failed: {' '.join(cmd)} (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped from the timing (also our log interval)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpoint-params-m", type=float, default=12.0,
                        help="model size of the checkpoint rows, millions of parameters")
    parser.add_argument("--checkpoint-repeats", type=int, default=5)
    parser.add_argument("--skip-checkpoint", action="store_true", help="only the step-time rows")
    parser.add_argument("--profile-steps", type=int, default=20,
                        help="steps profiled per loop and case after the timing rounds (0: no profile)")
    parser.add_argument("--profile-top", type=int, default=12, help="ops listed in each profile table")
    parser.add_argument("--cases", type=case_keys, default=DEFAULT_CASES, help=f"models timed, of {', '.join(CASES)}")
    parser.add_argument("--stages", type=stage_list, default=",".join(map(str, STAGES)),
                        help="deepspeed.zero_stages timed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()  # a typo in --cases / --stages fails here, not after the workers' start
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PNET_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    load_at_start = os.getloadavg()[0]
    printed = run_stage([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                         "--worker", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--rounds={args.rounds}",
                         f"--profile-steps={args.profile_steps}", f"--profile-top={args.profile_top}",
                         f"--cases={','.join(args.cases)}", f"--stages={','.join(map(str, args.stages))}"], env)
    rows = printed["BENCH_ROWS"]
    if not args.skip_checkpoint:
        rows += run_stage([sys.executable, str(REPO / "tools" / "bench_checkpoint.py"), "--rows-json",
                           f"--params-m={args.checkpoint_params_m}", f"--repeats={args.checkpoint_repeats}"],
                          env)["BENCH_ROWS"]
    print(f"step time: 2 ranks (gloo, CPU), fp32, {args.steps} steps, {args.warmup} warm-up, median of "
          f"{args.rounds} rounds; checkpoint: 1 rank, ZeRO-1, moto S3 on 127.0.0.1, median of "
          f"{args.checkpoint_repeats}; {os.cpu_count()} CPU cores, load average {load_at_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"| {'measure':<80} | {'measured':>12} | {'baseline':>12} | {'ratio':>6} | {'target':>12} |")
    print(f"|{'-' * 82}|{'-' * 14}|{'-' * 14}|{'-' * 8}|{'-' * 14}|")
    for name, ours, baseline, unit, ratio, target in rows:
        verdict = "" if target is None else f"{target[0]}{target[1]:g} {'ok' if OPS[target[0]](ratio, target[1]) else 'MISSED'}"
        print(f"| {name:<80} | {ours:>8.4f}{unit:>4} | {baseline:>8.4f}{unit:>4} | {ratio:>6.3f} | {verdict:>12} |")
    for name, ratios in printed.get("BENCH_ROUNDS", {}).items():
        print(f"each round, {name}: " + "; ".join(f"{what} {values}" for what, values in ratios.items()))
    for table in printed.get("BENCH_PROFILE", []):
        print("\n" + table)


if __name__ == "__main__":
    from pnet_dist.cli import run
    sys.exit(run(main))
