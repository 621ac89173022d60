"""MDS shard datasets: resumable writing, dataset metadata, and the resumable streaming loader.

Layout written by the converters (local folder or s3://bucket/prefix):

    <root>/index.json            merged MDS index (what mosaicml-streaming reads)
    <root>/dataset.json          our metadata: kind, num_samples, num_classes | vocab_size, ...
    <root>/part_00000/           one MDSWriter output: shard.00000.mds ..., index.json, done.json
    <root>/class_index.json      (images) synset -> label;  <root>/tokenizer.json (text)

A conversion is split into parts; each part is written by its own MDSWriter and gets done.json
(with its counts and skipped inputs) only after every shard of it is uploaded, so a re-run skips
finished parts and rewrites unfinished ones from scratch. The root index is merged last.

Exact mid-epoch resume (`ShardLoader.state_dict` / `load_state_dict`) holds when:
  * num_canonical_nodes is pinned: we always pass one (default: the number of physical nodes of the
    first run) and the saved state carries it forward. Every later node count must divide it or be
    a multiple of it. For multi-node pretraining pin it to a multiple of every node count you expect.
  * shuffle_seed, shuffle_algo (py1e, the default here), partition_algo (relaxed) and the per-rank
    batch_size stay the same. The global batch then changes with the number of ranks; the global
    sample order does not, so a resume with another world size continues the epoch with no sample
    repeated or lost.
  * augmentation randomness is a pure function of (seed, epoch, sample id) (see augment.py), so it
    does not depend on the loader workers; with the same world size and worker count the next batch
    after a resume is bit-identical to the one that would have come.
  * every rank yields the same number of batches per epoch: we compute streaming's partition for
    the epoch and stop all ranks at the smallest per-rank count of full batches (drop_last), so a
    resume onto 3 ranks cannot leave one rank a batch short and hang a collective. The few samples
    that do not fill a batch on every rank are dropped for that epoch, as drop_last does.
  * the state is taken on any rank (all ranks hold the same); after an epoch's last batch it points
    at the start of the next epoch.

Shared memory. A killed run leaves streaming's /dev/shm blocks behind, and the next run on the
node that uses the same local cache directory fails ("Reused local directory") or waits. Streaming's
clean_stale_shared_memory() removes every streaming block on the host, including those of other live
runs on the same node, so we do not call it. `clean_stale_shared_memory` below removes only blocks
(and their /tmp file locks) that (a) no live process has mapped (checked in /proc/*/maps) and (b)
name one of our own local directories, or none (released by their dataset but never unlinked), or
belong to a group that has lost its `_locals` block (a process killed while it cleaned up): streaming
finds free prefixes by their `_locals` block alone, so it hands such a prefix to the next dataset,
which attaches to the leftover blocks -- sized for another dataset, another epoch -- and fails with
"TypeError: buffer is too small for requested array". Blocks of other runs, live or dead, that
still have their `_locals` are left alone.

Credentials come from the standard AWS chain (environment, ~/.aws, instance role) and are never
passed as arguments or written anywhere; the endpoint comes from AWS_ENDPOINT_URL_S3 (boto3) and
S3_ENDPOINT_URL (mosaicml-streaming), which `configure_s3_endpoint` sets together.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pnet_dist.log import get_logger
from pnet_dist.storage import is_s3, join, open_storage

log = get_logger(__name__)

INDEX = "index.json"
META = "dataset.json"
PART_DONE = "done.json"
SHARD_SIZE_LIMIT = 1 << 26          # 64 MiB shards: few objects in S3, cheap to fetch on demand
_SHM_NAME = re.compile(r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|"
                       r"resume|epoch_shape|epoch_data)$")


def part_name(index: int) -> str:
    return f"part_{index:05d}"


def configure_s3_endpoint(endpoint_url: str | None) -> None:
    """Point boto3 and mosaicml-streaming (and processes started later) at an S3-compatible endpoint."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
        os.environ["S3_ENDPOINT_URL"] = endpoint_url


# -- writing -----------------------------------------------------------------------------------------
@dataclass
class PartResult:
    """What writing one part produced."""
    index: int
    num_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (input name, reason)
    extra: dict[str, Any] = field(default_factory=dict)            # e.g. num_tokens, num_reencoded


@dataclass
class ConversionSummary:
    num_parts: int
    num_parts_reused: int
    num_samples: int
    skipped: list[tuple[str, str]]
    extra: dict[str, Any]
    holdout: "ConversionSummary | None" = None     # images: the held-out split, when one was made

    def report(self) -> str:
        lines = [f"{self.num_samples} samples in {self.num_parts} parts "
                 f"({self.num_parts_reused} finished earlier and skipped); {len(self.skipped)} inputs skipped"]
        lines += [f"  {key}: {value}" for key, value in sorted(self.extra.items())]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        if self.holdout is not None:
            lines += ["held out: " + self.holdout.report()]
        return "\n".join(lines)


_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def count_progress(num: int = 1) -> None:
    """Called by part writers for each input consumed; drives the converter's progress bar."""
    if _progress_counter is not None:
        with _progress_counter.get_lock():
            _progress_counter.value += num


def _run_part(write_part: Callable[[int, str], PartResult], out_uri: str, options: dict, index: int) -> PartResult:
    storage = open_storage(out_uri)
    name = part_name(index)
    storage.delete_prefix(f"{name}/")               # leftovers of an interrupted attempt
    result = write_part(index, join(out_uri, name))
    done = {"num_samples": result.num_samples, "skipped": result.skipped, "extra": result.extra, "options": options}
    storage.put_bytes(json.dumps(done).encode(), f"{name}/{PART_DONE}")
    return result


def write_parts(out_uri: str, num_parts: int, write_part: Callable[[int, str], PartResult], *,
                num_workers: int = 1, total_inputs: int | None = None, desc: str = "converting",
                meta: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
                side_files: dict[str, bytes] | None = None) -> ConversionSummary:
    """Write parts 0..num_parts-1 with write_part(index, part_uri), skipping finished ones, then merge.

    write_part must be picklable when num_workers > 1 (a top-level function or functools.partial).
    meta is merged into dataset.json together with num_samples. options (everything that decides a
    part's content) are kept in each done.json; a re-run with other options is refused. side_files
    ({name: bytes} beside the shards, e.g. the class index or the tokenizer) are written once that
    check has passed, so a refused re-run leaves the files of the earlier one as they were.
    """
    from tqdm import tqdm

    options = json.loads(json.dumps(options or {}))      # as it reads back from done.json
    storage = open_storage(out_uri)
    results: dict[int, PartResult] = {}
    for index in range(num_parts):
        try:
            done = json.loads(storage.get_bytes(f"{part_name(index)}/{PART_DONE}"))
        except FileNotFoundError:
            continue
        if done.get("options") != options:
            raise ValueError(f"{join(out_uri, part_name(index))} was written with options {done.get('options')}, "
                             f"this run asks for {options}: write to a new output or delete {out_uri} first")
        results[index] = PartResult(index, done["num_samples"], [tuple(s) for s in done["skipped"]], done["extra"])
    for name, data in (side_files or {}).items():
        storage.put_bytes(data, name)
    num_reused = len(results)
    todo = [i for i in range(num_parts) if i not in results]
    if num_reused:
        log.info("%s: %d of %d parts already finished, writing %d", out_uri, num_reused, num_parts, len(todo))

    counter = mp.Value("q", 0)
    bar = tqdm(total=total_inputs, desc=desc, unit="img" if "image" in desc else "it", dynamic_ncols=True)
    bar.update(sum(r.num_samples + len(r.skipped) for r in results.values()) if total_inputs else 0)
    start_count = bar.n

    def refresh():
        bar.update(start_count + counter.value - bar.n)

    if num_workers <= 1 or len(todo) <= 1:
        _init_worker(counter)
        stop = threading.Event()

        def tick():
            while not stop.wait(0.5):
                refresh()
        threading.Thread(target=tick, daemon=True).start()
        try:
            for index in todo:
                results[index] = _run_part(write_part, out_uri, options, index)
        finally:
            stop.set()
            _init_worker(None)
    else:
        ctx = mp.get_context("fork")
        with ctx.Pool(min(num_workers, len(todo)), initializer=_init_worker, initargs=(counter,)) as pool:
            pending = [pool.apply_async(_run_part, (write_part, out_uri, options, i)) for i in todo]
            for index, job in zip(todo, pending):
                while not job.ready():
                    refresh()
                    job.wait(0.5)
                results[index] = job.get()
    refresh()
    bar.close()

    ordered = [results[i] for i in range(num_parts)]
    merge_index(out_uri, [part_name(r.index) for r in ordered if r.num_samples])
    extra: dict[str, Any] = {}
    for r in ordered:
        for key, value in r.extra.items():
            extra[key] = extra.get(key, 0) + value
    summary = ConversionSummary(num_parts, num_reused, sum(r.num_samples for r in ordered),
                                [s for r in ordered for s in r.skipped], extra)
    storage.put_bytes(json.dumps({**(meta or {}), "num_samples": summary.num_samples, **extra},
                                 indent=1).encode(), META)
    return summary


def merge_index(out_uri: str, part_names: list[str]) -> None:
    """Write <out>/index.json listing every shard of the given parts (paths relative to <out>)."""
    storage = open_storage(out_uri)
    shards = []
    for name in part_names:
        index = json.loads(storage.get_bytes(f"{name}/{INDEX}"))
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
            shards.append(shard)
    if not shards:
        raise ValueError(f"no samples were written to {out_uri}: every input was skipped or the input is empty")
    storage.put_bytes(json.dumps({"version": 2, "shards": shards}).encode(), INDEX)


# -- reading metadata --------------------------------------------------------------------------------
def dataset_info(uri: str) -> dict[str, Any]:
    """The dataset's metadata (dataset.json): kind, num_samples, num_classes or vocab_size, ..."""
    storage = open_storage(uri)
    try:
        return json.loads(storage.get_bytes(META))
    except FileNotFoundError:
        raise ValueError(f"{join(uri, META)} not found: {uri} is not a dataset written by "
                         f"tools/make_image_shards.py or tools/make_text_shards.py") from None


# -- shared memory hygiene -----------------------------------------------------------------------------
def _unpack_locals(data: bytes) -> list[str]:
    size = int.from_bytes(data[:4], "little", signed=True)
    if size <= 4:
        return []
    return data[4:size].decode("utf-8", "replace").split("\0")[:-1]


def _mapped_shm_names() -> set[str]:
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue                     # process gone, or not ours to read
        names.update(m.group(1) for m in re.finditer(r"/dev/shm/(\d{6}_\w+)", text))
    return names


def clean_stale_shared_memory(local_dirs: list[str], shm_dir: str = "/dev/shm") -> list[str]:
    """Remove streaming's shared memory left by dead runs that used one of local_dirs, and groups
    that lost their `_locals` block.

    Returns the names removed. A block group is stale when no live process maps any of its blocks.
    Groups whose `_locals` names other local directories are never touched (see the module docstring).
    """
    if not os.path.isdir(shm_dir):
        return []
    groups: dict[str, list[str]] = {}
    for name in os.listdir(shm_dir):
        match = _SHM_NAME.match(name)
        if match:
            groups.setdefault(match.group(1), []).append(name)
    if not groups:
        return []
    ours = {os.path.abspath(d) for d in local_dirs}
    candidates = {}
    for prefix, names in groups.items():
        if f"{prefix}_locals" not in names:
            candidates[prefix] = names   # headless: no run can claim it, and streaming would reuse it
            continue
        try:
            their_locals = _unpack_locals(Path(shm_dir, f"{prefix}_locals").read_bytes())
        except OSError:
            continue
        # Empty locals: the owner released the group (dataset deleted) but never unlinked it.
        if not their_locals or ours.intersection(their_locals):
            candidates[prefix] = names
    if not candidates:
        return []
    mapped = _mapped_shm_names()
    removed = []
    for prefix, names in candidates.items():
        if any(n in mapped for n in names):
            continue                     # a live process still uses it
        for name in names:
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass
        for lock in ("barrier_filelock", "cache_filelock"):
            try:
                os.unlink(os.path.join(tempfile.gettempdir(), f"{prefix}_{lock}"))
            except FileNotFoundError:
                pass
    if removed:
        log.warning("removed stale streaming shared memory of a dead run on %s: %s", sorted(ours), removed)
    return removed


# -- streaming dataset plumbing ----------------------------------------------------------------------
def stream_dirs(uri: str, cache_dir: str | None) -> tuple[str | None, str]:
    """(remote, local) for StreamingDataset: S3 data is cached under cache_dir, local data read in place."""
    if is_s3(uri):
        digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
        base = cache_dir or os.path.join(tempfile.gettempdir(), "pnet_dist_streaming")
        return uri.rstrip("/"), os.path.join(base, digest)
    if not os.path.isfile(os.path.join(uri, INDEX)):
        raise ValueError(f"{os.path.join(uri, INDEX)} not found: write the dataset with tools/make_image_shards.py "
                         f"or tools/make_text_shards.py first")
    return None, os.path.abspath(uri)


def streaming_kwargs(uri: str, *, batch_size: int, shuffle: bool, seed: int, num_canonical_nodes: int | None,
                     cache_dir: str | None) -> dict[str, Any]:
    """Keyword arguments for StreamingDataset that make resume exact (see the module docstring)."""
    from streaming.base.world import World

    remote, local = stream_dirs(uri, cache_dir)
    world = World.detect()
    if world.is_local_leader:
        clean_stale_shared_memory([local])
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()                   # other local ranks look for shm prefixes only after the clean-up
    num_canonical_nodes = num_canonical_nodes or world.num_nodes
    # predownload and shuffle_block_size are streaming's own defaults, passed explicitly: left
    # unset, streaming logs "Because ... was not specified" in every rank's loader (the block size
    # at every epoch: 7-8 lines per Ray run).
    return dict(remote=remote, local=local, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                shuffle_algo="py1e", partition_algo="relaxed", num_canonical_nodes=num_canonical_nodes,
                shuffle_block_size=shuffle_block_size(num_canonical_nodes), predownload=8 * batch_size)


def shuffle_block_size(num_canonical_nodes: int) -> int:
    """Streaming's default block size for the canonical nodes, which a resume may bring back from
    the checkpoint (ShardLoader.load_state_dict), so the sample order is the one streaming picks."""
    return max(4_000_000 // num_canonical_nodes, 1 << 18)


class ShardLoader:
    """A StreamingDataLoader that yields the same number of batches on every rank, with exact resume.

    One `iter()` is one epoch (or the rest of it after `load_state_dict`). `finalize`, if given, turns
    the collated worker batch into what the training loop gets.
    """

    def __init__(self, dataset, *, batch_size: int, num_workers: int, drop_last: bool,
                 collate_fn: Callable, finalize: Callable | None = None):
        from streaming import StreamingDataLoader

        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.finalize = finalize
        self.loader = StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                          drop_last=drop_last, collate_fn=collate_fn,
                                          prefetch_factor=4 if num_workers else None,
                                          multiprocessing_context="fork" if num_workers else None)
        self._pending_state: dict[str, Any] | None = None
        self._epoch_done = False
        self._batches_yielded = 0

    def _count_batches(self, sample_in_epoch: int, num_canonical_nodes: int,
                       initial_physical_nodes: int | None) -> int:
        import numpy as np
        from streaming.base.partition import get_partitions
        from streaming.base.world import World

        world = World.detect()
        ids = get_partitions(self.dataset.partition_algo, self.dataset.epoch_size, num_canonical_nodes,
                             world.num_nodes, world.ranks_per_node, max(1, self.num_workers), self.batch_size,
                             sample_in_epoch, initial_physical_nodes)
        valid = (ids != -1).sum(axis=(3, 4))                      # node x rank x worker
        per_worker = valid // self.batch_size if self.drop_last else -(-valid // self.batch_size)
        return int(np.min(per_worker.sum(axis=2))) if per_worker.size else 0

    def __len__(self) -> int:
        """Batches per rank in a full epoch."""
        return self._count_batches(0, self.dataset.num_canonical_nodes, None)

    def __iter__(self) -> Iterator[Any]:
        state = self._pending_state
        self._pending_state = None
        if state is not None and state["epoch"] >= self.dataset.next_epoch:
            num_batches = self._count_batches(state["sample_in_epoch"], state["num_canonical_nodes"],
                                              state.get("initial_physical_nodes"))
        else:
            num_batches = len(self)
        self._epoch_done = False
        self._batches_yielded = 0
        if num_batches == 0:
            if state is None or state["sample_in_epoch"] == 0:
                raise self._no_batch_error()
            self._epoch_done = True  # resumed where nothing of this epoch is left for a full batch
            # Still advance streaming's epoch so the next iter() starts the following one.
            for _ in self.loader:
                break
            return
        batches = iter(self.loader)
        try:
            for _ in range(num_batches):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise RuntimeError(f"dataset {self.dataset.dataset_uri}: the loader ended after "
                                       f"{self._batches_yielded} of the {num_batches} batches of this epoch "
                                       "without an error from streaming") from None
                self._batches_yielded += 1
                self._epoch_done = self._batches_yielded == num_batches
                yield self.finalize(batch) if self.finalize is not None else batch
        finally:
            del batches

    def _no_batch_error(self) -> ValueError:
        from streaming.base.world import World
        world = World.detect()
        return ValueError(f"dataset {self.dataset.dataset_uri}: an epoch yields no batch: its "
                          f"{self.dataset.epoch_size} samples over {world.num_ranks} rank(s) x "
                          f"{max(1, self.num_workers)} loader worker(s) give no rank a full batch of "
                          f"{self.batch_size}; lower data.batch_size or data.num_workers, train on fewer "
                          "ranks, or use more data")

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.loader.state_dict())
        if self._epoch_done:
            state["epoch"] += 1
            state["sample_in_epoch"] = 0
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "sample_in_epoch", "num_canonical_nodes", "shuffle_seed"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}: pass the dict that state_dict() returned")
        self._pending_state = dict(state)
        # Later epochs fork their workers from this process's dataset: carry the run's settings over.
        self.dataset.num_canonical_nodes = state["num_canonical_nodes"]
        self.dataset.shuffle_block_size = shuffle_block_size(state["num_canonical_nodes"])
        self.dataset.shuffle_seed = state["shuffle_seed"]
        self.dataset.initial_physical_nodes = state.get("initial_physical_nodes")
        self.loader.load_state_dict(dict(state))
