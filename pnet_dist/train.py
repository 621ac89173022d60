"""The training loop: one loop for both model families, resumable, preemptible, on every rank.

`train_worker(cfg)` runs on each rank (under torchrun, Ray Train, or alone). Reading order:
`train_step` (one optimizer step over the micro-batches, one collective for its statistics),
then `Trainer`: set-up from the config (model, engine, loaders, checkpoints, metrics), and `fit`
-- resume from the newest complete checkpoint, then per step: account, reload if needed, eval,
checkpoint, stop check -- then the final eval.

What the loop guarantees:
- Resume is exact: a checkpoint holds the engine (weights, optimizer, LR schedule, module
  buffers) and the Stateful objects of `Trainer.checkpoint_state` -- counters, loader position,
  RNG states, EMA -- the one description that saving and every restore walk
  (pnet_dist.engine_checkpoint). Randomness inside a step (dropout, drop-path, mixup/cutmix) is
  seeded per micro-batch from (seed, step, place in the global batch), and BatchNorm running
  statistics are averaged over ranks every step (ZeRO syncs weights, not buffers, and a
  checkpoint holds rank 0's). A run stopped at step k and resumed reproduces the uninterrupted
  run's losses and eval bit for bit on the same world size.
- Start-up: the newest checkpoint that passes every check is loaded (damaged ones are marked and
  skipped, on every rank together), after its model was checked against model.name and the run
  folder claimed for this writer generation (older writers are fenced out). Only then is
  anything written: config.yaml and the TensorBoard files.
- Checkpoints never wait for storage: a save copies the state to CPU memory and uploads in the
  background; while an upload is still running the next periodic checkpoint is skipped.
- Preemption: SIGTERM (Ray, spot termination, torchrun forwarding it) or a spot interruption
  notice sets a flag; the ranks agree on it in the step's one collective, finish that step,
  checkpoint, and return with result["preempted"] = True (`python -m pnet_dist.train` then
  exits with cli.EXIT_PREEMPTED, 75). During set-up SIGTERM keeps its default action: the process
  ends at once, with nothing to save.
- Non-finite loss: the step is skipped (DeepSpeed's overflow check discards the gradients; see
  engine.poison_nonfinite) and counted; after train.max_nonfinite_in_row skipped steps in a row
  the weights, optimizer and counters are reloaded from the last complete checkpoint while the
  loader keeps its position, so the batches that diverged are not replayed.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields

USAGE = "usage: python -m pnet_dist.train JOB.yaml [key=value ...]   (under torchrun for several ranks)"
if __name__ == "__main__" and sys.argv[1:2] in (["-h"], ["--help"]):
    print(USAGE)  # before torch and DeepSpeed are imported: --help answers at once
    sys.exit(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pnet_dist import cli, dist  # noqa: E402
from pnet_dist.checkpoint import CheckpointStore  # noqa: E402
from pnet_dist.config import JobConfig, load_config, save_resolved  # noqa: E402
from pnet_dist.engine import build_engine, poison_nonfinite  # noqa: E402
from pnet_dist.engine_checkpoint import EngineCheckpointer, Stateful  # noqa: E402
from pnet_dist.log import get_logger  # noqa: E402
from pnet_dist.metrics import ROOT_RUN, MetricsWriter, ThroughputMeter, moe_lines, peak_flops_per_rank  # noqa: E402
from pnet_dist.models.moe import moe_stats  # noqa: E402
from pnet_dist.optim import ModelEma  # noqa: E402
from pnet_dist.tasks import build_task  # noqa: E402

log = get_logger("pnet_dist.train")  # not __name__: "__main__" under python -m


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""
    step: int = 0                  # optimizer steps taken (applied or skipped)
    samples: int = 0               # global samples consumed
    tokens: int = 0                # global tokens consumed (language models)
    nonfinite_total: int = 0       # steps skipped for a non-finite loss
    nonfinite_in_row: int = 0
    reloads: int = 0               # reloads of the last checkpoint after a non-finite streak

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in fields(self):
            setattr(self, field.name, state[field.name])


@dataclass
class StepResult:
    loss: float                    # mean over micro-batches and ranks (nan if any was non-finite)
    extras: dict[str, float]       # task metrics, same averaging
    lr: float                      # the (largest group's) lr this step used
    nonfinite: bool                # some rank had a non-finite loss: the step was skipped
    applied: bool                  # the optimizer updated the weights
    stop: bool                     # some rank was asked to stop (SIGTERM / spot notice)


def train_step(engine, task, micro_batches: list, step: int, seed: int, stop: bool) -> StepResult:
    """Forward/backward over the micro-batches, one optimizer step, one collective for the stats;
    `stop` (this rank was asked to stop) is agreed on in that collective.

    The stats collective starts after the last forward, before its backward, and is waited for
    after the optimizer step: everything it carries (losses, stop flags, BatchNorm statistics) is
    known once the last forward has run -- backward changes none of it (activation checkpointing's
    recompute counts BatchNorm statistics once: pnet_dist.models.checkpointing) -- and the
    backward and the step hide it. Waited for at the end of the step, it was a second point per
    step where every rank waits for the slowest one (tools/bench_engine.py profile). Every rank
    issues it at the same point of the step, before DeepSpeed's own collectives of that backward
    and step, so the order of collectives is the same on all ranks."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    lr = max(engine.get_lr())
    buffers = list(engine.module.buffers())  # BatchNorm statistics; none in the LMs
    saved = snapshot(buffers)
    loss_sum = torch.zeros((), device=task.device)
    nonfinite = torch.zeros((), device=task.device)
    extras_sum: dict[str, torch.Tensor] = {}
    last = len(micro_batches) - 1
    for micro, batch in enumerate(micro_batches):
        if micro:
            engine.step()  # the previous micro-batch's: DeepSpeed only counts it, short of the last
        batch_seed = micro_batch_seed(seed, step, micro * world_size + rank)
        seed_step_rng(batch_seed)  # dropout / drop-path masks
        loss, extras = task.train_loss(engine, batch, seed=batch_seed)
        loss_sum += loss.detach()
        nonfinite += (~torch.isfinite(loss.detach())).float()
        for key, value in extras.items():
            extras_sum[key] = extras_sum.get(key, 0.0) + value
        if micro == last:
            # ZeRO keeps weights equal across ranks but not buffers, and a checkpoint holds rank
            # 0's: BatchNorm statistics are averaged over ranks in the same collective as the stats.
            stop_flag = torch.tensor(float(stop), device=task.device)
            pending = dist.start_sum_and_average(torch.stack([loss_sum, nonfinite, stop_flag, *extras_sum.values()]),
                                                 [b for b in buffers if b.is_floating_point()])
        engine.backward(poison_nonfinite(loss))
    engine.step()  # the optimizer step, while the collective travels
    totals = pending.wait()
    num = len(micro_batches) * world_size
    if totals[1] > 0:  # the forward passes also ran BatchNorm statistics through the NaNs
        torch._foreach_copy_(buffers, saved)
    return StepResult(loss=math.nan if totals[1] > 0 else totals[0] / num,
                      extras={k: v / num for k, v in zip(extras_sum, totals[3:])}, lr=lr,
                      nonfinite=totals[1] > 0, applied=engine.was_step_applied(), stop=totals[2] > 0)


def snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` in one op per dtype (the loop takes one of every buffer each step)."""
    copies = {}
    for group in dist.by_dtype(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group])
        copies.update(zip(map(id, group), dist.split_like(flat, group)))
    return [copies[id(t)] for t in tensors]


def train_worker(cfg: JobConfig, task=None) -> dict:
    """Train `cfg` on this rank to train.max_steps (or until preempted); see the module docstring.

    `task` defaults to build_task(cfg); tests pass one whose loaders they wrap.
    """
    # The SIGTERM handler comes only after set-up: a rank waiting in set-up (the process group's
    # rendezvous, DeepSpeed's start-up) for a peer that died must obey the launcher's SIGTERM at
    # once -- there is nothing to save yet -- rather than wait for a step that never comes.
    dist.init_distributed()
    try:
        trainer = Trainer(cfg, task or build_task(cfg))
        stop_signals = StopSignals(cfg.train.watch_spot_interruption)
        try:
            result = trainer.fit()
        finally:
            stop_signals.close()
            trainer.writer.close()
    finally:
        _STOP.clear()  # a stop request (served or not) ends with this run, not the next one in this process
    dist.teardown()
    return result


class Trainer:
    """Everything one rank trains with, built from the config; `fit` is the loop."""

    def __init__(self, cfg: JobConfig, task):
        self.cfg, self.task = cfg, task
        world_size = dist.get_world_size()
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = task.build_model()
        if cfg.train.init_from:
            load_init_weights(model, cfg.train.init_from)
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.engine = build_engine(cfg, model, world_size)
        if self.ema is not None:
            self.ema.module.to(task.device)
        self.train_loader, self.eval_set = task.build_loaders()
        self._upload_logged_step: int | None = None
        store = CheckpointStore(cfg.run_uri, keep_last=cfg.checkpoint.keep_last,
                                async_upload=cfg.checkpoint.async_upload,
                                upload_timeout_s=cfg.checkpoint.upload_timeout_s)
        self.ckpt = EngineCheckpointer(self.engine, store, model_name=cfg.model.name, model_kwargs=task.model_kwargs)
        self.writer = MetricsWriter(cfg.metrics.logdir, enabled=False)  # opened by fit() once the resume checks passed
        self.meter = ThroughputMeter(task.flops_per_sample, world_size=world_size,
                                     peak_flops=peak_flops_per_rank(task.device, cfg.deepspeed.precision,
                                                                    cfg.metrics.peak_tflops_per_rank))
        self.state = TrainState()
        self.interval_losses: list[float] = []

    def checkpoint_state(self, with_loader: bool = True) -> dict[str, Stateful]:
        """Everything a checkpoint holds besides the engine: what save() writes and every restore
        loads (a reload after non-finite losses leaves the loader where it is)."""
        state: dict[str, Stateful] = {"train_state": self.state, "loader": self.train_loader, "rng": RngState(),
                                      "ema": EmaState(self.ema, self.engine.module)}
        if not with_loader:
            del state["loader"]
        return state

    def fit(self) -> dict:
        cfg = self.cfg
        resumed_from = self.ckpt.start(self.checkpoint_state())
        if resumed_from is not None:
            log.info("resumed from checkpoint step %d", resumed_from)
        if dist.is_main():  # a start that failed its checks above has written nothing
            self.ckpt.store.check_fence()
            save_resolved(cfg)
        self.writer = MetricsWriter(cfg.metrics.logdir, enabled=dist.is_main(), sync_every_s=cfg.metrics.sync_every_s)
        batches = BatchStream(self.train_loader)
        losses: dict[int, float] = {}
        eval_results: dict = {}
        preempted, evaluated_at = False, None
        applied_since_reload = True
        while self.state.step < cfg.train.max_steps:
            data_wait_s, micro_batches = batches.next(cfg.deepspeed.grad_accum_steps)
            result = train_step(self.engine, self.task, micro_batches, self.state.step, cfg.train.seed,
                                stop=stop_requested())
            self.account(result, micro_batches, data_wait_s)
            step, nonfinite_in_row = self.state.step, self.state.nonfinite_in_row
            losses[step] = result.loss
            applied_since_reload = applied_since_reload or result.applied

            if nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                if not applied_since_reload:
                    raise RuntimeError(f"step {step}: {nonfinite_in_row} non-finite losses in a row right after "
                                       "reloading the last checkpoint; lower optim.lr or check the data")
                self.reload_after_nonfinite()
                applied_since_reload = False
                continue
            if self.eval_set is not None and cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0:
                eval_results, evaluated_at = self.evaluate(), step
            if result.stop or step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
                self.save(wait_for_previous=result.stop or step == cfg.train.max_steps)
            if result.stop:
                preempted = True
                log.warning("stop requested (%s): checkpointed step %d, exiting",
                            _STOP.reason or "on another rank", step)
                break

        if not preempted and self.eval_set is not None and evaluated_at != self.state.step:
            eval_results = self.evaluate()
        wait_started = time.perf_counter()
        self.ckpt.wait()
        self.writer.scalars(self.state.step, {"ckpt/final_upload_wait_s": time.perf_counter() - wait_started})
        self.log_finished_upload()
        last_loss = losses[max(losses)] if losses else math.nan
        return {"step": self.state.step, "loss": last_loss, "losses": losses, "eval": eval_results,
                "resumed_from": resumed_from, "preempted": preempted,
                "nonfinite_steps": self.state.nonfinite_total, "reloads": self.state.reloads}

    def account(self, result: StepResult, micro_batches: list, data_wait_s: float) -> None:
        """Counters, EMA, the skipped-step bookkeeping and logging after one step."""
        state, world_size = self.state, dist.get_world_size()
        state.step += 1
        num_samples, num_tokens = (n * len(micro_batches) for n in self.task.count(micro_batches[0]))
        state.samples += num_samples * world_size
        state.tokens += num_tokens * world_size
        self.meter.add(data_wait_s=data_wait_s, samples=num_samples, tokens=num_tokens)
        if result.applied:
            state.nonfinite_in_row = 0
            if self.ema is not None:
                self.ema.update(self.engine.module)
        else:
            # DeepSpeed skips the LR scheduler on a skipped step; keep lr a function of the step.
            self.engine.lr_scheduler.step()
        if result.nonfinite:
            assert not result.applied, "DeepSpeed applied a step with non-finite gradients"
            state.nonfinite_total += 1
            state.nonfinite_in_row += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", state.step, state.nonfinite_in_row)
        else:
            self.interval_losses.append(result.loss)
        if state.step % self.cfg.metrics.log_every_steps == 0 or state.step % self.cfg.train.log_every_steps == 0:
            self.log_step(result)

    def log_step(self, result: StepResult) -> None:
        cfg, state = self.cfg, self.state
        losses, self.interval_losses = self.interval_losses, []
        grad_norm = self.engine.get_global_grad_norm()
        values = {"train/loss": sum(losses) / len(losses) if losses else math.nan, "train/lr": result.lr,
                  "step/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                  **{f"step/{k}": v for k, v in result.extras.items()}, **self.meter.summary()}
        if state.nonfinite_total:  # charted from the first skipped step on; a flat 0 until then
            values["step/nonfinite_total"] = state.nonfinite_total
        if state.step % cfg.metrics.log_every_steps == 0:
            self.writer.scalars(state.step, values)
            for name, lines in moe_lines(moe_stats(self.engine.module)).items():
                self.writer.lines(state.step, name, lines)
        if state.step % cfg.train.log_every_steps == 0 and dist.is_main():
            log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g %.1f samples/s data_wait %.0f%%", state.step,
                     cfg.train.max_steps, values["train/loss"], values["train/lr"], values["step/grad_norm"],
                     values["train/samples_per_s"], 100 * values["perf/data_wait_frac"])

    def evaluate(self) -> dict:
        max_samples = self.cfg.train.eval_max_samples
        results = {"model": evaluate(self.task, self.engine, self.eval_set, max_samples)}
        if self.ema is not None:
            results["ema"] = evaluate(self.task, self.ema.module, self.eval_set, max_samples)
        for name, metrics in results.items():
            # The EMA's figures are a second line on the model's eval charts; the eval set's size
            # (samples, tokens) is the same at every eval and goes to the console only.
            self.writer.scalars(self.state.step, {f"eval/{key}": value for key, value in metrics.items()
                                                  if key not in ("samples", "tokens")},
                                run="ema" if name == "ema" else ROOT_RUN)
        if dist.is_main():
            log.info("step %d eval: %s", self.state.step, json.dumps(results))
        self.meter.restart()
        return results

    def save(self, wait_for_previous: bool) -> None:
        """Checkpoint this step (skipped while the previous one still uploads, unless wait_for_previous)."""
        self.log_finished_upload()
        save_started = time.perf_counter()
        if self.ckpt.save(self.state.step, self.checkpoint_state(), wait_for_previous=wait_for_previous):
            self.writer.scalars(self.state.step, {"ckpt/save_s": time.perf_counter() - save_started})
        else:
            self.writer.scalars(self.state.step, {"ckpt/skipped": 1.0})
        self.meter.restart()

    def log_finished_upload(self) -> None:
        """The background write and upload of the last checkpoint, once it is finished, logged at
        that checkpoint's step (rank 0's figures run until COMPLETE is written)."""
        stats = self.ckpt.last_upload_stats
        if stats is None or stats["step"] == self._upload_logged_step:
            return
        self._upload_logged_step = stats["step"]
        self.writer.scalars(stats["step"], {
            "ckpt/write_s": stats["write_s"], "ckpt/upload_s": stats["upload_s"],
            "ckpt/upload_mb_per_s": stats["num_bytes"] / 1e6 / max(stats["upload_s"], 1e-9)})

    def reload_after_nonfinite(self) -> None:
        """Back to the last complete checkpoint; the loader keeps its position (bad batches are not replayed)."""
        failed = TrainState(**self.state.state_dict())
        step = self.ckpt.reload(self.checkpoint_state(with_loader=False))
        if step is None:
            raise RuntimeError(f"step {failed.step}: {failed.nonfinite_in_row} non-finite losses in a row and no "
                               f"complete checkpoint under {self.cfg.run_uri} to reload; lower optim.lr or "
                               "checkpoint more often")
        log.warning("step %d: %d non-finite losses in a row; reloaded checkpoint step %d and continuing with "
                    "the next batches", failed.step, failed.nonfinite_in_row, step)
        self.state.nonfinite_total = failed.nonfinite_total
        self.state.reloads = failed.reloads + 1
        self.meter.restart()


# -- pieces of the loop ------------------------------------------------------------------------
def load_init_weights(model: torch.nn.Module, uri: str) -> None:
    """Start from an export (tools/export_checkpoint.py); tensors whose shape differs -- a head for
    another number of classes -- keep their fresh initialisation."""
    from pnet_dist.export import load_exported_state_dict
    state = load_exported_state_dict(uri)
    own = model.state_dict()
    unexpected, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    if unexpected or missing:
        raise ValueError(f"train.init_from={uri}: the export does not fit the model ({len(missing)} names missing, "
                         f"e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); check model.name")
    reshaped = [name for name in state if state[name].shape != own[name].shape]
    for name in reshaped:
        log.warning("init_from: %s has shape %s in the export and %s in the model; keeping its fresh init",
                    name, tuple(state[name].shape), tuple(own[name].shape))
        del state[name]
    model.load_state_dict(state, strict=False)
    log.info("initialised %d of %d tensors from %s", len(state), len(own), uri)


class BatchStream:
    """Endless micro-batches across epochs, with the time spent waiting for them."""

    def __init__(self, loader):
        self.loader = loader
        self.iterator = iter(loader)

    def next(self, count: int) -> tuple[float, list]:
        started = time.perf_counter()
        batches = []
        fresh = False  # the iterator was just started: an epoch with no batch would loop forever
        while len(batches) < count:
            try:
                batches.append(next(self.iterator))
                fresh = False
            except StopIteration:
                if fresh:
                    raise ValueError("the training data yields no batch in a whole epoch: lower data.batch_size, "
                                     "train on fewer ranks, or use more data") from None
                self.iterator = iter(self.loader)
                fresh = True
        return time.perf_counter() - started, batches


def evaluate(task, model, eval_set, max_samples: int | None) -> dict[str, float]:
    """Eval metrics over the first max_samples samples of the eval set (all if None), equal at any
    world size: global batch b (samples [b*B, (b+1)*B)) is evaluated by rank b % world_size, and
    the per-batch sums are added in batch order after one collective. Every rank runs the same
    number of forwards (ZeRO-3's are collective): a rank without a batch in the last round
    evaluates batch 0 again and drops the result."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    num_samples = eval_set.num_samples if max_samples is None else min(max_samples, eval_set.num_samples)
    num_batches = -(-num_samples // eval_set.batch_size)
    mine = list(range(rank, num_batches, world_size))
    num_rounds = -(-num_batches // world_size)
    sums_NK = torch.zeros(num_batches, len(task.eval_keys), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for round_index, batch in enumerate(eval_set.batches(mine + [0] * (num_rounds - len(mine)), num_samples)):
        sums = task.eval_sums(model, batch)
        if round_index < len(mine):
            sums_NK[mine[round_index]] = torch.tensor(sums, dtype=torch.float64)
    model.train(was_training)
    # Each row is filled on one rank and zero on the others, so the sum over ranks is exact.
    rows = torch.tensor(dist.sum_and_average(sums_NK.reshape(-1)), dtype=torch.float64).view_as(sums_NK).tolist()
    totals = [0.0] * len(task.eval_keys)
    for row in rows:  # in batch order: the same additions at any world size
        totals = [total + value for total, value in zip(totals, row)]
    return task.eval_summary(dict(zip(task.eval_keys, totals)))


# -- what a checkpoint holds besides the engine (Stateful objects; see Trainer.checkpoint_state) --
class RngState:
    """This process's random number generators (Python, NumPy, torch, CUDA)."""

    def state_dict(self) -> dict:
        return rng_states()

    def load_state_dict(self, state: dict) -> None:
        set_rng_states(state)


class EmaState:
    """The weight EMA (None in a checkpoint of a run with train.ema_decay off)."""

    def __init__(self, ema: ModelEma | None, module: torch.nn.Module):
        self.ema, self.module = ema, module

    def state_dict(self) -> dict | None:
        return self.ema.state_dict() if self.ema is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.ema is None:
            return
        if state is None:  # called after the engine's weights are loaded
            log.warning("the checkpoint has no EMA weights (train.ema_decay was off); the EMA starts now")
            self.ema.reset(self.module)
        else:
            self.ema.load_state_dict(state)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_step_rng(seed: int) -> None:
    """Seed the generators a step draws from: the CPU one and, under CUDA, this rank's device.
    Not torch.manual_seed, which also seeds every other backend and, for each one not initialised
    (CUDA, XPU, MTIA on a CPU host), formats a stack trace to defer the seed: 3x the time per
    micro-batch for generators the step never draws from."""
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)


def micro_batch_seed(seed: int, step: int, position: int) -> int:
    """Seed of one micro-batch's randomness (dropout, drop-path, mixup/cutmix): a pure function of
    (seed, step, position), position = micro * world_size + rank, so it never depends on the RNG
    history of the process -- a resumed run, on any number of ranks, draws what the uninterrupted
    one drew at that place of the step."""
    return ((seed * 1_000_003 + step) * 65_537 + position) % 2**63


# -- stop requests: SIGTERM and the spot interruption notice -----------------------------------
class _StopFlag(threading.Event):
    reason = ""

    def request(self, reason: str) -> None:
        self.reason = reason
        self.set()


_STOP = _StopFlag()


def request_stop(reason: str) -> None:
    """Ask the running loop to finish its step, checkpoint and return (preempted=True)."""
    _STOP.request(reason)


def stop_requested() -> bool:
    return _STOP.is_set()


class StopSignals:
    """SIGTERM handler (main thread only) and the optional spot-notice watcher, for one run."""

    def __init__(self, watch_spot: bool):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: request_stop("SIGTERM"))
        else:
            # Under Ray Train, pnet_dist.launch installs the handler on the worker's main thread.
            log.debug("not in the main thread: SIGTERM is left to the caller, whose handler calls request_stop()")
        self._watcher = SpotWatcher() if watch_spot else None

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._watcher is not None:
            self._watcher.close()


class SpotWatcher:
    """Polls the EC2 instance metadata service (IMDSv2) for a spot interruption notice.

    AWS posts spot/instance-action about two minutes before reclaiming the instance; the watcher
    then requests a stop, which the loop serves like SIGTERM. Off unless
    train.watch_spot_interruption is true.
    """

    def __init__(self, endpoint: str = "http://169.254.169.254", interval_s: float = 5.0):
        self.endpoint = endpoint.rstrip("/")
        self.interval_s = interval_s
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spot-watcher", daemon=True)
        self._thread.start()

    def notice(self) -> str | None:
        """The instance-action document if an interruption is scheduled, else None."""
        token_request = urllib.request.Request(f"{self.endpoint}/latest/api/token", method="PUT",
                                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with urllib.request.urlopen(token_request, timeout=2) as response:
            token = response.read().decode()
        action_request = urllib.request.Request(f"{self.endpoint}/latest/meta-data/spot/instance-action",
                                                headers={"X-aws-ec2-metadata-token": token})
        try:
            with urllib.request.urlopen(action_request, timeout=2) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # no interruption scheduled
                return None
            raise

    def _run(self) -> None:
        while not self._closed.wait(self.interval_s):
            try:
                notice = self.notice()
            except OSError as exc:
                log.warning("spot watcher: metadata service unreachable at %s: %s", self.endpoint, exc)
                continue
            if notice:
                request_stop(f"spot interruption notice {notice}")
                return

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    result = train_worker(load_config(args[0], args[1:]))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    # Not 0: a preempted run is unfinished; torchrun --max-restarts and batch schedulers restart it.
    return cli.EXIT_PREEMPTED if result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="pnet_dist.train"))
