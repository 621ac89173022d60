"""The checkpoint commit protocol: how a checkpoint's files become a complete checkpoint in storage.

Owns `CheckpointStore`: the layout of a run folder's checkpoints, background publishing (upload,
per-rank receipt, MANIFEST.json, COMPLETE, pruning), verification, DAMAGED markers, fetching, and
run-folder fencing. It knows files, not engines: the format side (pnet_dist.engine_checkpoint)
writes a rank's files into a local folder before publish() and reads what fetch() returns. No
DeepSpeed and no torch here; ranks meet through storage only (no collective in this module).

root_uri is the run folder, <checkpoint.uri>/<run_name>, a local (shared) folder or s3://:

    fence/generation_00000003.json    one per writer generation (job start or restarted group)
    ckpt/step_00000100/
        ...                           the format's files, as each rank wrote them
        rank_00000.done ...           per-rank receipt: generation, its files with size and sha256
        MANIFEST.json                 every file with size + sha256, step, world size, generation,
                                      and what the format side recorded (format, model, ...)
        COMPLETE                      written last; holds the sha256 of MANIFEST.json
        DAMAGED                       (only if a check failed) why; resume skips the checkpoint
        universal/ ...                a form derived from the checkpoint (derived()), with its own
                                      MANIFEST.json and COMPLETE

Saving: publish() hands the files to a background thread (or runs inline with async_upload off).
Every storage call of a save runs there -- the fence check, "is this step complete already?", the
uploads (sha256 taken from the bytes as prepare() wrote them, else as they are read for the upload),
the receipt, and on rank 0 the wait for every rank's receipt, the removal of files an earlier
crashed save left, MANIFEST.json, COMPLETE and pruning -- so an object-store outage never stalls
training. Retries run until checkpoint.upload_timeout_s. One publish is in flight at a time
(busy()); the caller decides whether a new save waits or is skipped.

Loading: scan() lists the checkpoints newest first, each with the problem its listing shows (no
COMPLETE, COMPLETE not matching MANIFEST.json, a manifest that is not JSON or lacks its fields, a
missing or wrongly sized file); fetch() checks the sha256 of every file it hands out. A failed
check raises CheckpointDamaged; mark_damaged() then writes DAMAGED (nothing is deleted), which
scan() skips from then on, so no later restart chooses it again. Pruning keeps DAMAGED
checkpoints for a person to inspect; a later save of the same step replaces one, with a warning.

Fencing (one writer per run folder): every start claims the next generation number by creating
fence/generation_N.json exclusively (S3 conditional write If-None-Match, an exclusive link on a
local folder). Before each write -- or group of writes issued together: a rank's file uploads,
MANIFEST.json with COMPLETE -- a writer checks (one HEAD request) that no generation N+1 exists;
one that finds it stops with `Fenced` and writes nothing more -- e.g. workers orphaned when their launcher died,
still training while a new job resumed the run. Without compare-and-swap on every write, a write
already under way when the new generation is claimed can still land (one object per rank); it
cannot join a checkpoint of the new generation: receipts name their generation and rank 0
collects only its own.

A local root must be one folder every rank sees (a shared file system); otherwise use s3://.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from pnet_dist.log import get_logger
from pnet_dist.storage import RetryPolicy, is_s3, open_storage, sha256_file

log = get_logger(__name__)

CKPT_DIR = "ckpt"
FENCE_DIR = "fence"
MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
DAMAGED = "DAMAGED"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_GENERATION_RE = re.compile(r"^generation_(\d{8,})\.json$")
_RECEIPT_RE = re.compile(r"^rank_(\d{5,})\.done$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FILES_IN_FLIGHT = 4
_STORAGE_ATTEMPTS = 10_000
# What MANIFEST.json must hold for the store to use it (the format side checks its own keys).
_MANIFEST_FIELDS = {"step": int, "world_size": int, "format": str, "files": dict}
_DERIVED_FIELDS = {"step": int, "format": str, "files": dict}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_prefix(step: int) -> str:
    return f"{CKPT_DIR}/{step_dir_name(step)}"


def receipt_name(rank: int) -> str:
    return f"rank_{rank:05d}.done"


def generation_name(generation: int) -> str:
    return f"generation_{generation:08d}.json"


class CheckpointDamaged(ValueError):
    """A checkpoint failed a check: it must not be loaded (see CheckpointStore.mark_damaged)."""

    def __init__(self, step: int, uri: str, reason: str):
        super().__init__(f"checkpoint {uri} is damaged: {reason}")
        self.step, self.uri, self.reason = step, uri, reason


class Fenced(RuntimeError):
    """A newer writer generation claimed the run folder: this writer must not write anything more."""


@dataclass
class Scanned:
    """One checkpoint as a listing shows it: its manifest, or the problem that rules it out."""
    step: int
    manifest: dict | None
    problem: str | None


class CheckpointStore:
    """The checkpoints of one run under root_uri (= <checkpoint.uri>/<run_name>), for one rank.

    staging_dir (optional) is where the format side writes before publishing; by default
    <root>/.staging for a local root (same file system: files are moved, not copied) and the
    system temp folder for s3://.
    """

    def __init__(self, root_uri: str, *, keep_last: int = 3, async_upload: bool = True,
                 upload_timeout_s: float = 600.0, staging_dir: str | None = None):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        if upload_timeout_s <= 0:
            raise ValueError(f"checkpoint.upload_timeout_s must be > 0, got {upload_timeout_s}")
        self.root_uri = root_uri.rstrip("/")
        self.keep_last = keep_last
        self.async_upload = async_upload
        self.upload_timeout_s = upload_timeout_s
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
        self.staging = staging_base / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self._fenced: Fenced | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # This rank's last finished publish: step, num_bytes, write_s (the format's deferred
        # writes), upload_s (uploads and receipt; on rank 0 until COMPLETE), prune_s (rank 0).
        self.last_upload_stats: dict | None = None

    # -- fencing ---------------------------------------------------------------------------
    def claim_generation(self) -> int:
        """Claim the run folder for a new writer generation (one rank, once per start); its number."""
        existing = [int(m.group(1)) for key in self.storage.list(f"{FENCE_DIR}/")
                    if (m := _GENERATION_RE.match(key.rpartition("/")[2]))]
        generation = max(existing, default=0) + 1
        record = {"host": socket.gethostname(), "pid": os.getpid(), "claimed_unix": time.time()}
        while not self.storage.create_exclusive(json.dumps({**record, "generation": generation}).encode(),
                                                f"{FENCE_DIR}/{generation_name(generation)}"):
            generation += 1  # another start claimed this number a moment ago
        self.generation = generation
        log.info("writer generation %d claimed %s", generation, self.root_uri)
        return generation

    def join_generation(self, generation: int) -> None:
        """Write as part of `generation` (the other ranks of the start that claimed it)."""
        self.generation = generation

    def check_fence(self) -> None:
        """Raise Fenced if a newer generation claimed the run folder; called before every write."""
        assert self.generation is not None, "claim_generation() or join_generation() before writing"
        if self._fenced is not None:
            raise self._fenced
        newer = f"{FENCE_DIR}/{generation_name(self.generation + 1)}"
        if not self.storage.exists(newer):
            return
        try:
            claim = json.loads(self.storage.get_bytes(newer))
            by = (f" by host {claim.get('host')} pid {claim.get('pid')} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(claim.get('claimed_unix', 0)))}")
        except (ValueError, FileNotFoundError):
            by = ""
        self._fenced = Fenced(f"run folder {self.root_uri} was claimed by writer generation {self.generation + 1}{by}; "
                              f"this writer (generation {self.generation}) stops and writes nothing more: another "
                              "job or worker group resumed this run")
        log.error("%s", self._fenced)
        raise self._fenced

    # -- saving ----------------------------------------------------------------------------
    def staging_folder(self, step: int) -> Path:
        """An empty local folder for this rank's files of checkpoint `step` (its name is the step's)."""
        folder = self.staging / "save" / step_dir_name(step)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def publish(self, step: int, folder: Path, *, rank: int, world_size: int, info: dict,
                prepare: Callable[[], Mapping[str, str] | None] | None = None) -> None:
        """Make this rank's files in `folder` part of checkpoint `step`, in the background.

        prepare() runs first on the background thread (the format's deferred serialisation); it may
        return {path of a file it wrote: sha256 taken while writing it}, and those files are then
        uploaded without hashing them again.
        info: what MANIFEST.json records besides step, world_size, generation and files (rank 0's
        counts). With async_upload off this returns when the checkpoint is published.
        """
        assert not self.busy(), "one publish at a time: wait() first"
        assert self.generation is not None, "claim_generation() or join_generation() before publishing"

        def job() -> None:
            write_started = time.monotonic()
            written = (prepare() if prepare is not None else None) or {}
            known = {Path(path).relative_to(folder).as_posix(): digest for path, digest in written.items()}
            upload_started = time.monotonic()
            num_bytes = self._publish(step, folder, rank, world_size, info, known)
            prune_started = time.monotonic()
            if rank == 0 and num_bytes is not None:
                self._prune()
            self.last_upload_stats = {"step": step, "num_bytes": num_bytes or 0,
                                      "write_s": upload_started - write_started,
                                      "upload_s": prune_started - upload_started,
                                      "prune_s": time.monotonic() - prune_started}

        if not self.async_upload:
            job()
            return
        # Not a daemon: an interpreter that exits without wait() still finishes the upload.
        self._thread = threading.Thread(target=self._run_in_background, args=(job,),
                                        name=f"checkpoint-publish-{step_dir_name(step)}")
        self._thread.start()

    def busy(self) -> bool:
        """True while a background publish is running (wait() would block)."""
        return self._thread is not None and self._thread.is_alive()

    def failure(self) -> str | None:
        """Why the last background publish failed, if it did and no wait() reported it yet."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    def wait(self) -> None:
        """Block until the pending publish is done; raise its error (once) if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload failed: {error}") from error

    def _run_in_background(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 -- handed to the training thread by wait()
            log.error("checkpoint upload failed: %s", exc)
            self._error = exc

    def _publish(self, step: int, folder: Path, rank: int, world_size: int, info: dict,
                 known: Mapping[str, str]) -> int | None:
        """Upload this rank's files and receipt (rank 0 then completes the checkpoint); its bytes,
        or None when the step was complete already. known: {rel: sha256} of files hashed as they
        were written."""
        prefix = step_prefix(step)
        deadline = time.monotonic() + self.upload_timeout_s
        started = time.monotonic()
        listing = self._listing(prefix)
        if COMPLETE in listing and DAMAGED not in listing:
            # Written nothing, but a newer generation may have saved this step: an orphaned writer
            # that only ever finds its steps complete must stop too, not train on unseen.
            self.check_fence()
            if rank == 0:
                log.info("checkpoint %s is already complete; not saving it again", self.storage.uri(prefix))
            shutil.rmtree(folder, ignore_errors=True)
            return None
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        receipt = {"rank": rank, "step": step, "world_size": world_size, "generation": self.generation,
                   "files": self._upload_files(folder, files, prefix, deadline, known)}
        self.check_fence()
        self.storage.put_bytes(json.dumps(receipt, indent=1).encode(), f"{prefix}/{receipt_name(rank)}")
        shutil.rmtree(folder, ignore_errors=True)
        num_bytes = sum(meta["size"] for meta in receipt["files"].values())
        log.info("rank %d uploaded checkpoint step %d: %.1f MB in %.2fs", rank, step, num_bytes / 1e6,
                 time.monotonic() - started)
        if rank == 0:
            self._finalize(step, world_size, info, receipt, listing, deadline)
        return num_bytes

    def _upload_files(self, src_dir: Path, files: list[str], prefix: str, deadline: float,
                      known: Mapping[str, str] | None = None) -> dict:
        """Upload (or, on a local root, move) files; {rel: {size, sha256}}, the hash taken while
        the file was written (`known`) or else while reading it for the upload. Several files are
        in flight at once, as a raw boto3 upload of many parts would be."""
        sizes = {rel: (src_dir / rel).stat().st_size for rel in files}

        def upload(rel: str) -> str:
            if time.monotonic() > deadline:
                raise TimeoutError(f"upload of {self.storage.uri(f'{prefix}/{rel}')} passed "
                                   f"checkpoint.upload_timeout_s={self.upload_timeout_s:g}s")
            return self.storage.move_file(src_dir / rel, f"{prefix}/{rel}", (known or {}).get(rel))

        self.check_fence()  # once for the batch of uploads: a request per file would cost more than the upload of small files
        with ThreadPoolExecutor(max_workers=_FILES_IN_FLIGHT) as pool:
            digests = {rel: pool.submit(upload, rel) for rel in sorted(files, key=sizes.get, reverse=True)}
            return {rel: {"size": sizes[rel], "sha256": digests[rel].result()} for rel in files}

    def _finalize(self, step: int, world_size: int, info: dict, own_receipt: dict, before: dict[str, int],
                  deadline: float) -> None:
        """Rank 0's thread: every rank's receipt of this generation, then MANIFEST.json and COMPLETE.
        `before` lists the step folder as this save found it (what an earlier save left)."""
        prefix = step_prefix(step)
        receipts: dict[int, dict] = {0: own_receipt}
        delay = 0.02
        while len(receipts) < world_size:
            listing = self._listing(prefix)  # one listing a round, not a GET per missing rank
            for rank in range(world_size):
                if rank not in receipts and receipt_name(rank) in listing:
                    receipt = json.loads(self.storage.get_bytes(f"{prefix}/{receipt_name(rank)}"))
                    # A receipt of an earlier, crashed save of this step is overwritten soon.
                    if (receipt.get("generation"), receipt.get("step"), receipt.get("world_size")) == \
                            (self.generation, step, world_size):
                        receipts[rank] = receipt
            if len(receipts) == world_size:
                break
            if time.monotonic() > deadline:
                pending = sorted(set(range(world_size)) - set(receipts))
                raise TimeoutError(
                    f"checkpoint {self.storage.uri(prefix)}: ranks {pending} did not finish uploading within "
                    f"checkpoint.upload_timeout_s={self.upload_timeout_s:g}s; it stays incomplete and resume skips it")
            time.sleep(delay)
            delay = min(2.0, delay * 2)
        files: dict[str, dict] = {}
        for rank, receipt in sorted(receipts.items()):
            for rel, meta in receipt["files"].items():
                if rel in files and files[rel]["sha256"] != meta["sha256"]:
                    raise RuntimeError(f"ranks {files[rel]['rank']} and {rank} wrote different contents to "
                                       f"{self.storage.uri(prefix)}/{rel}")
                files[rel] = {**meta, "rank": rank}
        keep = set(files) | {receipt_name(rank) for rank in range(world_size)}
        stale = sorted(set(before) - keep)
        if DAMAGED in stale:
            log.warning("replacing damaged checkpoint %s (%s) with a new save of the same step",
                        self.storage.uri(prefix), self._damage_reason(prefix))
        elif stale:
            log.info("removing %d files an earlier save left in %s", len(stale), self.storage.uri(prefix))
        if stale:
            self.check_fence()
        for rel in stale:
            self.storage.delete(f"{prefix}/{rel}")
        manifest = {**info, "step": step, "world_size": world_size, "generation": self.generation,
                    "created_unix": time.time(), "files": files}
        self._write_manifest(prefix, manifest)
        log.info("checkpoint %s complete (%d files, %.1f MB)", self.storage.uri(prefix), len(files),
                 sum(meta["size"] for meta in files.values()) / 1e6)

    def _write_manifest(self, prefix: str, manifest: dict) -> None:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.check_fence()  # once for the pair: COMPLETE follows MANIFEST.json at once
        self.storage.put_bytes(data, f"{prefix}/{MANIFEST}")
        self.storage.put_bytes(hashlib.sha256(data).hexdigest().encode(), f"{prefix}/{COMPLETE}")

    def _prune(self) -> None:
        """Keep the newest keep_last complete checkpoints; drop older ones and older unfinished
        saves. DAMAGED ones are kept for inspection."""
        steps = self._list_steps()
        complete = sorted((step for step, keys in steps.items() if COMPLETE in keys and DAMAGED not in keys))
        keep = set(complete[-self.keep_last:])
        newest = complete[-1] if complete else -1
        for step, keys in sorted(steps.items()):
            if step in keep or step >= newest or DAMAGED in keys:
                continue
            log.info("removing old checkpoint %s", self.storage.uri(step_prefix(step)))
            self.check_fence()
            self.storage.delete_prefix(f"{step_prefix(step)}/")

    # -- reading ---------------------------------------------------------------------------
    def scan(self) -> list[Scanned]:
        """Every checkpoint newest first, each with its manifest or the problem its listing shows
        (no file is read beyond COMPLETE and MANIFEST.json). Checkpoints marked DAMAGED are left out."""
        steps = self._list_steps()
        marked = sorted(step for step, keys in steps.items() if DAMAGED in keys)
        if marked:
            log.debug("checkpoints marked DAMAGED, skipped: %s", [step_dir_name(s) for s in marked])
        return [Scanned(step, *self._check(step_prefix(step), step, keys, _MANIFEST_FIELDS))
                for step, keys in sorted(steps.items(), reverse=True) if DAMAGED not in keys]

    def latest_complete(self, verify: str = "size") -> int | None:
        """Newest step whose checkpoint passes its checks; the others are skipped with a warning.

        verify="size" checks presence and size of every file (cheap: no download);
        verify="sha256" also reads every file and checks its checksum. Writes nothing.
        """
        if verify not in ("size", "sha256"):
            raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
        for found in self.scan():
            problem = found.problem
            if problem is None and verify == "sha256":
                try:
                    self._verify_all(step_prefix(found.step), found.step, found.manifest)
                except CheckpointDamaged as exc:
                    problem = exc.reason
            if problem is None:
                return found.step
            log.warning("skipping checkpoint %s: %s", self.storage.uri(step_prefix(found.step)), problem)
        return None

    def manifest(self, step: int) -> dict:
        """MANIFEST.json of checkpoint `step`; CheckpointDamaged if its listing shows a problem."""
        prefix = step_prefix(step)
        keys = self._listing(prefix)
        if DAMAGED in keys:
            raise CheckpointDamaged(step, self.storage.uri(prefix), f"marked {DAMAGED}: {self._damage_reason(prefix)}")
        manifest, problem = self._check(prefix, step, keys, _MANIFEST_FIELDS)
        if problem is not None:
            raise CheckpointDamaged(step, self.storage.uri(prefix), problem)
        return manifest

    def fetch(self, step: int, dest_dir: str | os.PathLike, wanted: Callable[[str], bool] = lambda rel: True,
              manifest: dict | None = None) -> tuple[Path, dict]:
        """The files of checkpoint `step` that `wanted` (relative path -> bool) picks, readable
        locally, each checked against its sha256: (folder, manifest). The folder is the checkpoint
        itself on a local root (nothing copied), dest_dir/step_XXXXXXXX on s3://.
        CheckpointDamaged if a file is missing, unreadable or does not match."""
        manifest = self.manifest(step) if manifest is None else manifest
        return self._fetch(step_prefix(step), step, manifest, Path(dest_dir) / step_dir_name(step), wanted), manifest

    def mark_damaged(self, step: int, reason: str) -> None:
        """Write DAMAGED into checkpoint `step`: no later scan() offers it. Nothing is deleted."""
        prefix = step_prefix(step)
        self.check_fence()
        self.storage.put_bytes(json.dumps({"reason": reason, "generation": self.generation,
                                           "marked_unix": time.time()}, indent=1).encode(), f"{prefix}/{DAMAGED}")
        log.warning("checkpoint %s is damaged: %s. Marked %s: no resume will choose it; it is kept for "
                    "inspection (delete the folder when done)", self.storage.uri(prefix), reason, DAMAGED)

    def derived(self, step: int, name: str, manifest: dict, build: Callable[[Path, Path], None]) -> dict:
        """The manifest of form `name` of checkpoint `step` (stored under it, made once):
        build(source_folder, out_folder) makes it from the checkpoint's verified files."""
        prefix = f"{step_prefix(step)}/{name}"
        existing, problem = self._check(prefix, step, self._listing(prefix), _DERIVED_FIELDS)
        if problem is None:
            return existing
        work = self._ensure_staging() / f"derived_{name}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            source, _ = self.fetch(step, work / "source", manifest=manifest)
            out_dir = work / "out" / step_dir_name(step)
            build(source, out_dir)
            files = sorted(p.relative_to(out_dir.parent).as_posix() for p in out_dir.rglob("*") if p.is_file())
            self.check_fence()
            self.storage.delete_prefix(f"{prefix}/")
            published = self._upload_files(out_dir.parent, files, prefix, time.monotonic() + self.upload_timeout_s)
            made = {"format": name, "step": step, "generation": self.generation, "files": published}
            self._write_manifest(prefix, made)
            return made
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def fetch_derived(self, step: int, name: str, manifest: dict, dest_dir: str | os.PathLike) -> Path:
        """derived()'s files, readable locally and verified; the folder holding step_XXXXXXXX/."""
        return self._fetch(f"{step_prefix(step)}/{name}", step, manifest, Path(dest_dir) / name, lambda rel: True)

    # -- helpers ---------------------------------------------------------------------------
    def _listing(self, prefix: str) -> dict[str, int]:
        """{key under prefix: size}."""
        return {key[len(prefix) + 1:]: size for key, size in self.storage.list_sizes(f"{prefix}/").items()}

    def _list_steps(self) -> dict[int, dict[str, int]]:
        """{step: {key under its folder: size}} for every step folder in storage."""
        steps: dict[int, dict[str, int]] = {}
        for key, size in self.storage.list_sizes(f"{CKPT_DIR}/").items():
            parts = key.split("/", 2)
            if len(parts) == 3 and (match := _STEP_RE.match(parts[1])):
                steps.setdefault(int(match.group(1)), {})[parts[2]] = size
        return steps

    def _check(self, prefix: str, step: int, sizes: dict[str, int], fields: dict) -> tuple[dict | None, str | None]:
        """(manifest, None) if the listing `sizes` of prefix shows a complete checkpoint, else (None, problem)."""
        if COMPLETE not in sizes:
            return None, "no COMPLETE marker (the save or its upload was interrupted)"
        try:
            marker = self.storage.get_bytes(f"{prefix}/{COMPLETE}").decode(errors="replace").strip()
            data = self.storage.get_bytes(f"{prefix}/{MANIFEST}")
        except FileNotFoundError as exc:
            return None, f"{exc} is missing"
        except PermissionError as exc:
            return None, f"unreadable: {exc}"
        if hashlib.sha256(data).hexdigest() != marker:
            return None, f"{COMPLETE} does not match {MANIFEST} (a different save overwrote one of them)"
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, f"{MANIFEST} is not valid JSON: {exc}"
        problem = _manifest_problem(manifest, fields)
        if problem is None and manifest["step"] != step:
            problem = f"{MANIFEST} is of step {manifest['step']}, not of step {step}"
        if problem is not None:
            return None, problem
        for rel, meta in manifest["files"].items():
            size = sizes.get(rel)
            if size is None:
                return None, f"file {rel} listed in {MANIFEST} is missing"
            if size != meta["size"]:
                return None, f"file {rel} has {size} bytes, {MANIFEST} says {meta['size']} (truncated or overwritten)"
        return manifest, None

    def _fetch(self, prefix: str, step: int, manifest: dict, dest_dir: Path, wanted: Callable[[str], bool]) -> Path:
        folder = self._local_root / prefix if self._local_root is not None else dest_dir
        for rel, meta in manifest["files"].items():
            if not wanted(rel):
                continue
            try:
                if self._local_root is None:
                    self.storage.get_file(f"{prefix}/{rel}", folder / rel)
                digest = sha256_file(folder / rel)
            except FileNotFoundError:
                raise CheckpointDamaged(step, self.storage.uri(prefix), f"file {rel} listed in {MANIFEST} is missing") from None
            except (PermissionError, IsADirectoryError) as exc:
                raise CheckpointDamaged(step, self.storage.uri(prefix), f"file {rel} is unreadable: {exc}") from None
            if digest != meta["sha256"]:
                raise CheckpointDamaged(step, self.storage.uri(prefix),
                                        f"file {rel} does not match its sha256 in {MANIFEST} (corrupted)")
        return folder

    def _verify_all(self, prefix: str, step: int, manifest: dict) -> None:
        with tempfile.TemporaryDirectory(dir=self._ensure_staging()) as tmp:
            for rel in manifest["files"]:  # one file at a time: never more than one on local disk
                self._fetch(prefix, step, manifest, Path(tmp), lambda candidate, rel=rel: candidate == rel)
                if self._local_root is None:
                    (Path(tmp) / rel).unlink()

    def _damage_reason(self, prefix: str) -> str:
        try:
            return json.loads(self.storage.get_bytes(f"{prefix}/{DAMAGED}")).get("reason", "?")
        except (FileNotFoundError, ValueError):
            return "?"

    def _ensure_staging(self) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging


def _manifest_problem(manifest, fields: dict) -> str | None:
    """Why a parsed MANIFEST.json cannot be used (a field missing or of the wrong type), or None."""
    if not isinstance(manifest, dict):
        return f"{MANIFEST} holds a {type(manifest).__name__}, not a mapping"
    for key, kind in fields.items():
        if key not in manifest:
            return f"{MANIFEST} lacks its '{key}' field"
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            return f"{MANIFEST} field '{key}' is {manifest[key]!r}, not a {kind.__name__}"
    for rel, meta in manifest["files"].items():
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and isinstance(meta.get("sha256"), str) and _SHA256_RE.match(meta["sha256"])):
            return f"{MANIFEST} entry for file {rel} lacks a size and a sha256"
    return None


def _remove_dead_staging(base: Path) -> None:
    """Remove staging folders that processes on this host left when they died."""
    if not base.is_dir():
        return
    host = socket.gethostname()
    for entry in base.iterdir():
        owner_host, _, pid = entry.name.rpartition("-")[0].rpartition("-")
        if owner_host != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass
