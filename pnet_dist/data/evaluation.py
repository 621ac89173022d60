"""Eval sets over MDS shards: the same samples in the same batches at any number of ranks.

An eval set is read by global position, not through streaming's per-rank partition (which pads
or drops samples to split an epoch evenly): global batch b holds samples [b*B, (b+1)*B) of the
first N (the last batch may be short), and pnet_dist.train.evaluate gives batch b to rank
b % world_size and adds the per-batch sums in batch order. So eval figures are a function of the
weights alone, not of the world size. Samples are read by random access into the
StreamingDataset (downloaded shard by shard into its cache), with loader workers when asked.

    build_eval_set(uri, *, batch_size, image_size, crop_pct, seq_len, ...)  -> ShardEvalSet
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from pnet_dist.data.shards import dataset_info, streaming_kwargs


class ShardEvalSet:
    """`batches(indices, num_samples)` yields global batches (see the module docstring)."""

    def __init__(self, dataset, *, batch_size: int, num_workers: int, collate_fn: Callable,
                 finalize: Callable = lambda batch: batch):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.finalize = finalize
        self.num_samples = dataset.num_samples

    def batches(self, indices: list[int], num_samples: int) -> Iterator[Any]:
        """Global batches `indices` of the first num_samples samples, in that order."""
        ids = [list(range(b * self.batch_size, min(num_samples, (b + 1) * self.batch_size))) for b in indices]
        if self.num_workers == 0:
            for batch_ids in ids:
                yield self.finalize(self.collate_fn([self.dataset[i] for i in batch_ids]))
            return
        from torch.utils.data import DataLoader
        loader = DataLoader(_ByIndex(self.dataset), batch_sampler=ids, num_workers=self.num_workers,
                            collate_fn=self.collate_fn, multiprocessing_context="fork")
        for batch in loader:
            yield self.finalize(batch)


class _ByIndex:
    """Map-style view of a StreamingDataset (an IterableDataset that also reads by index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __len__(self) -> int:
        return self.dataset.num_samples


def build_eval_set(uri: str, *, batch_size: int, image_size: int = 224, crop_pct: float = 0.875,
                   seq_len: int | None = None, num_workers: int = 1, num_canonical_nodes: int | None = None,
                   cache_dir: str | None = None, decode_on_device: bool = False) -> ShardEvalSet:
    """The eval set of an image dataset ((uint8 BCHW, labels) batches, resize + center crop; with
    decode_on_device the JPEG bytes instead, see pnet_dist.data.device_pipeline) or a token
    dataset ((input_ids_BT, labels_BT) batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = dataset_info(uri)
    if "ffcv_beton" in info:
        raise ValueError(f"{uri} holds an ffcv dataset, not shards: set data.format=ffcv to read it")
    stream = streaming_kwargs(uri, batch_size=batch_size, shuffle=False, seed=0,
                              num_canonical_nodes=num_canonical_nodes, cache_dir=cache_dir)
    if info.get("kind") == "image":
        from pnet_dist.data.augment import EncodedEvalTransform, EvalTransform
        from pnet_dist.data.datasets import ImageShardDataset
        from pnet_dist.data.images import _collate_images
        transform = EncodedEvalTransform() if decode_on_device else EvalTransform(image_size, crop_pct)
        dataset = ImageShardDataset(transform=transform, aug_seed=0, **stream)
        return ShardEvalSet(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_images)
    if info.get("kind") == "text":
        from pnet_dist.data.datasets import TokenShardDataset
        from pnet_dist.data.text import _collate_tokens, _finalize_tokens
        if seq_len is not None and seq_len != info["seq_len"]:
            raise ValueError(f"{uri} was written with seq_len {info['seq_len']}, the eval set asks for {seq_len}: set "
                             f"data.seq_len to {info['seq_len']} or re-run tools/make_text_shards.py --seq-len {seq_len}")
        return ShardEvalSet(TokenShardDataset(**stream), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_collate_tokens, finalize=_finalize_tokens)
    raise ValueError(f"{uri}: dataset.json kind {info.get('kind')!r} is neither 'image' nor 'text'")
