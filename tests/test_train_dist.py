"""The training loop end to end on 2 gloo ranks with real DeepSpeed engines.

One torchrun launch runs many scenarios in one process group (DeepSpeed start-up is the cost),
each scenario calling pnet_dist.train.train_worker like Ray Train or torchrun would:
  - stage 0 and ZeRO-1/2/3 x {parameternet_debug, pnet_llama_debug_up_e4 (ZeRO-3: the dense llama_debug)}
    (fp32 and bf16), and the MoE model with expert parallelism 2: N steps straight vs N/2 steps,
    SIGTERM (to rank 1 only), resume: the losses and the final eval agree bit for bit; two of them also with activation
    checkpointing, which must change no bit either;
  - a NaN batch (stage 0 and ZeRO-1 fp32, ZeRO-3 bf16): the step is skipped (weights, optimizer, BatchNorm
    statistics, EMA untouched), so the run equals one that never saw the batch; a NaN streak
    reloads the last checkpoint and equals a run that skipped those batches;
  - the TensorBoard event files, read back with TensorBoard's EventAccumulator.
A second pair of launches runs on real datasets through pnet_dist.data's streaming loaders
(MNIST digits, King James Bible tokens), checkpoints and logs to the local S3 server: an image
run stopped and resumed bit for bit, and a text run SIGKILLed and resumed on ONE rank (2-step
accumulation keeps the global batch) from the 2-rank checkpoint.

This file is also the rank program: `python -m torch.distributed.run ... tests/test_train_dist.py
SCENARIO WORKDIR` (see `main`).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
pytestmark = pytest.mark.dist

MATRIX = {
    # case: (config, overrides)
    # stage 0: DeepSpeed data parallelism, AdamW whole on every rank (pnet_dist.optim.GuardedAdamW)
    "vision_z0_bf16": ("train_vision_debug.yaml", ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"]),
    "lm_z0_fp32": ("train_lm_debug.yaml", ["deepspeed.zero_stage=0"]),
    "vision_z1_fp32": ("train_vision_debug.yaml", ["deepspeed.zero_stage=1"]),
    "vision_z2_bf16": ("train_vision_debug.yaml", ["deepspeed.zero_stage=2", "deepspeed.precision=bf16"]),
    "vision_z3_fp32": ("train_vision_debug.yaml", ["deepspeed.zero_stage=3", "train.ema_decay=null"]),
    "lm_z1_bf16": ("train_lm_debug.yaml", ["deepspeed.zero_stage=1", "deepspeed.precision=bf16"]),
    "lm_z2_fp32": ("train_lm_debug.yaml", ["deepspeed.zero_stage=2"]),
    # ZeRO-3 on the dense LLaMA: config refuses ZeRO-3 for MoE models (their experts shard by
    # expert parallelism instead, see lm_ep2_z2_fp32).
    "lm_dense_z3_fp32": ("train_lm_debug.yaml", ["deepspeed.zero_stage=3", "model.name=llama_debug"]),
    # expert parallelism: each rank holds 2 of the 4 experts (pnet_dist.moe_deepspeed)
    "lm_ep2_z2_fp32": ("train_lm_debug.yaml", ["deepspeed.zero_stage=2", "deepspeed.ep_size=2"]),
}
# Activation checkpointing (train.grad_checkpointing) must not change a bit of these runs: BatchNorm
# under bf16 autocast with EMA, and MoE blocks whose recomputation repeats the expert all-to-all.
GRAD_CHECKPOINTING_CASES = ("vision_z2_bf16", "lm_ep2_z2_fp32")
STOP_AT_STEP = 3
# Constant lr, no mixing and no dropout: a skipped step must leave no trace at all.
NONFINITE = ["deepspeed.zero_stage=1", "optim.min_lr=2e-3", "optim.warmup_steps=0", "data.mixup_alpha=0",
             "data.cutmix_alpha=0", "model.kwargs.drop_rate=0.0", "train.max_nonfinite_in_row=2"]


# -- the rank program --------------------------------------------------------------------------
class Intercept:
    """Wraps a train loader: `on_item(index, batch)` may replace a batch or drop it (None)."""

    def __init__(self, loader, on_item):
        self.loader, self.on_item, self.index = loader, on_item, 0

    def __iter__(self):
        for batch in self.loader:
            index, self.index = self.index, self.index + 1
            out = self.on_item(index, batch)
            if out is not None:
                yield out

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def run(config: str, overrides: list[str], on_item=None) -> dict:
    from pnet_dist.config import load_config
    from pnet_dist.tasks import build_task
    from pnet_dist.train import train_worker

    cfg = load_config(CONFIGS / config, overrides)
    task = build_task(cfg)
    if on_item is not None:
        build = task.build_loaders

        def build_intercepted():
            train_loader, eval_loader = build()
            return Intercept(train_loader, on_item), eval_loader
        task.build_loaders = build_intercepted
    return train_worker(cfg, task)


def sigterm_on_rank1(first_item: int):
    def on_item(index, batch):
        import torch.distributed as dist
        if index == first_item and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch
    return on_item


def nan_at(items: set[int]):
    def on_item(index, batch):
        return (batch[0] * float("nan"), batch[1]) if index in items else batch
    return on_item


def drop(items: set[int]):
    return lambda index, batch: None if index in items else batch


def scenario_matrix(workdir: Path) -> dict:
    results = {}
    for case, (config, overrides) in MATRIX.items():
        common = overrides + [f"checkpoint.uri={workdir / 'runs'}"]
        gas = 2 if config.startswith("train_lm") else 1
        straight = run(config, common + [f"run_name={case}_straight"])
        stopped = run(config, common + [f"run_name={case}_resume"], sigterm_on_rank1((STOP_AT_STEP - 1) * gas))
        resumed = run(config, common + [f"run_name={case}_resume"])
        results[case] = {"straight": straight, "stopped": stopped, "resumed": resumed}
        if case in GRAD_CHECKPOINTING_CASES:
            results[case]["grad_ckpt"] = run(config, common + [f"run_name={case}_grad_ckpt",
                                                               "train.grad_checkpointing=true"])
    common = NONFINITE + [f"checkpoint.uri={workdir / 'runs'}"]
    for name, extra in (("z0_fp32", ["deepspeed.zero_stage=0"]), ("z1_fp32", []),
                        ("z3_bf16", ["deepspeed.zero_stage=3", "deepspeed.precision=bf16", "train.ema_decay=null"])):
        results[f"skip_nan_{name}"] = run("train_vision_debug.yaml", common + extra + [
            f"run_name=skip_nan_{name}", "train.max_steps=4"], nan_at({1}))
        results[f"skip_drop_{name}"] = run("train_vision_debug.yaml", common + extra + [
            f"run_name=skip_drop_{name}", "train.max_steps=3"], drop({1}))
    reload = common + ["train.max_steps=6", "checkpoint.every_steps=2"]
    results["reload_nan"] = run("train_vision_debug.yaml", reload + ["run_name=reload_nan"], nan_at({2, 3}))
    results["reload_drop"] = run("train_vision_debug.yaml", reload + ["run_name=reload_drop"], drop({2, 3}))
    return results


def s3_overrides(workdir: Path, family: str) -> list[str]:
    """Real datasets on local disk (pnet_dist.data's loaders), checkpoints and TensorBoard on S3."""
    spec = json.loads((workdir / "s3.json").read_text())
    data = f"{spec['data']}/{family}"
    common = [f"checkpoint.uri={spec['bucket']}/runs", f"data.train_uri={data}/train", f"data.eval_uri={data}/val",
              "data.num_workers=0", "data.num_canonical_nodes=1", "train.max_steps=8", "checkpoint.every_steps=2",
              "deepspeed.zero_stage=2", "metrics.sync_every_s=0"]
    if family == "images":
        return common + ["data.randaugment_ops=2", "data.batch_size=8"]
    return common + ["model.name=llama_debug", "data.seq_len=32", "data.batch_size=4", "deepspeed.grad_accum_steps=1"]


def kill_after_checkpoint(run_uri: str, at_item: int):
    """SIGKILL this rank when it fetches item `at_item`, once some checkpoint is complete (a later
    one may be uploading: the kill cuts it off, and the restart must skip it)."""
    def on_item(index, batch):
        if index == at_item:
            from pnet_dist.checkpoint import CheckpointStore
            while CheckpointStore(run_uri).latest_complete() is None:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return batch
    return on_item


def scenario_s3_two_ranks(workdir: Path) -> dict:
    """Real-data runs on 2 ranks: images straight vs SIGTERM + resume; text straight, then the same
    text run SIGKILLed at step 5 (results are written before the kill)."""
    images, text = s3_overrides(workdir, "images"), s3_overrides(workdir, "text")
    results = {"images_straight": run("train_vision_debug.yaml", images + ["run_name=images_straight"]),
               "images_stopped": run("train_vision_debug.yaml", images + ["run_name=images_resume"],
                                     sigterm_on_rank1(STOP_AT_STEP - 1)),
               "images_resumed": run("train_vision_debug.yaml", images + ["run_name=images_resume"]),
               "text_straight": run("train_lm_debug.yaml", text + ["run_name=text_straight"])}
    (workdir / "s3_two_ranks.json").write_text(json.dumps(results))
    bucket = json.loads((workdir / "s3.json").read_text())["bucket"]
    run("train_lm_debug.yaml", text + ["run_name=text_killed"],
        kill_after_checkpoint(f"{bucket}/runs/text_killed", at_item=4))
    raise AssertionError("unreachable: the run kills itself at step 5")


def scenario_s3_one_rank(workdir: Path) -> dict:
    """Resume the killed 2-rank text run on 1 rank; 2-step accumulation keeps the global batch."""
    return {"resumed": run("train_lm_debug.yaml", s3_overrides(workdir, "text") + [
        "run_name=text_killed", "deepspeed.grad_accum_steps=2"])}


# -- a resume on another world size: eval right after it equals eval on the saved world size ----
VISION_LAYOUT = {1: ["deepspeed.grad_accum_steps=2"], 2: [], 4: ["data.batch_size=2"]}
WORLD_SIZE_LAYOUT = {  # family: (config, zero stage, per world size: overrides keeping the global batch)
    "vision": ("train_vision_debug.yaml", 2, VISION_LAYOUT),
    "vision_z0": ("train_vision_debug.yaml", 0, VISION_LAYOUT),   # the whole optimizer in one file
    "lm": ("train_lm_debug.yaml", 2, {1: ["deepspeed.grad_accum_steps=4"], 2: [], 4: ["deepspeed.grad_accum_steps=1"]}),
}
WORLD_SIZE_STEPS = 4


def world_size_run(workdir: Path, family: str, name: str) -> dict:
    """Train to (or, resumed there, only evaluate at) step WORLD_SIZE_STEPS on this world size."""
    import torch.distributed as dist
    config, zero_stage, layout = WORLD_SIZE_LAYOUT[family]
    return run(config, layout[dist.get_world_size()] + [
        f"checkpoint.uri={workdir / 'runs'}", f"run_name={name}", f"train.max_steps={WORLD_SIZE_STEPS}",
        f"checkpoint.every_steps={WORLD_SIZE_STEPS}", f"deepspeed.zero_stage={zero_stage}"])


def copy_run(workdir: Path, source: str, dest: str) -> None:
    """A copy of a run folder to resume elsewhere (rank 0 copies; the others wait)."""
    import shutil

    import torch.distributed as dist
    if dist.get_rank() == 0:
        shutil.copytree(workdir / "runs" / source, workdir / "runs" / dest, ignore=shutil.ignore_patterns(".staging"))
    dist.barrier()


def scenario_world_1(workdir: Path) -> dict:
    """1 rank: train each family to step 4; later, resume the 2-rank runs (the `resume` pass)."""
    return {family: world_size_run(workdir, family, f"ws_{family}_1") for family in WORLD_SIZE_LAYOUT}


def scenario_world_2(workdir: Path) -> dict:
    """2 ranks: the 1-rank runs resumed here, then each family trained to step 4 on 2 ranks; and
    the uninterrupted run of the fencing test (one DeepSpeed start-up fewer)."""
    results = {}
    for family in WORLD_SIZE_LAYOUT:
        copy_run(workdir, f"ws_{family}_1", f"ws_{family}_1to2")
        results[f"{family}_1to2"] = world_size_run(workdir, family, f"ws_{family}_1to2")
        results[family] = world_size_run(workdir, family, f"ws_{family}_2")
    results["fence_reference"] = fence_run(workdir, "fence_reference")
    return results


def scenario_world_2to1(workdir: Path) -> dict:
    results = {}
    for family in WORLD_SIZE_LAYOUT:
        copy_run(workdir, f"ws_{family}_2", f"ws_{family}_2to1")
        results[family] = world_size_run(workdir, family, f"ws_{family}_2to1")
    return results


def scenario_world_2to4(workdir: Path) -> dict:
    results = {}
    for family in WORLD_SIZE_LAYOUT:  # the copy of the 2 -> 1 run: its universal form is reused
        copy_run(workdir, f"ws_{family}_2to1", f"ws_{family}_2to4")
        results[family] = world_size_run(workdir, family, f"ws_{family}_2to4")
    return results


# -- one writer per run folder: workers orphaned by a killed launcher are fenced out -------------
FENCE_STEPS = 10


def fence_run(workdir: Path, name: str, on_item=None) -> dict:
    return run("train_vision_debug.yaml", [f"checkpoint.uri={workdir / 'runs'}", f"run_name={name}",
                                           f"train.max_steps={FENCE_STEPS}", "checkpoint.every_steps=2"], on_item)


def scenario_fence_orphans(workdir: Path) -> dict:
    """The run whose launcher the test kills: once checkpoint 2 is saved, each rank waits (its pid
    written for the test) until a new generation claims the run folder, then trains on."""
    claim = workdir / "runs" / "fence_run" / "fence" / "generation_00000002.json"

    def wait_for_the_new_generation(index, batch):
        import torch.distributed as dist
        if index == 2:  # the batch of step 3: checkpoint 2 is saved (and uploading)
            (workdir / f"orphan_rank{dist.get_rank()}.pid").write_text(str(os.getpid()))
            deadline = time.monotonic() + 600
            while not claim.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return batch
    fence_run(workdir, "fence_run", wait_for_the_new_generation)
    raise AssertionError("unreachable: a fenced writer must stop")


def scenario_fence_resume(workdir: Path) -> dict:
    return {"resumed": fence_run(workdir, "fence_run")}


def main() -> None:
    import torch.distributed as dist
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")  # the scenarios' train_worker calls reuse this group
    results = globals()[f"scenario_{scenario}"](workdir)
    if dist.get_rank() == 0:
        (workdir / f"{scenario}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# -- the tests ---------------------------------------------------------------------------------
def launch(scenario: str, workdir: Path, nproc: int = 2, timeout_s: float = 600,
           program: Path = Path(__file__)) -> subprocess.CompletedProcess:
    """Run the scenario of `program` (a test file with a `main`) on `nproc` ranks under torchrun;
    on a time-out the whole process group goes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PNET_LOG_LEVEL": "WARNING",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(program), scenario, str(workdir)]
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{scenario} did not finish in {timeout_s:.0f}s:\n{(stdout + stderr)[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def launch_ok(scenario: str, workdir: Path, nproc: int = 2) -> dict:
    proc = launch(scenario, workdir, nproc)
    assert proc.returncode == 0, f"{scenario} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return json.loads((workdir / f"{scenario}.json").read_text())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train_matrix")
    started = time.monotonic()
    results = launch_ok("matrix", workdir)
    print(f"matrix launch: {time.monotonic() - started:.1f}s")
    return workdir, results


def steps(losses: dict) -> dict[int, float]:
    return {int(k): v for k, v in losses.items()}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_stop_and_resume_matches_straight_run_bit_for_bit(matrix, case):
    _, results = matrix
    straight, stopped, resumed = (results[case][k] for k in ("straight", "stopped", "resumed"))
    max_steps = straight["step"]
    assert straight["resumed_from"] is None and not straight["preempted"] and max_steps == 6
    # SIGTERM reached rank 1 only; both ranks agreed to stop after the step it arrived in.
    assert stopped["preempted"] and stopped["step"] == STOP_AT_STEP
    assert resumed["resumed_from"] == STOP_AT_STEP and resumed["step"] == max_steps
    assert sorted(steps(stopped["losses"])) == list(range(1, STOP_AT_STEP + 1))
    assert sorted(steps(resumed["losses"])) == list(range(STOP_AT_STEP + 1, max_steps + 1))
    combined = {**steps(stopped["losses"]), **steps(resumed["losses"])}
    assert combined == steps(straight["losses"])            # exact float equality, every step
    assert all(math.isfinite(v) for v in combined.values())
    assert resumed["eval"] == straight["eval"] and resumed["eval"]["model"]["loss"] > 0
    assert stopped["eval"] == {}                             # a preempted run does not evaluate


@pytest.mark.parametrize("case", GRAD_CHECKPOINTING_CASES)
def test_activation_checkpointing_changes_no_bit_of_a_run(matrix, case):
    _, results = matrix
    straight, checkpointed = results[case]["straight"], results[case]["grad_ckpt"]
    assert steps(checkpointed["losses"]) == steps(straight["losses"]) and len(straight["losses"]) == 6
    assert checkpointed["eval"] == straight["eval"]    # weights, BatchNorm statistics, EMA


@pytest.mark.parametrize("case", ["z0_fp32", "z1_fp32", "z3_bf16"])
def test_a_nonfinite_step_is_skipped_without_a_trace(matrix, case):
    _, results = matrix
    nan_run, clean_run = results[f"skip_nan_{case}"], results[f"skip_drop_{case}"]
    assert nan_run["nonfinite_steps"] == 1 and nan_run["reloads"] == 0 and clean_run["nonfinite_steps"] == 0
    nan_losses, clean_losses = steps(nan_run["losses"]), steps(clean_run["losses"])
    assert math.isnan(nan_losses[2])
    # Step 3 of the NaN run is step 2 of the run that never saw the bad batch, and so on.
    assert [nan_losses[1], nan_losses[3], nan_losses[4]] == [clean_losses[1], clean_losses[2], clean_losses[3]]
    # Weights, BatchNorm statistics (and the EMA) are those of the clean run.
    assert nan_run["eval"] == clean_run["eval"]
    assert all(math.isfinite(metrics["loss"]) for metrics in nan_run["eval"].values())


def test_a_nonfinite_streak_reloads_the_last_checkpoint(matrix):
    _, results = matrix
    nan_run, clean_run = results["reload_nan"], results["reload_drop"]
    assert nan_run["nonfinite_steps"] == 2 and nan_run["reloads"] == 1 and nan_run["step"] == 6
    # Steps 3 and 4 were NaN; after the reload from step 2 the loader went on with the next
    # batches, exactly like the run that dropped the two bad batches.
    assert steps(nan_run["losses"]) == steps(clean_run["losses"])
    assert nan_run["eval"] == clean_run["eval"]


def test_tensorboard_event_files_hold_the_scalars(matrix):
    from pnet_dist.metrics import read_events, read_scalars
    workdir, results = matrix
    for case, must_have in (("vision_z2_bf16", {"eval/top1", "eval/top5"}),
                            ("lm_z2_fp32", {"eval/perplexity", "train/tokens_per_s", "step/aux_loss"})):
        logdir = str(workdir / "runs" / f"{case}_straight" / "tb")
        scalars = read_scalars(logdir)
        expected = {"train/loss", "train/lr", "step/grad_norm", "train/samples_per_s", "train/mfu",
                    "perf/data_wait_frac", "ckpt/save_s", "ckpt/upload_s", "ckpt/upload_mb_per_s",
                    "eval/loss"} | must_have
        assert expected <= set(scalars), expected - set(scalars)
        # Series that stay constant are not charted: the eval set's size, cumulative counters, and
        # the skipped-step count of a run that skipped none.
        assert not {"eval/samples", "eval/tokens", "train/samples", "step/nonfinite_total"} & set(scalars)
        logged = {step: value for step, value in scalars["train/loss"]}
        losses = steps(results[case]["straight"]["losses"])
        assert sorted(logged) == sorted(losses)
        assert all(logged[s] == pytest.approx(losses[s], rel=1e-6) for s in losses)  # stored as float32
        lrs = [value for _, value in scalars["train/lr"]]
        assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]        # warm-up, then cosine decay
        assert all(0 < value < 1 for _, value in scalars["train/mfu"])
    runs = read_events(str(workdir / "runs" / "vision_z2_bf16_straight" / "tb"))
    assert set(runs) == {".", "ema"} and set(runs["ema"]) == {"2_eval/loss", "2_eval/top1", "2_eval/top5"}
    # pnet_llama_debug_up_e4: 2 MoE layers of 4 experts -> 2 load charts of 4 lines, not 8 charts.
    runs = read_events(str(workdir / "runs" / "lm_z2_fp32_straight" / "tb"))
    assert set(runs) == {".", "layer_00", "layer_01", "expert_0", "expert_1", "expert_2", "expert_3"}
    assert all(set(runs[f"expert_{e}"]) == {"4_moe_load/layer_00", "4_moe_load/layer_01"} for e in range(4))
    assert set(runs["layer_01"]) == {"3_moe/router_entropy", "3_moe/max_min_load_ratio"}
    assert [step for step, _ in runs["expert_3"]["4_moe_load/layer_01"]] == sorted(steps(results["lm_z2_fp32"]["straight"]["losses"]))


def write_datasets(out: Path) -> None:
    """Small real datasets through pnet_dist.data's converters: MNIST digits (32x32 JPEG) and
    King James Bible chapters (a 512-token BPE trained on the training chapters)."""
    from PIL import Image

    from pnet_dist.data import convert_images, convert_text
    from pnet_dist.data.quickstart import kjv_chapters, mnist_digits
    images, labels = mnist_digits()
    for split, index in (("train", range(192)), ("val", range(192, 256))):
        folder = out / "src" / "images" / split
        for i in index:
            (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").resize((32, 32)).save(folder / str(labels[i]) / f"{i:05d}.jpg")
        convert_images(str(folder), str(out / "images" / split), layout="folder",
                       class_index={str(d): d for d in range(10)})
    chapters = kjv_chapters()
    for split, selected in (("train", chapters[:8]), ("val", chapters[8:10])):
        path = out / "src" / f"kjv_{split}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for _, _, text in selected))
    convert_text([str(out / "src" / "kjv_train.jsonl")], str(out / "text" / "train"), seq_len=32, vocab_size=512)
    convert_text([str(out / "src" / "kjv_val.jsonl")], str(out / "text" / "val"), seq_len=32,
                 tokenizer_path=str(out / "text" / "train" / "tokenizer.json"))


@pytest.fixture(scope="module")
def s3_runs(tmp_path_factory, s3_server):
    import boto3
    workdir = tmp_path_factory.mktemp("train_s3")
    write_datasets(workdir / "data")
    bucket = f"train-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    (workdir / "s3.json").write_text(json.dumps({"bucket": f"s3://{bucket}", "data": str(workdir / "data")}))
    killed = launch("s3_two_ranks", workdir)
    two_ranks = json.loads((workdir / "s3_two_ranks.json").read_text())
    one_rank = launch_ok("s3_one_rank", workdir, nproc=1)
    return f"s3://{bucket}", killed, two_ranks, one_rank["resumed"]


def test_real_image_loader_resumes_bit_for_bit(s3_runs):
    _, _, two_ranks, _ = s3_runs
    straight, stopped, resumed = (two_ranks[f"images_{k}"] for k in ("straight", "stopped", "resumed"))
    assert stopped["preempted"] and stopped["step"] == STOP_AT_STEP and resumed["resumed_from"] == STOP_AT_STEP
    assert {**steps(stopped["losses"]), **steps(resumed["losses"])} == steps(straight["losses"])
    assert resumed["eval"] == straight["eval"] and resumed["eval"]["model"]["samples"] == 2 * 2 * 8


def test_s3_checkpoint_survives_sigkill_and_resumes_on_one_rank(s3_runs):
    from pnet_dist.checkpoint import CheckpointStore
    bucket, killed, two_ranks, resumed = s3_runs
    straight = two_ranks["text_straight"]
    assert killed.returncode != 0                         # the killed launch really died
    assert straight["step"] == 8 and not straight["preempted"]
    # Checkpoint 2 was complete at the kill; 4 too, unless its upload was cut off (or skipped
    # because 2 was still uploading at step 4).
    assert resumed["resumed_from"] in (2, 4) and resumed["step"] == 8
    store = CheckpointStore(f"{bucket}/runs/text_killed")
    assert store.latest_complete() == 8 and store.manifest(8)["world_size"] == 1
    straight_losses, resumed_losses = steps(straight["losses"]), steps(resumed["losses"])
    assert sorted(resumed_losses) == list(range(resumed["resumed_from"] + 1, 9))
    # The same global batch (the streaming loader hands one rank the samples two ranks shared)
    # from the same weights, optimizer state and position; a dense LM's loss does not depend on
    # how the batch is split, so only the summation order differs: agreement to rounding.
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-5)
    assert math.isfinite(resumed["eval"]["model"]["loss"]) and resumed["eval"]["model"]["perplexity"] > 1


@pytest.fixture(scope="module")
def world_size_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("world_size")
    started = time.monotonic()
    one = launch_ok("world_1", workdir, nproc=1)
    two = launch_ok("world_2", workdir, nproc=2)
    two_to_one = launch_ok("world_2to1", workdir, nproc=1)
    two_to_four = launch_ok("world_2to4", workdir, nproc=4)
    print(f"world-size launches: {time.monotonic() - started:.1f}s")
    return workdir, one, two, two_to_one, two_to_four


@pytest.mark.parametrize("family", sorted(WORLD_SIZE_LAYOUT))
def test_eval_right_after_a_resume_on_another_world_size_equals_eval_on_the_saved_one(world_size_runs, family):
    """Weights, BatchNorm statistics and EMA come back on every load path (universal for the
    vision model's ZeRO-2 files, DeepSpeed's own files as they are at stage 0, the MoE format for
    the LM), and the eval set is the same
    samples in the same batches at any world size: the figures agree bit for bit."""
    _, one, two, two_to_one, two_to_four = world_size_runs
    saved_on_1, saved_on_2 = one[family], two[family]
    pairs = {"1 -> 2": (saved_on_1, two[f"{family}_1to2"]), "2 -> 1": (saved_on_2, two_to_one[family]),
             "2 -> 4": (saved_on_2, two_to_four[family])}
    for change, (saved, resumed) in pairs.items():
        assert saved["step"] == resumed["step"] == resumed["resumed_from"] == WORLD_SIZE_STEPS, change
        assert resumed["losses"] == {}, change                  # nothing trained: eval right after the resume
        assert resumed["eval"] == saved["eval"], f"{family} {change}: {resumed['eval']} != {saved['eval']}"
        print(f"WORLD-SIZE-TABLE | {family} | {change} | saved-on eval {json.dumps(saved['eval'])} | "
              f"after resume {json.dumps(resumed['eval'])}")
    vision = family.startswith("vision")
    samples = "samples" if vision else "tokens"
    assert saved_on_2["eval"]["model"][samples] == (32 if vision else 8 * 32)
    if vision:
        assert set(saved_on_2["eval"]) == {"model", "ema"}


def test_orphans_of_a_killed_launcher_are_fenced_out_and_the_new_run_is_exact(world_size_runs):
    """kill -9 of torchrun leaves its workers running (each in its own session). The same run
    started again claims the run folder; the orphans stop at their next write attempt, nothing of
    theirs lands after the claim, and the new run ends with the uninterrupted run's weights (that
    run rode along in the 2-rank world-size launch)."""
    import psutil
    import torch
    tmp_path, reference = world_size_runs[0], world_size_runs[2]["fence_reference"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PNET_LOG_LEVEL": "INFO"}
    log_path = tmp_path / "orphans.log"
    with open(log_path, "w") as log_file:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     str(Path(__file__)), "fence_orphans", str(tmp_path)], env=env, cwd=tmp_path,
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "runs" / "fence_run"
    deadline = time.monotonic() + 400
    while not ((run_dir / "ckpt" / "step_00000002" / "COMPLETE").exists()
               and all((tmp_path / f"orphan_rank{r}.pid").exists() for r in (0, 1))):
        assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()[-6000:]
        time.sleep(0.1)
    orphans = [psutil.Process(int((tmp_path / f"orphan_rank{r}.pid").read_text())) for r in (0, 1)]
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher only, not its workers
    launcher.wait()
    transcript = [f"torchrun {launcher.pid} SIGKILLed; its workers {[p.pid for p in orphans]} still running: "
                  f"{[p.is_running() for p in orphans]}"]
    assert all(p.is_running() for p in orphans)
    try:
        resumed = launch_ok("fence_resume", tmp_path)["resumed"]
        gone, alive = psutil.wait_procs(orphans, timeout=300)
        assert not alive, f"orphans {alive} still running:\n{log_path.read_text()[-6000:]}"
    finally:
        for orphan in orphans:
            if orphan.is_running():
                orphan.kill()
    claim = json.loads((run_dir / "fence" / "generation_00000002.json").read_text())
    orphan_log = log_path.read_text()
    fenced_lines = [line for line in orphan_log.splitlines() if "stops and writes nothing more" in line]
    assert fenced_lines, orphan_log[-6000:]
    assert "Traceback" in orphan_log and "checkpoint upload failed" in orphan_log  # they exited with the error
    transcript += [f"new run claimed generation 2 (pid {claim['pid']}), resumed from step {resumed['resumed_from']}",
                   *[line.strip()[:400] for line in fenced_lines], f"orphans exited: {[p.pid for p in gone]}"]

    # Nothing of the orphans (generation 1) landed after the claim.
    generation_2 = set()
    for manifest_path in (run_dir / "ckpt").glob("step_*/MANIFEST.json"):
        manifest = json.loads(manifest_path.read_text())
        if manifest["generation"] == 2:
            generation_2 |= {manifest_path.parent / rel for rel in [*manifest["files"], "MANIFEST.json", "COMPLETE",
                                                                     "rank_00000.done", "rank_00001.done"]}
    late = [p for p in (run_dir / "ckpt").rglob("*") if p.is_file() and p.stat().st_mtime > claim["claimed_unix"]]
    assert late and set(late) <= generation_2, sorted(set(late) - generation_2)
    old_receipts = sorted(receipt.parent.name for receipt in (run_dir / "ckpt").glob("step_*/rank_*.done")
                          if json.loads(receipt.read_text())["generation"] == 1)
    assert all(name <= "step_00000002" for name in old_receipts), old_receipts
    transcript.append(f"{len(late)} files under ckpt/ written after the claim, all of generation 2's checkpoints; "
                      f"generation 1's receipts only in {sorted(set(old_receipts))}")

    # The new run continued exactly where the uninterrupted one went.
    assert resumed["resumed_from"] == 2 and resumed["step"] == FENCE_STEPS
    assert {**{s: v for s, v in steps(reference["losses"]).items() if s <= 2}, **steps(resumed["losses"])} == \
        steps(reference["losses"])
    assert resumed["eval"] == reference["eval"]
    final = f"ckpt/step_{FENCE_STEPS:08d}/mp_rank_00_model_states.pt"
    ours, theirs = (torch.load(tmp_path / "runs" / name / final, weights_only=False)["module"]
                    for name in ("fence_run", "fence_reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    transcript.append(f"final weights at step {FENCE_STEPS}: {len(ours)} tensors bit-equal to the uninterrupted run")
    print("FENCE-TRANSCRIPT\n" + "\n".join(transcript))


def test_tensorboard_on_s3_holds_the_scalars(s3_runs):
    from pnet_dist.metrics import read_scalars
    bucket = s3_runs[0]
    scalars = read_scalars(f"{bucket}/runs/text_straight/tb")
    assert {"train/loss", "train/lr", "train/tokens_per_s", "ckpt/save_s", "eval/perplexity"} <= set(scalars)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 9))


if __name__ == "__main__":
    main()
