"""ffcv fast path: image shards -> an ffcv dataset folder, and the ffcv image loader a job selects
with `data.format: ffcv` (pnet_dist.tasks).

Optional extra `ffcv` (ffcv==1.0.2 + its system libraries: libturbojpeg0-dev, libopencv-dev,
pkg-config). Importing this module without ffcv raises ImportError naming the extra.

An ffcv dataset is a folder (local or s3://) that `write_beton` (tools/make_ffcv_beton.py) makes
from image shards:
    <root>/dataset.beton      ffcv's file
    <root>/dataset.json       our metadata, as for shards (kind, num_samples, num_classes), plus
                              "ffcv_beton": the file's name -- what marks the folder as ffcv's
    <root>/class_index.json   the shards' class index
ffcv memory-maps a local file: a dataset in S3 is downloaded once per node (into data.cache_dir)
before the loader opens it.

Compared with the streaming loaders, the ffcv path
  * gives up RandAugment (ffcv has no such op; a job asking for it is refused at config time) and
    the JPEG bytes as converted: ffcv's writer decodes and re-encodes every image (quality 90,
    longer side capped at max_resolution);
  * gives up bit-exact resume: ffcv draws its crops and flips from numba's per-thread random
    state, which no seed of ours reaches, so a resumed run sees the same samples in the same order
    but not the same crops;
  * keeps a resumable sample order: an epoch's order is a permutation seeded by (seed, epoch),
    dealt to the ranks round robin, and the loader state is (epoch, samples of the epoch that all
    ranks consumed), so a resume mid-epoch -- on the same or another number of ranks -- continues
    the epoch with the samples not yet seen, none repeated or lost;
  * gains decode speed (ffcv's JIT-compiled pipeline; see tools/bench_loader.py for the ratio).
Normalization happens on the batch, as in our loaders, so mixup_cutmix works unchanged on it.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

try:
    import ffcv  # noqa: F401
except ImportError as exc:
    raise ImportError("the ffcv path needs the optional extra: pip install 'pnet_dist[ffcv]' (and the system "
                      "packages libturbojpeg0-dev libopencv-dev pkg-config)") from exc
from ffcv.traversal_order.base import TraversalOrder

from pnet_dist import dist
from pnet_dist.data.augment import normalize_batch
from pnet_dist.data.images import CLASS_INDEX
from pnet_dist.data.shards import META, dataset_info, stream_dirs
from pnet_dist.log import get_logger
from pnet_dist.storage import is_s3, join, open_storage

log = get_logger(__name__)

BETON = "dataset.beton"


# -- writing -------------------------------------------------------------------------------------
class _DecodedShards:
    """Our MDS image shards as an indexable (RGB uint8 HWC array, label) dataset for ffcv's writer."""

    def __init__(self, local_dir: str):
        from streaming import LocalDataset
        self.dataset = LocalDataset(local=local_dir)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from PIL import Image
        sample = self.dataset[index]
        with Image.open(io.BytesIO(sample["jpeg"])) as img:
            return np.asarray(img.convert("RGB")), int(sample["label"])


def write_beton(shards_uri: str, out_uri: str, *, max_resolution: int = 512, jpeg_quality: int = 90,
                num_workers: int = 1) -> int:
    """Image shards at shards_uri -> an ffcv dataset folder at out_uri (both local or s3://);
    returns the sample count."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    info = dataset_info(shards_uri)
    if info.get("kind") != "image" or "ffcv_beton" in info:
        raise ValueError(f"{shards_uri} is not a folder of image shards (tools/make_image_shards.py writes them)")
    remote, local = stream_dirs(shards_uri, None)
    if remote is not None:
        source_storage = open_storage(remote)
        for key in source_storage.list():
            source_storage.get_file(key, os.path.join(local, key))
    source = _DecodedShards(local)
    out = open_storage(out_uri)
    with tempfile.TemporaryDirectory(prefix="pnet_beton_") as tmp:
        beton_path = os.path.join(tmp, BETON) if is_s3(out_uri) else os.path.join(out_uri, BETON)
        os.makedirs(os.path.dirname(beton_path), exist_ok=True)
        writer = DatasetWriter(beton_path, {
            "image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality),
            "label": IntField(),
        }, num_workers=num_workers)
        writer.from_indexed_dataset(source)
        if is_s3(out_uri):
            out.put_file(beton_path, BETON)
    out.put_bytes(open_storage(shards_uri).get_bytes(CLASS_INDEX), CLASS_INDEX)
    meta = {"kind": "image", "ffcv_beton": BETON, "num_samples": len(source), "num_classes": info["num_classes"],
            "source": shards_uri, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality}
    out.put_bytes(json.dumps(meta, indent=1).encode(), META)   # last: the folder is complete
    return len(source)


# -- reading -------------------------------------------------------------------------------------
def local_beton(uri: str, cache_dir: str | None = None) -> str:
    """Path of the dataset's .beton on this node; an s3:// dataset is downloaded by one rank per
    node (the others wait) unless a complete copy is there already."""
    info = dataset_info(uri)
    if "ffcv_beton" not in info:
        raise ValueError(f"{uri} holds image shards, not an ffcv dataset: write one with "
                         f"tools/make_ffcv_beton.py {uri} OUT, or set data.format=mds")
    if not is_s3(uri):
        return os.path.join(uri, info["ffcv_beton"])
    _, local_dir = stream_dirs(uri, cache_dir)
    path = os.path.join(local_dir, info["ffcv_beton"])
    if dist.get_local_rank() == 0:
        storage = open_storage(uri)
        expected = storage.size(info["ffcv_beton"])
        if not os.path.isfile(path) or os.path.getsize(path) != expected:
            log.info("downloading %s (%.1f MB) to %s", join(uri, info["ffcv_beton"]), expected / 1e6, path)
            storage.get_file(info["ffcv_beton"], path + ".partial")
            os.replace(path + ".partial", path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


class ResumableOrder(TraversalOrder):
    """This rank's samples of an epoch: the dataset's indices, permuted by (seed, epoch) when
    shuffling, without the first `resume_at[1]` positions when resuming inside epoch `resume_at[0]`,
    dealt round robin to the ranks (rank r takes positions r, r + W, ...). With drop_last every
    rank gets the same number of full batches."""

    def __init__(self, loader, *, shuffle: bool, drop_last: bool, rank: int, world_size: int):
        super().__init__(loader)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.batch_size = loader.batch_size
        self.resume_at: tuple[int, int] | None = None

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """The global order of the epoch's samples still to come (all ranks)."""
        order = np.random.default_rng(self.seed + epoch).permutation(self.indices) if self.shuffle else self.indices
        if self.resume_at is not None and self.resume_at[0] == epoch:
            order = order[self.resume_at[1]:]
        return order

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.epoch_positions(epoch)
        mine = order[self.rank::self.world_size]
        if self.drop_last:
            mine = mine[:len(order) // self.world_size // self.batch_size * self.batch_size]
        return mine


class FfcvImageLoader:
    """ffcv Loader over a .beton yielding (float32 normalized BCHW, int64 labels).

    One `iter()` is one epoch (or its rest after `load_state_dict`). The state is the epoch and the
    samples of it consumed by all ranks; see the module docstring for what a resume reproduces.
    """

    def __init__(self, loader, order: ResumableOrder):
        self.loader, self.order = loader, order
        self.batch_size = loader.batch_size
        self.epoch, self.sample_in_epoch = 0, 0
        self._resuming = False

    def __len__(self) -> int:
        """Batches per rank in the next epoch (or the rest of it)."""
        num = len(self.order.sample_order(self.epoch))
        return num // self.batch_size if self.order.drop_last else -(-num // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sample_in_epoch and not self._resuming:
            # The last iteration was left early (the caller stopped early): start afresh.
            self.epoch, self.sample_in_epoch = self.epoch + 1, 0
        self._resuming = False
        self.order.resume_at = (self.epoch, self.sample_in_epoch)
        self.loader.next_epoch = self.epoch
        for images_BHWC, labels_B1 in self.loader:
            self.sample_in_epoch += self.batch_size * self.order.world_size   # counted once handed out
            yield normalize_batch(images_BHWC.permute(0, 3, 1, 2)), labels_B1.view(-1).long()
        self.epoch, self.sample_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch, "seed": self.order.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "sample_in_epoch", "seed"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}: it was not saved by the ffcv loader "
                             f"(a checkpoint of a data.format=mds run cannot resume with data.format=ffcv)")
        if state["seed"] != self.order.seed:
            raise ValueError(f"the checkpoint's ffcv order was seeded with {state['seed']}, this job's "
                             f"data.shuffle_seed is {self.order.seed}; set it back to resume")
        self.epoch, self.sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        self._resuming = True
        if self.sample_in_epoch and dist.is_main():
            log.warning("ffcv loader: resuming epoch %d after its first %d samples; the same samples follow in "
                        "the same order, but ffcv's random crops and flips are not seeded, so the run is not "
                        "bit-identical to an uninterrupted one", self.epoch, self.sample_in_epoch)


class FfcvEvalSet:
    """An ffcv dataset as an eval set (pnet_dist.data.evaluation's interface): global batch b is
    samples [b*B, (b+1)*B) in stored order, center-cropped, at any number of ranks."""

    def __init__(self, beton: str, num_samples: int, *, batch_size: int, image_size: int, crop_pct: float,
                 num_workers: int):
        self.beton, self.num_samples, self.batch_size = beton, num_samples, batch_size
        self.image_size, self.crop_pct, self.num_workers = image_size, crop_pct, num_workers

    def batches(self, indices: list[int], num_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Global batches `indices` of the first num_samples samples, in that order: one ffcv Loader
        over their samples, re-cut into those batches (a short last batch or a repeated batch 0 would
        not line up with the Loader's own batches)."""
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor
        sizes = [len(range(b * self.batch_size, min(num_samples, (b + 1) * self.batch_size))) for b in indices]
        ids = [i for b in indices for i in range(b * self.batch_size, min(num_samples, (b + 1) * self.batch_size))]
        if not ids:
            return
        loader = Loader(self.beton, batch_size=self.batch_size, num_workers=max(1, self.num_workers),
                        order=OrderOption.SEQUENTIAL, drop_last=False, indices=ids,
                        pipelines={"image": [CenterCropRGBImageDecoder((self.image_size, self.image_size),
                                                                       ratio=self.crop_pct), ToTensor()],
                                   "label": [IntDecoder(), ToTensor()]})
        pending_images, pending_labels, size_iter = [], [], iter(sizes)
        want = next(size_iter)
        for images_BHWC, labels_B1 in loader:
            pending_images.append(images_BHWC.permute(0, 3, 1, 2).clone())   # ffcv reuses its buffers
            pending_labels.append(labels_B1.view(-1).long().clone())
            images, labels = torch.cat(pending_images), torch.cat(pending_labels)
            while want is not None and len(labels) >= want:
                yield normalize_batch(images[:want]), labels[:want]
                images, labels = images[want:], labels[want:]
                want = next(size_iter, None)
            pending_images, pending_labels = [images], [labels]


def build_ffcv_eval_set(uri: str, *, batch_size: int, image_size: int = 224, crop_pct: float = 0.875,
                        num_workers: int = 1, cache_dir: str | None = None) -> FfcvEvalSet:
    """The ffcv dataset at uri (local or s3://) as an eval set; see FfcvEvalSet."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    beton = local_beton(uri, cache_dir)
    return FfcvEvalSet(beton, int(dataset_info(uri)["num_samples"]), batch_size=batch_size, image_size=image_size,
                       crop_pct=crop_pct, num_workers=num_workers)


def build_ffcv_image_loader(uri: str, *, train: bool, batch_size: int, image_size: int = 224,
                            num_workers: int = 1, seed: int = 42, crop_pct: float = 0.875, hflip: float = 0.5,
                            min_crop_scale: float = 0.08, shuffle: bool | None = None,
                            cache_dir: str | None = None) -> FfcvImageLoader:
    """Loader over the ffcv dataset at uri (local or s3://), this rank's share of every epoch.

    train: RandomResizedCrop(min_crop_scale..1) + flip, full batches only, shuffled by default.
    eval: center crop of image_size / crop_pct, every batch kept, in stored order by default.
    """
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    beton = local_beton(uri, cache_dir)
    if train:
        image_ops = [RandomResizedCropRGBImageDecoder((image_size, image_size), scale=(min_crop_scale, 1.0))]
        if hflip > 0:
            image_ops.append(RandomHorizontalFlip(flip_prob=hflip))
    else:
        image_ops = [CenterCropRGBImageDecoder((image_size, image_size), ratio=crop_pct)]
    loader = Loader(beton, batch_size=batch_size, num_workers=max(1, num_workers), seed=seed,
                    order=OrderOption.SEQUENTIAL, drop_last=train,
                    pipelines={"image": image_ops + [ToTensor()], "label": [IntDecoder(), ToTensor()]})
    # ffcv 1.0.2 takes a custom TraversalOrder only as an instance that it then calls with the
    # loader (loader.py), which a TraversalOrder, built from that loader, cannot be: set it after.
    order = ResumableOrder(loader, shuffle=train if shuffle is None else shuffle, drop_last=train,
                           rank=dist.get_rank(), world_size=dist.get_world_size())
    loader.traversal_order = order
    return FfcvImageLoader(loader, order)
