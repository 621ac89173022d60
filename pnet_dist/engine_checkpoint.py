"""DeepSpeed checkpoint formats, and a training run's state saved and restored through the store.

Owns everything that knows how a DeepSpeed engine's state becomes files and back; the commit
protocol (upload, MANIFEST, COMPLETE, verify, fencing) is pnet_dist.checkpoint's and knows only
files. `EngineCheckpointer` drives one engine plus the loop's Stateful objects (anything with
state_dict() / load_state_dict(), as torchtitan's checkpointer takes them): save() and the
restores walk the same {name: Stateful} mapping, each rank's into its client_state file.

Formats, chosen by the model (recorded as MANIFEST.json "format"):
- "deepspeed": DeepSpeed's own files (engine.save_checkpoint), as each rank wrote them. Loaded on
  the saved data-parallel world size directly; on another one through DeepSpeed's universal form
  (its ds_to_universal tool, run once in a subprocess and stored beside the checkpoint as the
  derived form "universal"), with the engine's load_universal_checkpoint switched on for that
  one call (ZeRO-1/2/3). At zero_stage 0 nothing is partitioned: the model-states file holds the
  module and the whole optimizer, and loads as it is on any world size.
- "moe": any model with a pnet_dist.models.moe projection under ZeRO-1/2 is saved with
  pnet_dist.moe_deepspeed.save_checkpoint: DeepSpeed's own files would lose the experts of other
  expert-parallel ranks and cannot be resharded (ds_to_universal fails on MoE), while that format
  is one file per global expert with full fp32 weights and optimizer states, loadable at any
  world size and ep_size.

Module buffers (BatchNorm running statistics, num_batches_tracked) come back on every load path:
DeepSpeed restores them on a native load (load_module_state_dict); on a universal load DeepSpeed
0.19.8 skips that call (engine._load_checkpoint: `if not self.load_universal_checkpoint()`), so
they are read here from the converted folder's model-states file; the MoE format stores them in
dense.pt. Buffers are the same on every rank (the loop averages floating buffers every step).

The async save: DeepSpeed writes through engine.checkpoint_engine; during one save it is swapped
for _DeferredWrites, which keeps CPU copies of the state dicts (training goes on changing the live
tensors), and the store's background thread serialises them (torch DCP's async_save does the
same). The client_state files go the same way. Everything touching storage then runs on that
thread (pnet_dist.checkpoint), so a save costs the training loop a memory copy.

Restores never load a damaged checkpoint: every rank fetches and checks (size, sha256, the
format's expected files) all it will read before DeepSpeed's first collective, the ranks agree,
and on any failure every rank falls back to the next older checkpoint together, the damaged one
marked DAMAGED by rank 0. DeepSpeed is imported only where an engine already exists
(pnet_dist.moe_deepspeed, lazily), so this module itself imports no DeepSpeed.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.distributed as dist

from pnet_dist.checkpoint import CheckpointDamaged, CheckpointStore, Scanned, step_dir_name, step_prefix
from pnet_dist.dist import get_rank, get_world_size, rank0_decides
from pnet_dist.log import get_logger
from pnet_dist.models.moe import moe_layers
from pnet_dist.storage import HashingWriter

log = get_logger(__name__)

FORMAT_DEEPSPEED = "deepspeed"
FORMAT_MOE = "moe"
UNIVERSAL = "universal"
_ZERO_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_")
_CLIENT_STATE_RE = re.compile(r"^client_state_rank_(\d+)\.pt$")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def client_state_name(rank: int) -> str:
    return f"client_state_rank_{rank:05d}.pt"


def uses_moe_format(engine) -> bool:
    return bool(moe_layers(engine.module)) and engine.zero_optimization_stage() in (1, 2)


class EngineCheckpointer:
    """Checkpoints of one DeepSpeed engine and the loop's Stateful objects in `store`.

    model_name / model_kwargs (optional) are recorded in every manifest: a resume checks the name,
    and the export tool rebuilds the model from them. Every method is collective.
    """

    def __init__(self, engine, store: CheckpointStore, *, model_name: str | None = None,
                 model_kwargs: dict | None = None):
        self.engine = engine
        self.store = store
        self.model_name = model_name
        self.model_info = {"name": model_name, "kwargs": model_kwargs or {}} if model_name else None

    # -- restoring -------------------------------------------------------------------------
    def start(self, states: Mapping[str, Stateful]) -> int | None:
        """Once per run start: check the newest checkpoint fits this model, claim the run folder
        (fencing out older writers), load the newest checkpoint that passes every check into the
        engine and `states`. The step resumed from, or None for a fresh start.

        A model that does not fit raises ValueError before anything is written."""
        scanned = rank0_decides(self.store.scan)
        usable = [found for found in scanned if found.problem is None]
        if usable:
            self._check_model(usable[0])
        self.store.join_generation(rank0_decides(self.store.claim_generation))
        return self._restore_newest(scanned, states)

    def reload(self, states: Mapping[str, Stateful]) -> int | None:
        """Back to the newest usable checkpoint (after non-finite losses); its step or None."""
        self.wait()
        return self._restore_newest(rank0_decides(self.store.scan), states)

    def _restore_newest(self, scanned: list[Scanned], states: Mapping[str, Stateful]) -> int | None:
        loaded = None
        for found in scanned:
            if found.problem is not None:
                continue
            try:
                self._load(found.step, found.manifest, states)
                loaded = found.step
                break
            except CheckpointDamaged as exc:  # raised on every rank alike (see _agree)
                found.problem = exc.reason
        if get_rank() == 0:
            for found in scanned:  # reported once: DAMAGED keeps later scans from offering it
                if found.problem is not None and (loaded is None or found.step > loaded):
                    self.store.mark_damaged(found.step, found.problem)
        if loaded is None and any(found.problem for found in scanned):
            log.warning("no usable checkpoint under %s: starting from step 0", self.store.root_uri)
        return loaded

    def _check_model(self, found: Scanned) -> None:
        recorded = (found.manifest.get("model") or {}).get("name")
        if self.model_name is not None and recorded is not None and recorded != self.model_name:
            raise ValueError(
                f"{self.store.storage.uri(step_prefix(found.step))} was saved by model {recorded!r}, but this job "
                f"trains model.name={self.model_name!r}. Set model.name={recorded} to resume this run, or start a "
                "new one under another run_name (or checkpoint.uri).")

    def _load(self, step: int, manifest: dict, states: Mapping[str, Stateful]) -> None:
        engine, rank, world = self.engine, get_rank(), get_world_size()
        uri = self.store.storage.uri(step_prefix(step))
        problem = _format_problem(manifest, engine)  # the same manifest on every rank: the same verdict
        if problem is not None:
            raise CheckpointDamaged(step, uri, problem)
        self._check_loadable(manifest, uri)
        name, saved_world, fmt = step_dir_name(step), manifest["world_size"], manifest["format"]
        own_state = client_state_name(rank)
        state_file = own_state if own_state in manifest["files"] else client_state_name(0)
        if state_file != own_state:
            log.warning("checkpoint %s was saved on %d ranks: rank %d takes rank 0's client_state", uri, saved_world, rank)
        universal = fmt == FORMAT_DEEPSPEED and saved_world != world and manifest["zero_stage"] > 0
        download = self.store.staging / "load"
        shutil.rmtree(download, ignore_errors=True)
        try:
            if universal:
                log.info("checkpoint %s was saved on %d ranks, this job has %d: loading its universal form",
                         uri, saved_world, world)
                derived = _agree(lambda: self.store.derived(step, UNIVERSAL, manifest, convert_to_universal),
                                 rank0_only=True)
                step_dir, universal_dir = _agree(lambda: (
                    self.store.fetch(step, download, lambda rel: rel == state_file, manifest)[0],
                    self.store.fetch_derived(step, UNIVERSAL, derived, download)))
                _engine_load(engine, universal_dir, name, universal=True)
                model_states = sorted((universal_dir / name).glob("*model_states.pt"))[0]
                load_buffers(engine.module, torch.load(model_states, map_location="cpu", weights_only=False)["module"])
            elif fmt == FORMAT_MOE:
                step_dir = _agree(lambda: self.store.fetch(
                    step, download, lambda rel: rel == state_file or not _CLIENT_STATE_RE.match(Path(rel).name),
                    manifest)[0])
                from pnet_dist import moe_deepspeed  # imports deepspeed: only where an engine already did
                moe_deepspeed.load_checkpoint(engine, step_dir.parent, name)
            else:
                step_dir = _agree(lambda: self.store.fetch(
                    step, download, lambda rel: _needed_by(rel, rank, state_file), manifest)[0])
                _engine_load(engine, step_dir.parent, name, universal=False)  # buffers: load_module_state_dict
            if getattr(engine.optimizer, "_hp_optimizer_states_linked", False):
                # A load into an engine that has stepped (a reload after non-finite losses)
                # re-creates DeepSpeed's per-parameter fragments without their optimizer-state
                # links, which it otherwise makes only once; without this the MoE save
                # (safe_get_full_optimizer_state) fails after such a reload.
                engine.optimizer._hp_optimizer_states_linked = False
            # Our own file (RNG states in it are not weights_only material); its sha256 is checked.
            client_state = torch.load(step_dir / state_file, map_location="cpu", weights_only=False)
        finally:
            shutil.rmtree(download, ignore_errors=True)
        missing = sorted(set(states) - set(client_state))
        if missing:
            raise ValueError(f"checkpoint {uri} holds no {missing} state (it holds {sorted(client_state)}); it was "
                             "written by another version of pnet_dist")
        for key, stateful in states.items():
            stateful.load_state_dict(client_state[key])
        log.info("loaded checkpoint %s (saved on %d ranks, loaded on %d)", uri, saved_world, world)

    def _check_loadable(self, manifest: dict, uri: str) -> None:
        stage = self.engine.zero_optimization_stage()
        if manifest["format"] == FORMAT_MOE and not uses_moe_format(self.engine):
            raise ValueError(f"checkpoint {uri} holds an MoE model; the engine's model has no MoE projection or "
                             "runs ZeRO stage 3 (check model.name and deepspeed.zero_stage)")
        if manifest["format"] == FORMAT_DEEPSPEED and manifest["zero_stage"] != stage:
            raise ValueError(f"checkpoint {uri} was saved with ZeRO stage {manifest['zero_stage']}, the job runs "
                             f"stage {stage}; set deepspeed.zero_stage={manifest['zero_stage']} to resume it (or "
                             "export it and start from the export with train.init_from)")

    # -- saving ----------------------------------------------------------------------------
    def save(self, step: int, states: Mapping[str, Stateful], *, wait_for_previous: bool) -> bool:
        """Write this rank's part of checkpoint `step` and start publishing it; False if skipped.

        While the previous checkpoint is still being published on any rank (storage slow or
        unreachable), the save is skipped -- training never waits for storage -- unless
        wait_for_previous (the final or the preemption checkpoint). A publish that failed on any
        rank (a fenced writer, an upload past its time-out) raises here on every rank.
        """
        if self._previous_upload(wait=False):
            if not wait_for_previous:
                if get_rank() == 0:
                    log.warning("checkpoint step %d skipped: the previous checkpoint is still uploading (storage "
                                "slow or unreachable); the next checkpoint tries again", step)
                return False
            self._previous_upload(wait=True)
        engine, rank, world = self.engine, get_rank(), get_world_size()
        started = time.monotonic()
        folder = self.store.staging_folder(step)
        fmt = FORMAT_MOE if uses_moe_format(engine) else FORMAT_DEEPSPEED
        writes = _DeferredWrites(engine.checkpoint_engine) if self.store.async_upload else None
        if fmt == FORMAT_MOE:  # writes its files now: it gathers full tensors, no copy to defer
            from pnet_dist import moe_deepspeed  # imports deepspeed: only where an engine already did
            moe_deepspeed.save_checkpoint(engine, folder.parent, folder.name, client_state=None)
        elif writes is not None:
            engine.checkpoint_engine = writes
            try:
                engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state={}, save_latest=False)
            finally:
                engine.checkpoint_engine = writes.real
        else:
            engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state={}, save_latest=False)
        client_state = {key: stateful.state_dict() for key, stateful in states.items()}
        if writes is not None:
            writes.save(client_state, folder / client_state_name(rank))
        else:
            torch.save(client_state, folder / client_state_name(rank))
        info = {"format": fmt, "zero_stage": engine.zero_optimization_stage(), "model": self.model_info}
        log.info("checkpoint step %d %s in %.2fs; uploading%s", step,
                 "copied to CPU memory" if writes is not None else "written locally",
                 time.monotonic() - started, " in the background" if self.store.async_upload else "")
        self.store.publish(step, folder, rank=rank, world_size=world, info=info,
                           prepare=writes.write_all if writes is not None else None)
        return True

    def _previous_upload(self, wait: bool) -> bool:
        """Whether any rank's previous publish is still running (after waiting for it, if `wait`);
        raises on every rank if it failed on any."""
        error = None
        if wait:
            try:
                self.store.wait()
            except RuntimeError as exc:
                error = exc
        own = (self.store.busy(), self.store.failure() or (str(error) if error is not None else None))
        outcomes = [own]
        if get_world_size() > 1:
            outcomes = [None] * get_world_size()
            dist.all_gather_object(outcomes, own)
        failed = {rank: failure for rank, (_, failure) in enumerate(outcomes) if failure is not None}
        if failed:
            if error is not None:
                raise error
            if own[1] is not None:
                self.store.wait()  # raises this rank's own error
            raise RuntimeError(f"checkpoint upload failed on rank(s) {sorted(failed)}: {failed}")
        return any(busy for busy, _ in outcomes)

    def wait(self) -> None:
        """Block until this rank's pending publish is done; raise its error if it failed."""
        self.store.wait()

    @property
    def last_upload_stats(self) -> dict | None:
        return self.store.last_upload_stats


def _agree(fn: Callable[[], Any], *, rank0_only: bool = False) -> Any:
    """fn() on every rank (or on rank 0, its value broadcast); if it fails anywhere, it fails on
    every rank: CheckpointDamaged as CheckpointDamaged (so all ranks fall back together), any
    other error as a RuntimeError naming the failing ranks. Keeps one rank's bad file from
    leaving the others waiting in DeepSpeed's first collective."""
    world = get_world_size()
    outcome, error, value = None, None, None
    if not rank0_only or get_rank() == 0:
        try:
            value = fn()
        except CheckpointDamaged as exc:
            error, outcome = exc, ("damaged", (exc.step, exc.uri, exc.reason))
        except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
    if world > 1:
        if rank0_only:
            box = [outcome or ("ok", value)]
            dist.broadcast_object_list(box, src=0)
            outcomes = {0: box[0]}
            if box[0][0] == "ok":
                value = box[0][1]
        else:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, outcome)
            outcomes = {rank: o for rank, o in enumerate(gathered) if o is not None}
    else:
        outcomes = {0: outcome} if outcome is not None else {}
    damaged = [o[1] for o in outcomes.values() if o[0] == "damaged"]
    failed = {rank: o[1] for rank, o in outcomes.items() if o[0] == "error"}
    if failed:
        if error is not None and not isinstance(error, CheckpointDamaged):
            raise error
        raise RuntimeError(f"checkpoint load failed on rank(s) {sorted(failed)}: {failed}")
    if damaged:
        if isinstance(error, CheckpointDamaged):
            raise error
        raise CheckpointDamaged(*damaged[0])
    return value


def _format_problem(manifest: dict, engine) -> str | None:
    """What a checkpoint of this format must hold and does not (MANIFEST.json lists it all)."""
    files, world = manifest["files"], manifest["world_size"]
    if not isinstance(manifest.get("zero_stage"), int):
        return "MANIFEST.json lacks its 'zero_stage' field"
    missing = [client_state_name(rank) for rank in range(world) if client_state_name(rank) not in files]
    if manifest["format"] == FORMAT_MOE:
        from pnet_dist.models.moe import moe_layers as layers_of
        layers = layers_of(engine.module)
        num_experts = layers[0].num_experts if layers else 0
        missing += [rel for rel in ["moe_checkpoint.json", "dense.pt"] + [f"expert_{e:03d}.pt" for e in range(num_experts)]
                    if rel not in files]
    elif manifest["format"] == FORMAT_DEEPSPEED:
        if not any(rel.endswith("model_states.pt") for rel in files):
            missing.append("the model-states file")
        shards = {int(m.group(1)) for rel in files if (m := _ZERO_SHARD_RE.match(Path(rel).name)) and "optim" in rel}
        if manifest["zero_stage"] > 0:
            missing += [f"the ZeRO optimizer shard of rank {rank}" for rank in range(world) if rank not in shards]
    else:
        return f"MANIFEST.json format {manifest['format']!r} is none this version reads"
    if missing:
        return f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} missing from the checkpoint"
    return None


def load_buffers(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the module's persistent buffers (BatchNorm statistics, ...) from a state dict."""
    persistent = set(module.state_dict())
    buffers = {name: buffer for name, buffer in module.named_buffers() if name in persistent}
    missing = sorted(set(buffers) - set(state))
    if missing:
        raise ValueError(f"the checkpoint's module state lacks buffers {missing[:3]} ({len(missing)} in all)")
    with torch.no_grad():
        for name, buffer in buffers.items():
            buffer.copy_(state[name])


def _engine_load(engine, load_dir: Path, name: str, universal: bool) -> None:
    # load_universal_checkpoint is read only inside load_checkpoint, so it is switched on for this
    # call alone; the ds_config never needs it.
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {name} in {load_dir}")


def convert_to_universal(step_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint folder, in a subprocess (isolates its worker
    pools). --inject_missing_state is what ZeRO-1/2 checkpoints of plain models need; it changes
    nothing for ZeRO-3."""
    num_workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
           "--output_folder", str(out_dir), "--inject_missing_state",
           "--num_extract_workers", num_workers, "--num_merge_workers", num_workers]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {step_dir} (exit {result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-4000:]}")
    log.info("converted %s to a universal checkpoint in %.1fs", step_dir, time.monotonic() - started)


class _DeferredWrites:
    """Stands in for engine.checkpoint_engine during one asynchronous save (and takes the
    client_state write too): keeps a CPU copy of every state dict handed to save(); write_all()
    writes them later, on the store's background thread, with the real checkpoint engine.
    Everything else is the real engine's."""

    def __init__(self, real):
        self.real = real
        self.pending: list[tuple[str, Any]] = []

    def save(self, state_dict, path) -> None:
        self.pending.append((str(path), _cpu_snapshot(state_dict)))

    def write_all(self) -> dict[str, str]:
        """Write every pending state; {path: sha256} of the files whose bytes were hashed on their
        way to the disk (DeepSpeed's torch.save engine, the one in use on CPU and GPU nodes alike):
        their upload reads them without hashing them again."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
        digests = {}
        for path, state in self.pending:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if type(self.real) is not TorchCheckpointEngine:  # another engine (or a subclass): its own save
                self.real.save(state, path)
                continue
            with open(path, "wb") as f:  # what TorchCheckpointEngine.save does, through a hashing writer
                writer = HashingWriter(f)
                torch.save(state, writer, _use_new_zipfile_serialization=self.real.zipfile_serialization)
            digests[path] = writer.hexdigest()
        self.pending.clear()
        return digests

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def _cpu_snapshot(obj: Any) -> Any:
    """A copy of a nested state that training cannot change any more: tensors copied to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the dict's type (OrderedDict, ...)
        for key, value in obj.items():
            out[key] = _cpu_snapshot(value)
        return out
    if isinstance(obj, list):
        return [_cpu_snapshot(value) for value in obj]
    if isinstance(obj, tuple):
        values = [_cpu_snapshot(value) for value in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)
    return copy.deepcopy(obj)


def _needed_by(rel: str, rank: int, state_file: str) -> bool:
    """Files a rank reads on a same-topology load: the shared ones and its own shards."""
    base = Path(rel).name
    if _CLIENT_STATE_RE.match(base):
        return rel == state_file
    shard = _ZERO_SHARD_RE.match(base)
    return shard is None or int(shard.group(1)) == rank
