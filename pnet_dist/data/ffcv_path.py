"""ffcv fast path for local NVMe: our image shards -> an ffcv .beton file, and an ffcv image loader.

Optional extra `ffcv` (ffcv==1.0.2 + its system libraries: libturbojpeg0-dev, libopencv-dev,
pkg-config). Importing this module without ffcv raises ImportError naming the extra.

What the ffcv path does and does not do, compared with the streaming loaders:
  * reads local files only: a dataset in S3 is read through streaming's LocalDataset after a copy,
    and the .beton must sit on a local disk;
  * images are re-encoded by ffcv's writer (write_mode 'jpg', quality 90, longer side capped by
    max_resolution): ffcv stores its own JPEGs, not our bytes;
  * train pipeline: ffcv's RandomResizedCrop decoder + flip; no RandAugment (ffcv has no such op);
    normalization on the batch, as in our loaders, so mixup_cutmix works unchanged on its output;
  * resume is per epoch only: ffcv's order is a function of (seed, epoch), which `state_dict` keeps,
    but ffcv has no mid-epoch position. Exact mid-epoch resume needs the streaming loaders.
"""
from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np
import torch

try:
    import ffcv  # noqa: F401
except ImportError as exc:
    raise ImportError("the ffcv path needs the optional extra: pip install 'pnet_dist[ffcv]' (and the system "
                      "packages libturbojpeg0-dev libopencv-dev pkg-config)") from exc

from pnet_dist.data.augment import normalize_batch
from pnet_dist.data.shards import dataset_info, stream_dirs


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


def write_beton(shards_uri: str, beton_path: str, *, max_resolution: int = 512, jpeg_quality: int = 90,
                num_workers: int = 1) -> int:
    """Write the image shards at shards_uri (local or s3://) into an ffcv .beton; returns the sample count."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if dataset_info(shards_uri).get("kind") != "image":
        raise ValueError(f"{shards_uri} is not an image dataset")
    remote, local = stream_dirs(shards_uri, None)
    if remote is not None:
        _download(remote, local)
    source = _DecodedShards(local)
    writer = DatasetWriter(beton_path, {
        "image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality),
        "label": IntField(),
    }, num_workers=num_workers)
    writer.from_indexed_dataset(source)
    return len(source)


def _download(remote: str, local: str) -> None:
    from pnet_dist.storage import open_storage
    storage = open_storage(remote)
    for key in storage.list():
        storage.get_file(key, f"{local}/{key}")


class FfcvImageLoader:
    """ffcv Loader over a .beton yielding (float32 normalized BCHW, int64 labels), resumable per epoch."""

    def __init__(self, loader, batch_size: int):
        self.loader = loader
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images_BHWC, labels_B1 in self.loader:
            yield normalize_batch(images_BHWC.permute(0, 3, 1, 2)), labels_B1.view(-1).long()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.loader.next_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.next_epoch = int(state["epoch"])


def build_ffcv_image_loader(beton_path: str, *, train: bool, batch_size: int, image_size: int = 224,
                            num_workers: int = 1, seed: int = 42, crop_pct: float = 0.875, hflip: float = 0.5,
                            min_crop_scale: float = 0.08, distributed: bool = False) -> FfcvImageLoader:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    if train:
        image_ops = [RandomResizedCropRGBImageDecoder((image_size, image_size), scale=(min_crop_scale, 1.0))]
        if hflip > 0:
            image_ops.append(RandomHorizontalFlip(flip_prob=hflip))
    else:
        image_ops = [CenterCropRGBImageDecoder((image_size, image_size), ratio=crop_pct)]
    loader = Loader(beton_path, batch_size=batch_size, num_workers=num_workers, seed=seed,
                    order=(OrderOption.RANDOM if distributed else OrderOption.QUASI_RANDOM) if train else OrderOption.SEQUENTIAL, drop_last=train,
                    distributed=distributed,
                    pipelines={"image": image_ops + [ToTensor()], "label": [IntDecoder(), ToTensor()]})
    return FfcvImageLoader(loader, batch_size)
