"""Random kills under torchrun: seeded SIGKILLs and SIGTERMs sent to random training workers at
random moments -- in set-up, during the resume, during steps, saves and their commits -- of a run
under `torchrun --max-restarts`, which must end with final weights bit-equal to an uninterrupted
run's (issue 11). The launch is the README's torchrun command (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
--standalone); every round's kill is printed (run with -s) with what the run folder held then and
how each worker of the round ended, as torchrun reports it.

Exit codes seen: -9 (SIGKILL), -15 (SIGTERM during set-up: nothing to save yet, the default
action ends the process at once), 75 (cli.EXIT_PREEMPTED: SIGTERM during training, the step was
checkpointed), 1 (the peer of a killed rank, whose collective failed). torchrun restarts the group
after each; the next round resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.e2e

SEED = 12               # plan: steps SIGTERM, resume SIGKILL, save SIGKILL, set-up SIGTERM
NUM_KILLS = 4            # one per round: set-up, resume, steps, save, in a seeded order
MAX_STEPS = 60
EVERY_STEPS = 2
JOB = [f"train.max_steps={MAX_STEPS}", f"checkpoint.every_steps={EVERY_STEPS}", "checkpoint.keep_last=3",
       "train.log_every_steps=1"]


def torchrun(workdir: Path, run_name: str, max_restarts: int, log: Path) -> subprocess.Popen:
    """The README's command: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone
    --nproc-per-node=2 --max-restarts=N -m pnet_dist.train JOB.yaml key=value..."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PNET_LOG_LEVEL": "INFO", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "-m", "pnet_dist.train", str(REPO / "tests" / "configs" /
                                                                           "train_vision_debug.yaml"),
           f"checkpoint.uri={workdir / 'runs'}", f"run_name={run_name}", *JOB]
    return subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(proc: subprocess.Popen, log: Path, timeout_s: float = 400) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"torchrun did not finish in {timeout_s:.0f}s:\n{log.read_text()[-6000:]}")
    return log.read_text()


def result_of(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith('{"step"')]
    assert lines, output[-6000:]
    return json.loads(lines[-1])


def workers_of(agent: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in agent.children() if "pnet_dist.train" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("ckpt/step_*/COMPLETE"))


def new_text(log: Path, offset: int) -> str:
    return log.read_text(errors="replace")[offset:]


def wait_for(proc: subprocess.Popen, condition, timeout_s: float = 120) -> bool:
    """Until condition() or the end of torchrun; False if torchrun ended first."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def kill_plan(seed: int) -> list[dict]:
    """One kill per round, drawn from the seed: the moment's kind (set-up, resume, steps, save; the
    resume never first, as the first round has nothing to resume), how far into it, the rank, and
    SIGKILL or SIGTERM (two of each)."""
    rng = random.Random(seed)
    kinds = rng.sample(["set-up", "steps", "save"], 3)
    kinds.insert(rng.randint(1, 3), "resume")
    signals = rng.sample(["SIGKILL", "SIGKILL", "SIGTERM", "SIGTERM"], 4)
    return [{"moment": kind, "rank": rng.randrange(2), "signal": sig,
             "setup_s": round(rng.uniform(0.2, 5.0), 2), "num_steps": rng.randint(1, 12)}
            for kind, sig in zip(kinds, signals)]


def moment_reached(kill: dict, log: Path, offset: int, run_dir: Path, started: float):
    """A condition that holds at the kill's moment of the round whose output starts at `offset`:
    set-up (setup_s after the workers started), resume (right after the round loaded its
    checkpoint; if none was complete yet, at its first step), steps (after num_steps steps of the round), save (a new checkpoint folder
    appeared and is being written or committed)."""
    if kill["moment"] == "set-up":
        return lambda: time.monotonic() - started >= kill["setup_s"]
    if kill["moment"] == "resume":  # or, with no complete checkpoint yet, the start of training
        return lambda: re.search(r"resumed from checkpoint step|step \d+/\d+ loss", new_text(log, offset))
    if kill["moment"] == "steps":
        return lambda: len(re.findall(r"step \d+/\d+ loss", new_text(log, offset))) >= kill["num_steps"]
    before = {p.name for p in run_dir.glob("ckpt/step_*")}
    return lambda: any(p.name not in before for p in run_dir.glob("ckpt/step_*"))


def chaos(proc: subprocess.Popen, log: Path, run_dir: Path, plan: list[dict]) -> list[dict]:
    """Each round: wait for its two workers, then for the planned moment, then signal one."""
    agent = psutil.Process(proc.pid)
    seen: set[int] = set()
    kills = []
    for round_index, kill in enumerate(plan):
        if not wait_for(proc, lambda: len([w for w in workers_of(agent) if w.pid not in seen]) >= 2):
            break
        workers = [w for w in workers_of(agent) if w.pid not in seen]
        started, offset = time.monotonic(), len(log.read_text(errors="replace"))
        if not wait_for(proc, moment_reached(kill, log, offset, run_dir, started)):
            break
        seen.update(w.pid for w in workers)
        target = next(w for w in workers if w.environ().get("RANK") == str(kill["rank"]))
        before = complete_steps(run_dir)
        try:
            target.send_signal(getattr(signal, kill["signal"]))
        except psutil.NoSuchProcess:
            break
        kills.append({**kill, "round": round_index, "after_s": round(time.monotonic() - started, 2),
                      "newest_complete_before": before[-1] if before else None})
    return kills


def round_endings(output: str) -> list[str]:
    """torchrun's "failed (exitcode: X) local_rank: R" lines, one per ended round."""
    return re.findall(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)", output)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from pnet_dist.export import consolidated_state_dict
    state_dict, manifest = consolidated_state_dict(str(run_dir))
    assert manifest["step"] == MAX_STEPS
    return state_dict


def test_random_kills_under_torchrun_end_bit_equal_to_an_uninterrupted_run(tmp_path):
    started = time.monotonic()
    reference_log = tmp_path / "reference.log"
    reference = result_of(wait(torchrun(tmp_path, "reference", 0, reference_log), reference_log))
    assert reference["step"] == MAX_STEPS and reference["resumed_from"] is None
    reference_s = time.monotonic() - started

    chaos_log = tmp_path / "chaos.log"
    proc = torchrun(tmp_path, "chaos", NUM_KILLS, chaos_log)
    kills = chaos(proc, chaos_log, tmp_path / "runs" / "chaos", kill_plan(SEED))
    output = wait(proc, chaos_log)
    assert proc.returncode == 0, f"torchrun failed (exit {proc.returncode}):\n{output[-8000:]}"
    result = result_of(output)
    endings = round_endings(output)
    resumes = [int(step) for step in re.findall(r"resumed from checkpoint step (\d+)", output)]
    stops = [int(step) for step in re.findall(r"stop requested \(SIGTERM\): checkpointed step (\d+)", output)]

    reference_weights = final_weights(tmp_path / "runs" / "reference")
    chaos_weights = final_weights(tmp_path / "runs" / "chaos")
    different = [name for name in reference_weights
                 if not torch.equal(reference_weights[name], chaos_weights[name])]
    print(f"\nuninterrupted: {reference_s:.0f}s, step {reference['step']}, loss {reference['loss']!r}")
    for kill in kills:
        print(f"round {kill['round']}: {kill['signal']} to rank {kill['rank']} during {kill['moment']}, "
              f"{kill['after_s']}s after its workers started (newest complete checkpoint then: "
              f"{kill['newest_complete_before']})")
    print(f"round endings (exitcode, local_rank) as torchrun reported them: {endings}")
    print(f"SIGTERM stops that checkpointed their step: {stops}; resumes (rank 0 and 1): {resumes}")
    print(f"chaos run: {len(kills)} kills, final step {result['step']}, loss {result['loss']!r}; "
          f"{len(reference_weights)} weight tensors, {len(different)} differ bit-wise; "
          f"eval equal: {result['eval'] == reference['eval']}; whole test {time.monotonic() - started:.0f}s")

    assert len(kills) == NUM_KILLS, f"the run finished after {len(kills)} kills; lengthen it"
    assert result["step"] == MAX_STEPS and not result["preempted"]
    assert set(chaos_weights) == set(reference_weights) and not different, different
    assert result["eval"] == reference["eval"] and result["loss"] == reference["loss"]
    assert len(endings) >= NUM_KILLS, output[-8000:]  # every kill ended its round
    for kill in kills:
        if kill["signal"] == "SIGTERM" and kill["moment"] == "steps":  # checkpointed, then exit 75
            assert ("75", "0") in endings or ("75", "1") in endings, endings
            assert stops and set(stops) <= set(resumes), (stops, resumes)
