"""The StreamingDataset subclasses behind our loaders (imported lazily: `import streaming` takes ~5 s).

Both add to mosaicml-streaming's dataset: a size check of every shard against the index on first
use (a truncated shard becomes a ValueError naming the file), and the current epoch, recorded in
each loader worker at the start of an epoch so augmentation can be seeded by (seed, epoch, sample id).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from pnet_dist.data.augment import sample_rng


class ShardCheckMixin:
    """Turns a truncated or damaged shard into a ValueError naming the file and the fix."""

    def _shard_file(self, shard_id: int) -> tuple[str, int]:
        shard = self.shards[shard_id]
        return os.path.join(shard.dirname, shard.split, shard.raw_data.basename), shard.raw_data.bytes

    def _check_shard(self, shard_id: int) -> None:
        checked = self.__dict__.setdefault("_checked_shards", set())
        if shard_id in checked:
            return
        path, expected = self._shard_file(shard_id)
        actual = os.path.getsize(path) if os.path.exists(path) else -1
        if actual != expected:
            raise ValueError(f"shard {path} is {actual} bytes but its index says {expected}: the shard is "
                             f"truncated or damaged. Re-convert it (delete its part's done.json and re-run the "
                             f"converter) or restore it from the source bucket.")
        checked.add(shard_id)

    def checked_item(self, sample_id: int) -> dict[str, Any]:
        shard_id, _ = self.spanner[sample_id]
        try:
            sample = StreamingDataset.get_item(self, sample_id)
        except Exception as exc:
            self._check_shard(shard_id)
            raise ValueError(f"cannot read sample {sample_id} from {self._shard_file(shard_id)[0]}: {exc}") from exc
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
