"""The StreamingDataset subclasses behind our loaders (imported lazily: `import streaming` takes ~5 s).

Both add to mosaicml-streaming's dataset: shard errors that name their cause, and the current
epoch, recorded in each loader worker at the start of an epoch so augmentation can be seeded by
(seed, epoch, sample id).

Shard errors. Streaming fetches shards in background threads; when one fails it logs the error
from that thread and the epoch simply ends early, so the training loop saw only "generator raised
StopIteration" minutes later. Here every shard problem is a ShardError (a ValueError) naming the
dataset and the shard, raised where the batches are read -- the loader worker forwards it to the
main thread -- as soon as it happens:
  * at construction, every shard listed in index.json is checked against the files (a local
    folder: one stat each; S3: one listing of the prefix): missing or of another size;
  * a shard that cannot be fetched or read later (deleted mid-run, unreadable, damaged) fails the
    read of its sample, or the background thread that prepares it; the thread's error is kept and
    raised by the epoch's iterator instead of ending the epoch quietly.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.dataset import TICK, _ShardState

from pnet_dist.data.augment import sample_rng


class ShardError(ValueError):
    """A shard of a dataset is missing, of the wrong size, or cannot be read."""


_FIX = ("Re-convert it (delete its part's done.json and re-run the converter) or restore it from the "
        "source bucket.")


class ShardCheckMixin:
    """Shard problems as one ShardError naming the dataset and the shard (see the module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._background_error: BaseException | None = None
        self.check_shards()

    @property
    def dataset_uri(self) -> str:
        stream = self.streams[0]
        return stream.remote or stream.local

    def _shard_file(self, shard_id: int) -> tuple[str, int]:
        shard = self.shards[shard_id]
        return os.path.join(shard.dirname, shard.split, shard.raw_data.basename), shard.raw_data.bytes

    def _shard_error(self, basename: str, problem: str) -> ShardError:
        return ShardError(f"dataset {self.dataset_uri}: shard {basename} {problem}")

    def check_shards(self) -> None:
        """Every shard in the index exists with the size the index gives it (one listing on S3)."""
        from pnet_dist.storage import open_storage
        stream = self.streams[0]
        if stream.remote:
            sizes = open_storage(stream.remote).list_sizes()
        else:
            sizes = {}
            for shard_id, shard in enumerate(self.shards):
                path = self._shard_file(shard_id)[0]
                if os.path.isfile(path):
                    sizes[shard.raw_data.basename] = os.path.getsize(path)
        for shard in self.shards:
            name, expected = shard.raw_data.basename, shard.raw_data.bytes
            if name not in sizes:
                raise self._shard_error(name, f"is listed in {os.path.join(self.dataset_uri, 'index.json')} but "
                                              f"missing. {_FIX}")
            if sizes[name] != expected:
                raise self._shard_error(name, f"is {sizes[name]} bytes but its index says {expected}: the shard is "
                                              f"truncated or damaged. {_FIX}")

    def _check_shard(self, shard_id: int) -> None:
        checked = self.__dict__.setdefault("_checked_shards", set())
        if shard_id in checked:
            return
        path, expected = self._shard_file(shard_id)
        if not os.path.exists(path):
            raise self._shard_error(self.shards[shard_id].raw_data.basename, f"disappeared: {path} is gone. {_FIX}")
        actual = os.path.getsize(path)
        if actual != expected:
            raise self._shard_error(self.shards[shard_id].raw_data.basename,
                                    f"is {actual} bytes but its index says {expected}: the shard is truncated "
                                    f"or damaged. {_FIX}")
        checked.add(shard_id)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's fetch (or local check) of a shard; its failure names the dataset and the shard.

        Never waits inside streaming: a fetch that failed leaves the shard PREPARING for good, and
        streaming's blocking wait for it would never end; ours ends with the failure's error.

        Streaming's prepare thread calls this, not blocking, for every sample of the epoch; for a
        shard already local that call only took the cache's file lock (open + flock + close) and
        stat-ed the shard: skipped here, as streaming's get_item skips the lock. A read that finds
        the file gone still comes back here blocking and takes the full path."""
        if not blocking and self._shard_states[shard_id] == _ShardState.LOCAL:
            return
        try:
            StreamingDataset.prepare_shard(self, shard_id, blocking=False)
        except Exception as exc:
            raise self._shard_error(self.shards[shard_id].raw_data.basename,
                                    f"cannot be fetched or read: {type(exc).__name__}: {exc}") from exc
        if blocking:
            self._wait_prepared(shard_id)

    def _wait_prepared(self, shard_id: int) -> None:
        while self._shard_states[shard_id] == _ShardState.PREPARING:
            self._raise_background_error()
            path = self._shard_file(shard_id)[0]
            if self.streams[0].remote is None and not os.path.exists(path):  # local data: nothing to fetch
                raise self._shard_error(self.shards[shard_id].raw_data.basename, f"disappeared: {path} is gone. "
                                        f"{_FIX}")
            time.sleep(TICK)

    def on_exception(self, future) -> None:
        # A background thread failed: keep its error for __iter__ to raise (streaming only logs it).
        if future.exception() is not None and self._background_error is None:
            self._background_error = future.exception()
        StreamingDataset.on_exception(self, future)

    def _raise_background_error(self) -> None:
        error = self._background_error
        if error is None:
            return
        if isinstance(error, ShardError):
            raise ShardError(str(error)) from error
        raise ShardError(f"dataset {self.dataset_uri}: preparing its shards failed: "
                         f"{type(error).__name__}: {error}") from error

    def __iter__(self):
        yield from StreamingDataset.__iter__(self)
        self._raise_background_error()  # the epoch ended early because a background thread failed

    def checked_item(self, sample_id: int) -> dict[str, Any]:
        shard_id, _ = self.spanner[sample_id]
        try:
            sample = StreamingDataset.get_item(self, sample_id)
        except ShardError:
            raise
        except Exception as exc:
            self._raise_background_error()  # streaming's "Background thread failed": say why
            self._check_shard(shard_id)
            raise self._shard_error(self.shards[shard_id].raw_data.basename,
                                    f"cannot be read (sample {sample_id}): {type(exc).__name__}: {exc}. "
                                    f"{_FIX}") from exc
        self._check_shard(shard_id)
        return sample

    def shard_path(self, sample_id: int) -> str:
        return self._shard_file(self.spanner[sample_id][0])[0]

    def _resume_incr_epoch(self):
        # Runs in each loader worker at the start of __iter__ (a private hook of streaming 0.13, which
        # we pin); the epoch seeds the augmentation.
        epoch, sample_in_epoch = StreamingDataset._resume_incr_epoch(self)
        self.current_epoch = epoch
        return epoch, sample_in_epoch


class ImageShardDataset(ShardCheckMixin, StreamingDataset):
    """Yields (image, label, *extras) -- the transform's (image, *extras) with the label put second --
    with the transform's randomness drawn from (seed, epoch, sample id)."""

    def __init__(self, *, transform, aug_seed: int, **kwargs):
        super().__init__(**kwargs)
        self.transform = transform
        self.aug_seed = aug_seed
        self.current_epoch = 0

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = self.checked_item(sample_id)
        try:
            image, *extras = self.transform(sample["jpeg"], sample_rng(self.aug_seed, self.current_epoch, sample_id))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"sample {sample_id} ({sample['name']}) in {self.shard_path(sample_id)} does not "
                             f"decode as JPEG: {exc}. The shard is damaged; re-convert it.") from exc
        return image, sample["label"], *extras


class TokenShardDataset(ShardCheckMixin, StreamingDataset):
    """Yields one int64 tensor of seq_len + 1 tokens per sample."""

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        tokens = self.checked_item(sample_id)["tokens"]
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64))
