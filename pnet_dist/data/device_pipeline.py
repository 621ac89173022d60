"""The image pipeline's part on the training device: a loader batch -> normalized model input.

What the image loaders hand over (pnet_dist.data.images.build_image_loader), per decode_on_device:
  workers decode (default): train (uint8 BCHW, labels B, RandAugment ops B x N x 2),
                            eval  (uint8 BCHW, labels B);
  the device decodes:       train ([B] JPEG byte tensors, labels B, crop plans B x 5, ops B x N x 2),
                            eval  ([B] JPEG byte tensors, labels B).
A float batch (synthetic data, the ffcv path) is already model input and only moves to the device.

Device decode is nvJPEG through torchvision.io.decode_jpeg on a list (one batched call on CUDA; on
the CPU the same call decodes image by image with libjpeg, which is how the path is tested without
a GPU); each image is then cropped and resized on the device with the crop plan its worker drew, so
the geometry matches the worker path's for the same sample. RandAugment (pnet_dist.data.randaugment)
and normalization follow, batched, on the device, for both layouts.
"""
from __future__ import annotations

import warnings

import torch
import torchvision.transforms.v2.functional as TF

from pnet_dist.data.augment import EvalTransform, normalize_batch
from pnet_dist.data.randaugment import BatchRandAugment


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """[B] uint8 1-D JPEG byte tensors (on the CPU) -> [B] uint8 (3, H, W) RGB tensors on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of torchcodec; we pin 0.29.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            raise ValueError(f"a JPEG of this batch does not decode on {device}: {exc}. Shards written by "
                             f"tools/make_image_shards.py decode on the CPU; set data.decode_device: cpu, "
                             f"whose error names the sample.") from exc


def crop_batch(images: list[torch.Tensor], crops_B5: torch.Tensor, size: int) -> torch.Tensor:
    """Per image: RandomResizedCrop with its plan [top, left, h, w, flip] -> uint8 (B, 3, size, size)."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    for i, (image, (top, left, h, w, flip)) in enumerate(zip(images, crops_B5.tolist())):
        crop = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        out[i] = TF.horizontal_flip(crop) if flip else crop
    return out


class DeviceImagePipeline:
    """Loader batch -> (float32 normalized BCHW, int64 labels), both on `device`."""

    def __init__(self, device: torch.device, *, image_size: int, crop_pct: float, randaugment_magnitude: int):
        self.device = device
        self.image_size = image_size
        self.eval_transform = EvalTransform(image_size, crop_pct)
        self.rand_augment = BatchRandAugment(randaugment_magnitude)

    def __call__(self, batch, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch[0], batch[1].to(self.device, non_blocking=True)
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            return images.to(self.device, non_blocking=True), labels
        if isinstance(images, list):
            decoded = decode_jpegs(images, self.device)
            if train:
                images_BCHW = crop_batch(decoded, batch[2], self.image_size)
            else:
                images_BCHW = torch.stack([self.eval_transform.finish(image) for image in decoded])
        else:
            images_BCHW = images.to(self.device, non_blocking=True)
        if train and batch[-1].shape[1]:                       # RandAugment ops, B x N x 2 (N = 0: off)
            images_BCHW = self.rand_augment(images_BCHW, batch[-1])
        return normalize_batch(images_BCHW), labels
