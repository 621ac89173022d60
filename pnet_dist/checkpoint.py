"""Checkpoints: save, upload, validate, prune and load the whole training state.

Owns `CheckpointManager` (the engine's only handle on checkpoints) and the storage layout.
root_uri is the run folder, <checkpoint.uri>/<run_name>, a local (shared) folder or s3://:

    ckpt/step_00000100/
        mp_rank_00_model_states.pt, zero_pp_rank_K_*.pt    DeepSpeed's files, as each rank wrote them
          (or dense.pt, expert_EEE.pt, moe_checkpoint.json for MoE models, see below)
        client_state_rank_00000.pt ...    the engine's client_state of every rank (loader position,
                                          counters, RNG states, EMA)
        rank_00000.done ...               per-rank upload receipt: its files with size and sha256
        MANIFEST.json                     every file with size + sha256, world size, ZeRO stage
        COMPLETE                          written last; holds the sha256 of MANIFEST.json
        universal/                        DeepSpeed universal checkpoint made by the first resume
                                          on another world size (own MANIFEST.json + COMPLETE),
                                          reused by later ones

Saving (collective, every rank calls save()): the engine's save runs synchronously, but with
async_upload the state dicts it would write are only copied to CPU memory (_DeferredWrites); a
background thread writes them into a local staging folder, uploads the files (retries with
backoff until checkpoint.upload_timeout_s, in pnet_dist.storage) and writes the rank's receipt. Rank 0's thread polls
storage until every rank's receipt exists, then writes MANIFEST.json and COMPLETE and prunes old
checkpoints. The thread issues no collective, so it never interleaves with the training loop's
collectives (ranks meet through storage only). The next save() first waits for the previous
upload, so at most one upload is in flight and its error surfaces there or in wait().

Loading: latest_complete() walks the checkpoints newest first and skips, with a warning naming it,
one without COMPLETE, whose COMPLETE does not match its manifest, or whose files are missing or of
the wrong size (truncated); load() verifies the sha256 of every file it reads. A checkpoint saved
on another data-parallel world size is converted once to DeepSpeed's universal format (its
ds_to_universal tool, run in a subprocess: DeepSpeed is imported only by the engine) and loaded
with the engine's load_universal_checkpoint switched on for that one call (ZeRO-1/2/3).

MoE models (any pnet_dist.models.moe projection, ZeRO-1/2) are saved with
pnet_dist.moe_deepspeed.save_checkpoint instead of engine.save_checkpoint: DeepSpeed's own files
would lose the experts of other expert-parallel ranks and cannot be resharded (ds_to_universal
fails on MoE), while that format is one file per global expert with full fp32 weights and
optimizer states, loadable at any world size and ep_size.

A local root must be one folder every rank sees (a shared file system); otherwise use s3://.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pnet_dist.dist import get_rank, get_world_size, rank0_decides
from pnet_dist.log import get_logger
from pnet_dist.models.moe import moe_layers
from pnet_dist.storage import RetryPolicy, is_s3, open_storage

log = get_logger(__name__)

CKPT_DIR = "ckpt"
MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"
FORMAT_DEEPSPEED = "deepspeed"
FORMAT_MOE = "moe"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_ZERO_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_")
_CLIENT_STATE_RE = re.compile(r"^client_state_rank_(\d+)\.pt$")
_HASH_CHUNK = 8 << 20
_FILES_IN_FLIGHT = 4
_STORAGE_ATTEMPTS = 10_000


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def client_state_name(rank: int) -> str:
    return f"client_state_rank_{rank:05d}.pt"


def receipt_name(rank: int) -> str:
    return f"rank_{rank:05d}.done"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _uses_moe_format(engine) -> bool:
    return bool(moe_layers(engine.module)) and engine.zero_optimization_stage() in (1, 2)


class CheckpointManager:
    """Checkpoints of one run under root_uri (= <checkpoint.uri>/<run_name>).

    model_name / model_kwargs (optional) are recorded in every manifest so the export tool can
    rebuild the model without being told. staging_dir (optional) is where ranks write before
    uploading; by default <root>/.staging for a local root (same file system: files are moved,
    not copied) and the system temp folder for s3://.
    """

    def __init__(self, root_uri: str, keep_last: int = 3, async_upload: bool = True,
                 upload_timeout_s: float = 600.0, *, model_name: str | None = None,
                 model_kwargs: dict | None = None, staging_dir: str | None = None):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        if upload_timeout_s <= 0:
            raise ValueError(f"checkpoint.upload_timeout_s must be > 0, got {upload_timeout_s}")
        self.root_uri = root_uri.rstrip("/")
        self.keep_last = keep_last
        self.async_upload = async_upload
        self.upload_timeout_s = upload_timeout_s
        self.model_info = {"name": model_name, "kwargs": model_kwargs or {}} if model_name else None
        # Retried until the time-out, not for a fixed number of attempts: an S3 outage shorter
        # than upload_timeout_s must not fail the checkpoint (ray #47939).
        self.storage = open_storage(self.root_uri, RetryPolicy(max_attempts=_STORAGE_ATTEMPTS, timeout_s=upload_timeout_s))
        self._local_root = None if is_s3(self.root_uri) else Path(self.root_uri)
        if staging_dir is not None:
            staging_base = Path(staging_dir)
        elif self._local_root is not None:
            staging_base = self._local_root / ".staging"
        else:
            staging_base = Path(tempfile.gettempdir()) / "pnet_dist_staging"
        _remove_dead_staging(staging_base)
        self._staging = staging_base / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # This rank's last finished upload: step, num_bytes, write_s (background serialisation),
        # upload_s (upload and receipt; on rank 0 until COMPLETE), prune_s (rank 0: old ones removed).
        self.last_upload_stats: dict | None = None

    # -- public interface ------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict) -> None:
        """Collective: write this rank's part of checkpoint `step` and start uploading it.

        Returns once the state is copied to CPU memory (async_upload; the MoE format writes its
        files first) or the checkpoint is complete (sync). A step that already has a complete
        checkpoint is left as it is.
        """
        self.wait()
        rank, world = get_rank(), get_world_size()
        name = step_dir_name(step)
        if rank0_decides(lambda: self._clear_step_unless_complete(name)):
            log.info("checkpoint %s is already complete; not saving it again", self.storage.uri(f"{CKPT_DIR}/{name}"))
            return
        started = time.monotonic()
        save_root = self._staging / "save"
        step_dir = save_root / name
        shutil.rmtree(step_dir, ignore_errors=True)
        step_dir.mkdir(parents=True)  # every rank: MoE expert writers other than rank 0 write here
        fmt = FORMAT_MOE if _uses_moe_format(engine) else FORMAT_DEEPSPEED
        writes = _DeferredWrites(engine.checkpoint_engine) if self.async_upload and fmt == FORMAT_DEEPSPEED else None
        if fmt == FORMAT_MOE:
            from pnet_dist import moe_deepspeed  # imports deepspeed: only where an engine already did
            moe_deepspeed.save_checkpoint(engine, save_root, name, client_state=None)
        elif writes is not None:
            engine.checkpoint_engine = writes
            try:
                engine.save_checkpoint(str(save_root), tag=name, client_state={}, save_latest=False)
            finally:
                engine.checkpoint_engine = writes.real
        else:
            engine.save_checkpoint(str(save_root), tag=name, client_state={}, save_latest=False)
        state_path = step_dir / client_state_name(rank)
        if writes is not None:
            writes.save(client_state, str(state_path))
        else:
            torch.save(client_state, state_path)
        info = {"format": fmt, "step": step, "world_size": world,
                "zero_stage": engine.zero_optimization_stage(), "model": self.model_info}
        log.info("checkpoint step %d %s in %.2fs; uploading%s", step,
                 "copied to CPU memory" if writes is not None else "written locally",
                 time.monotonic() - started, " in the background" if self.async_upload else "")

        def job() -> None:
            write_started = time.monotonic()
            if writes is not None:
                writes.write_all()
            files = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
            upload_started = time.monotonic()
            num_bytes = self._upload(name, step_dir, files, rank, info)
            prune_started = time.monotonic()
            if rank == 0:
                self._prune()
            self.last_upload_stats = {"step": step, "num_bytes": num_bytes,
                                      "write_s": upload_started - write_started,
                                      "upload_s": prune_started - upload_started,
                                      "prune_s": time.monotonic() - prune_started}

        if self.async_upload:
            # Not a daemon: an interpreter that exits without wait() still finishes the upload.
            self._thread = threading.Thread(target=self._run_in_background, args=(job,),
                                            name=f"checkpoint-upload-{name}")
            self._thread.start()
        else:
            job()

    def wait(self) -> None:
        """Block until the pending upload is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload failed: {error}") from error

    def uploading(self) -> bool:
        """True while a background upload is running (wait() would block)."""
        return self._thread is not None and self._thread.is_alive()

    def latest_complete(self, verify: str = "size") -> int | None:
        """Newest step whose checkpoint is complete; broken ones are skipped with a warning.

        verify="size" checks presence and size of every file (cheap: no download);
        verify="sha256" also reads every file and checks its checksum.
        """
        if verify not in ("size", "sha256"):
            raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
        steps = self._list_steps()
        for name in sorted(steps, key=_step_of, reverse=True):
            _, reason = self._read_manifest(f"{CKPT_DIR}/{name}", steps[name], verify)
            if reason is None:
                return _step_of(name)
            log.warning("skipping checkpoint %s: %s", self.storage.uri(f"{CKPT_DIR}/{name}"), reason)
        return None

    def manifest(self, step: int) -> dict:
        """MANIFEST.json of complete checkpoint `step` (format, world_size, zero_stage, model, files)."""
        return self._valid_manifest(f"{CKPT_DIR}/{step_dir_name(step)}")

    def saved_world_size(self, step: int) -> int:
        """Data-parallel world size checkpoint `step` was saved with."""
        return self.manifest(step)["world_size"]

    def load(self, engine, step: int) -> dict:
        """Collective: load checkpoint `step` into engine; return this rank's client_state.

        On another world size than the save's, ranks beyond the saved ones get rank 0's
        client_state (the engine re-seeds per-rank RNGs; see saved_world_size()).
        """
        self.wait()
        rank, world = get_rank(), get_world_size()
        self._check_same_everywhere(step, "step")
        name = step_dir_name(step)
        prefix = f"{CKPT_DIR}/{name}"
        # Rank 0 validates the manifest (one pass over storage, not one per rank); every rank
        # checks the files it reads, and all agree before DeepSpeed's first collective: one
        # rank's corrupted shard must fail every rank, not hang the others.
        manifest = rank0_decides(lambda: self._valid_manifest(prefix))
        self._all_ok(lambda: self._check_loadable(engine, manifest, prefix))
        saved_world = manifest["world_size"]
        own_state = client_state_name(rank)
        state_file = own_state if own_state in manifest["files"] else client_state_name(0)
        if state_file != own_state:
            log.warning("checkpoint %s was saved on %d ranks: rank %d takes rank 0's client_state",
                        self.storage.uri(prefix), saved_world, rank)
        universal = manifest["format"] == FORMAT_DEEPSPEED and saved_world != world and manifest["zero_stage"] > 0
        if universal:
            log.info("checkpoint %s was saved on %d ranks, this job has %d: loading its universal form",
                     self.storage.uri(prefix), saved_world, world)
            universal_manifest = rank0_decides(lambda: self._ensure_universal(name, manifest))
        download_dir = self._staging / "load"
        shutil.rmtree(download_dir, ignore_errors=True)
        try:
            if manifest["format"] == FORMAT_MOE:
                step_dir = self._all_ok(lambda: self._fetch(
                    prefix, manifest, download_dir / name,
                    lambda rel: rel == state_file or not _CLIENT_STATE_RE.match(Path(rel).name)))
                from pnet_dist import moe_deepspeed
                moe_deepspeed.load_checkpoint(engine, step_dir.parent, name)
            elif universal:
                step_dir, load_dir = self._all_ok(lambda: (
                    self._fetch(prefix, manifest, download_dir / name, lambda rel: rel == state_file),
                    self._fetch(f"{prefix}/{UNIVERSAL}", universal_manifest, download_dir / UNIVERSAL,
                                lambda rel: True)))
                self._engine_load(engine, load_dir, name, universal=True)
            else:
                step_dir = self._all_ok(lambda: self._fetch(prefix, manifest, download_dir / name,
                                                            lambda rel: _needed_by(rel, rank, state_file)))
                self._engine_load(engine, step_dir.parent, name, universal=False)
            if getattr(engine.optimizer, "_hp_optimizer_states_linked", False):
                # A load into an engine that has stepped (a reload after non-finite losses)
                # re-creates DeepSpeed's per-parameter fragments without their optimizer-state
                # links, which it otherwise makes only once; without this the MoE save
                # (safe_get_full_optimizer_state) fails after such a reload.
                engine.optimizer._hp_optimizer_states_linked = False
            client_state = torch.load(step_dir / state_file, map_location="cpu", weights_only=False)
        finally:
            shutil.rmtree(download_dir, ignore_errors=True)
        log.info("loaded checkpoint %s (saved on %d ranks, loaded on %d)", self.storage.uri(prefix), saved_world, world)
        return client_state

    def _check_loadable(self, engine, manifest: dict, prefix: str) -> None:
        if manifest["format"] == FORMAT_MOE and not _uses_moe_format(engine):
            raise ValueError(f"checkpoint {self.storage.uri(prefix)} holds an MoE model; the engine's model has no "
                             "MoE projection or runs ZeRO stage 3 (check model.name and deepspeed.zero_stage)")
        stage = engine.zero_optimization_stage()
        if manifest["format"] == FORMAT_DEEPSPEED and manifest["zero_stage"] != stage:
            raise ValueError(f"checkpoint {self.storage.uri(prefix)} was saved with ZeRO stage "
                             f"{manifest['zero_stage']}, the job runs stage {stage}; set deepspeed.zero_stage="
                             f"{manifest['zero_stage']} to resume it (or export it and start from the export "
                             "with train.init_from)")

    def fetch(self, step: int, dest_dir: str | os.PathLike,
              wanted: Callable[[str], bool] = lambda rel: True) -> tuple[Path, dict]:
        """The files of complete checkpoint `step` that `wanted` (relative path -> bool) picks, in a
        local folder, checksums verified.

        Returns (folder, manifest); the folder is the checkpoint itself on a local root (nothing
        copied), dest_dir/step_XXXXXXXX on s3://. For export and inspection, not for resuming.
        """
        prefix = f"{CKPT_DIR}/{step_dir_name(step)}"
        manifest = self._valid_manifest(prefix)
        return self._fetch(prefix, manifest, Path(dest_dir) / step_dir_name(step), wanted), manifest

    # -- saving ----------------------------------------------------------------------------
    def _clear_step_unless_complete(self, name: str) -> bool:
        """Rank 0, before a save: True if `name` is complete; else drop what a crashed save left."""
        prefix = f"{CKPT_DIR}/{name}"
        if self.storage.exists(f"{prefix}/{COMPLETE}"):
            return True
        self.storage.delete_prefix(f"{prefix}/")
        return False

    def _run_in_background(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 -- handed to the training thread by wait()
            log.error("checkpoint upload failed: %s", exc)
            self._error = exc

    def _upload(self, name: str, step_dir: Path, files: list[str], rank: int, info: dict) -> int:
        """Publish this rank's files and receipt (rank 0 then completes the checkpoint); its bytes."""
        deadline = time.monotonic() + self.upload_timeout_s
        prefix = f"{CKPT_DIR}/{name}"
        started = time.monotonic()
        receipt = {"rank": rank, "step": info["step"], "world_size": info["world_size"],
                   "files": self._publish_files(step_dir, files, prefix, deadline)}
        self.storage.put_bytes(json.dumps(receipt, indent=1).encode(), f"{prefix}/{receipt_name(rank)}")
        shutil.rmtree(step_dir, ignore_errors=True)
        num_bytes = sum(meta["size"] for meta in receipt["files"].values())
        log.info("rank %d uploaded checkpoint step %d: %.1f MB in %.2fs", rank, info["step"],
                 num_bytes / 1e6, time.monotonic() - started)
        if rank == 0:
            self._finalize(name, info, deadline)
        return num_bytes

    def _publish_files(self, src_dir: Path, files: list[str], prefix: str, deadline: float) -> dict:
        """Upload (or, on a local root, move) files; returns {rel: {size, sha256}}."""
        sizes = {rel: (src_dir / rel).stat().st_size for rel in files}
        # Hashing runs beside the uploads (hashlib and sockets release the GIL); several files
        # are in flight at once, as a raw boto3 upload of many parts would be.
        with ThreadPoolExecutor(max_workers=1) as hasher, ThreadPoolExecutor(max_workers=_FILES_IN_FLIGHT) as uploader:
            digests = {rel: hasher.submit(sha256_file, src_dir / rel) for rel in files}
            if self._local_root is None:
                uploads = [uploader.submit(self._put_before_deadline, src_dir / rel, f"{prefix}/{rel}", deadline)
                           for rel in sorted(files, key=sizes.get, reverse=True)]
                for upload in uploads:
                    upload.result()
            else:
                for rel in files:
                    digests[rel].result()  # read before the move takes the file away
                    self._move_into_root(src_dir / rel, f"{prefix}/{rel}")
            return {rel: {"size": sizes[rel], "sha256": digests[rel].result()} for rel in files}

    def _put_before_deadline(self, path: Path, key: str, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"upload of {self.storage.uri(key)} passed checkpoint.upload_timeout_s="
                               f"{self.upload_timeout_s:g}s")
        self.storage.put_file(path, key)

    def _move_into_root(self, src: Path, key: str) -> None:
        dest = self._local_dir(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dest)
        except OSError:  # staging_dir on another file system
            self.storage.put_file(src, key)

    def _finalize(self, name: str, info: dict, deadline: float) -> None:
        """Rank 0's thread: wait for every rank's receipt, then MANIFEST.json and COMPLETE."""
        prefix = f"{CKPT_DIR}/{name}"
        pending, receipts = set(range(info["world_size"])), {}
        delay = 0.02
        while True:
            present = set(self.storage.list(f"{prefix}/"))  # one listing a round, not a GET per missing rank
            for rank in sorted(pending):
                if f"{prefix}/{receipt_name(rank)}" in present:
                    receipts[rank] = json.loads(self.storage.get_bytes(f"{prefix}/{receipt_name(rank)}"))
                    pending.discard(rank)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"checkpoint {self.storage.uri(prefix)}: ranks {sorted(pending)} did not finish uploading "
                    f"within checkpoint.upload_timeout_s={self.upload_timeout_s:g}s; it stays incomplete "
                    "and resume skips it")
            time.sleep(delay)
            delay = min(2.0, delay * 2)
        files: dict[str, dict] = {}
        for rank, receipt in sorted(receipts.items()):
            if receipt["step"] != info["step"] or receipt["world_size"] != info["world_size"]:
                raise RuntimeError(f"{self.storage.uri(prefix)}/{receipt_name(rank)} belongs to another save "
                                   f"(step {receipt['step']}, world size {receipt['world_size']})")
            for rel, meta in receipt["files"].items():
                if rel in files and files[rel]["sha256"] != meta["sha256"]:
                    raise RuntimeError(f"ranks {files[rel]['rank']} and {rank} wrote different contents to "
                                       f"{self.storage.uri(prefix)}/{rel}")
                files[rel] = {**meta, "rank": rank}
        self._write_manifest(prefix, {**info, "created_unix": time.time(), "files": files})
        log.info("checkpoint %s complete (%d files, %.1f MB)", self.storage.uri(prefix), len(files),
                 sum(meta["size"] for meta in files.values()) / 1e6)

    def _write_manifest(self, prefix: str, manifest: dict) -> None:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.storage.put_bytes(data, f"{prefix}/{MANIFEST}")
        self.storage.put_bytes(hashlib.sha256(data).hexdigest().encode(), f"{prefix}/{COMPLETE}")

    def _prune(self) -> None:
        """Keep the newest keep_last complete checkpoints; drop older ones and older broken ones."""
        steps = self._list_steps()
        complete = sorted((n for n, keys in steps.items() if COMPLETE in keys), key=_step_of)
        keep = set(complete[-self.keep_last:])
        newest = _step_of(complete[-1]) if complete else -1
        for name in steps:
            if name not in keep and _step_of(name) < newest:
                log.info("removing old checkpoint %s", self.storage.uri(f"{CKPT_DIR}/{name}"))
                self.storage.delete_prefix(f"{CKPT_DIR}/{name}/")

    # -- reading ---------------------------------------------------------------------------
    def _list_steps(self) -> dict[str, dict[str, int]]:
        """{step folder name: {key under it (relative): size}} for every step folder in storage."""
        steps: dict[str, dict[str, int]] = {}
        for key, size in self.storage.list_sizes(f"{CKPT_DIR}/").items():
            parts = key.split("/", 2)
            if len(parts) == 3 and _STEP_RE.match(parts[1]):
                steps.setdefault(parts[1], {})[parts[2]] = size
        return steps

    def _read_manifest(self, prefix: str, sizes: dict[str, int] | None,
                       verify: str = "size") -> tuple[dict | None, str | None]:
        """(manifest, None) if the checkpoint at prefix is complete and intact, else (None, reason).

        sizes: {key under prefix: size} from a listing the caller already has; None lists prefix
        here. Presence and size of every file are checked against the listing (one request per
        1,000 keys, not one per file)."""
        if sizes is None:
            sizes = {key[len(prefix) + 1:]: size for key, size in self.storage.list_sizes(f"{prefix}/").items()}
        if COMPLETE not in sizes:
            return None, "no COMPLETE marker (the save or its upload was interrupted)"
        try:
            marker = self.storage.get_bytes(f"{prefix}/{COMPLETE}").decode().strip()
            data = self.storage.get_bytes(f"{prefix}/{MANIFEST}")
        except FileNotFoundError as exc:
            return None, f"{exc} is missing"
        if hashlib.sha256(data).hexdigest() != marker:
            return None, f"{COMPLETE} does not match {MANIFEST} (a different save overwrote one of them)"
        try:
            manifest = json.loads(data)
        except json.JSONDecodeError as exc:
            return None, f"{MANIFEST} is not valid JSON: {exc}"
        for rel, meta in manifest["files"].items():
            size = sizes.get(rel)
            if size is None:
                return None, f"file {rel} listed in {MANIFEST} is missing"
            if size != meta["size"]:
                return None, f"file {rel} has {size} bytes, {MANIFEST} says {meta['size']} (truncated or overwritten)"
        if verify == "sha256":
            for rel, meta in manifest["files"].items():
                if self._sha256_in_storage(f"{prefix}/{rel}") != meta["sha256"]:
                    return None, f"file {rel} does not match its sha256 in {MANIFEST} (corrupted)"
        return manifest, None

    def _valid_manifest(self, prefix: str) -> dict:
        manifest, reason = self._read_manifest(prefix, None)
        if reason is not None:
            raise ValueError(f"checkpoint {self.storage.uri(prefix)} cannot be loaded: {reason}; "
                             "resume from CheckpointManager.latest_complete() instead")
        return manifest

    def _sha256_in_storage(self, key: str) -> str:
        if self._local_root is not None:
            return sha256_file(self._local_dir(key))
        with tempfile.TemporaryDirectory(dir=self._ensure_staging()) as tmp:
            self.storage.get_file(key, Path(tmp) / "blob")
            return sha256_file(Path(tmp) / "blob")

    def _fetch(self, prefix: str, manifest: dict, dest_dir: Path, wanted: Callable[[str], bool]) -> Path:
        """Make the wanted files of the checkpoint at prefix readable locally, checksums verified.

        Returns the local folder holding them: the storage folder itself on a local root,
        dest_dir (downloaded into) on s3://.
        """
        folder = self._local_dir(prefix) if self._local_root is not None else dest_dir
        for rel, meta in manifest["files"].items():
            if not wanted(rel):
                continue
            if self._local_root is None:
                self.storage.get_file(f"{prefix}/{rel}", folder / rel)
            if sha256_file(folder / rel) != meta["sha256"]:
                raise ValueError(f"{self.storage.uri(prefix)}/{rel} does not match its sha256 in {MANIFEST}: the "
                                 f"checkpoint is corrupted; delete {self.storage.uri(prefix)} to resume from the "
                                 "previous complete checkpoint")
        return folder

    def _engine_load(self, engine, load_dir: Path, name: str, universal: bool) -> None:
        # load_universal_checkpoint is read only inside load_checkpoint, so it is switched on for
        # this call alone; the ds_config never needs it.
        engine._config.load_universal_checkpoint = universal
        try:
            load_path, _ = engine.load_checkpoint(str(load_dir), tag=name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {name} in {load_dir}")

    def _ensure_universal(self, name: str, manifest: dict) -> dict:
        """Rank 0: make (once) and store the universal form of checkpoint `name`; its manifest."""
        prefix = f"{CKPT_DIR}/{name}/{UNIVERSAL}"
        existing, _ = self._read_manifest(prefix, None)
        if existing is not None:
            return existing
        work = self._ensure_staging() / "universal_build"
        shutil.rmtree(work, ignore_errors=True)
        try:
            source = self._fetch(f"{CKPT_DIR}/{name}", manifest, work / "source" / name, lambda rel: True)
            out_dir = work / "out" / name
            convert_to_universal(source, out_dir)
            files = sorted(p.relative_to(out_dir.parent).as_posix() for p in out_dir.rglob("*") if p.is_file())
            self.storage.delete_prefix(f"{prefix}/")
            published = self._publish_files(out_dir.parent, files, prefix, time.monotonic() + self.upload_timeout_s)
            universal = {"format": "deepspeed_universal", "step": manifest["step"], "files": published}
            self._write_manifest(prefix, universal)
            return universal
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------
    def _local_dir(self, key: str) -> Path:
        assert self._local_root is not None
        return self._local_root / key

    def _ensure_staging(self) -> Path:
        self._staging.mkdir(parents=True, exist_ok=True)
        return self._staging

    @staticmethod
    def _all_ok(fn: Callable[[], Any]) -> Any:
        """Run fn on every rank; if it fails on any rank, raise on all of them."""
        world = get_world_size()
        error = None
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
            error = exc
        if world > 1:
            errors: list[Any] = [None] * world
            dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
            failed = {r: e for r, e in enumerate(errors) if e is not None}
            if failed and error is None:
                raise RuntimeError(f"checkpoint load failed on other ranks: {failed}")
        if error is not None:
            raise error
        return value

    @staticmethod
    def _check_same_everywhere(value: int, what: str) -> None:
        world = get_world_size()
        if world == 1:
            return
        values: list[Any] = [None] * world
        dist.all_gather_object(values, value)
        if len(set(values)) != 1:
            raise ValueError(f"ranks disagree on the checkpoint {what} to load: {values}")


def convert_to_universal(step_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint folder, in a subprocess (keeps DeepSpeed out
    of this module; also isolates its worker pools). --inject_missing_state is what ZeRO-1/2
    checkpoints of plain models need; it changes nothing for ZeRO-3."""
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
    """Stands in for engine.checkpoint_engine during one asynchronous save.

    DeepSpeed hands it every state dict it would write; it keeps a CPU copy (later steps change
    the live tensors) and the background thread writes them with the real checkpoint engine. The
    training loop thus waits for a memory copy, not for serialisation and disk (torch DCP's
    async_save does the same). Everything else is the real engine's.
    """

    def __init__(self, real):
        self.real = real
        self.pending: list[tuple[str, Any]] = []

    def save(self, state_dict, path: str) -> None:
        self.pending.append((str(path), _cpu_snapshot(state_dict)))

    def write_all(self) -> None:
        for path, state in self.pending:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.real.save(state, path)
        self.pending.clear()

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


def _step_of(name: str) -> int:
    return int(_STEP_RE.match(name).group(1))


def _needed_by(rel: str, rank: int, state_file: str) -> bool:
    """Files a rank reads on a same-topology load: the shared ones and its own shards."""
    base = Path(rel).name
    if _CLIENT_STATE_RE.match(base):
        return rel == state_file
    shard = _ZERO_SHARD_RE.match(base)
    return shard is None or int(shard.group(1)) == rank


def _remove_dead_staging(base: Path) -> None:
    """Remove staging folders that processes on this host left when they died."""
    if not base.is_dir():
        return
    host = socket.gethostname()
    for entry in base.iterdir():
        owner_host, _, rest = entry.name.rpartition("-")[0].rpartition("-")
        pid = rest
        if owner_host != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass
