"""Image decode and per-sample augmentation in loader workers; normalization and mixup/cutmix of batches.

The pipeline is split where the batch forms. Loader workers do only what must be done per image:
decode (at 1/2, 1/4 or 1/8 scale through libjpeg's DCT scaling where the crop allows), the
RandomResizedCrop, the flip, and the sample's RandAugment draw (a few ints); images stay uint8 (4x
fewer bytes through shared memory and to the GPU). RandAugment (pnet_dist.data.randaugment),
normalization (`normalize_batch`) and mixup/cutmix run on the whole batch on the training device
(pnet_dist.data.device_pipeline).

Everything random here draws from an explicit generator, never from a global or per-worker RNG:
per-sample choices from `sample_rng(seed, epoch, sample_id)` (numpy), batch mixing from a
torch.Generator the engine seeds per micro-batch. A resumed run therefore sees bit-identical batches,
whatever the number of loader workers.

Decoding uses simplejpeg (libjpeg-turbo: ~1.2x torchvision.io.decode_jpeg, ~1.4x PIL, measured by
tools/bench_loader.py), then transforms.v2.functional on uint8 CHW tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.v2.functional as TF

from pnet_dist.data.randaugment import check_magnitude, draw_ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator for one sample's augmentation: a pure function of (seed, epoch, sample id)."""
    return np.random.default_rng([seed, epoch, sample_id])


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header, without decoding."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return height, width


def decode_jpeg_rgb(data: bytes, min_height: int = 0, min_width: int = 0) -> torch.Tensor:
    """JPEG bytes -> uint8 tensor (3, H, W) (a channels-last view). Grayscale JPEGs come out as RGB.

    With min_height / min_width the decoder scales by 1/2, 1/4 or 1/8 in the DCT domain when the
    result stays at least that large (factors between 1/2 and 1 decode slower than full size with
    libjpeg-turbo, so they are not used)."""
    return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height,
                                                   min_width=min_width, min_factor=2.0)).permute(2, 0, 1)


# -- geometry --------------------------------------------------------------------------------------
def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop, as torchvision samples it, drawn from rng."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback to a central crop with the ratio clamped, as torchvision does.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# -- per-sample worker transforms -----------------------------------------------------------------
@dataclass(frozen=True)
class TrainTransform:
    """decode (DCT-scaled to what the crop needs) -> RandomResizedCrop -> flip, on uint8, plus the
    sample's RandAugment draw, which `BatchRandAugment` applies on the training device.

    Returns (image uint8 (3, S, S), RandAugment ops int64 (randaugment_ops, 2)); randomness from rng,
    drawn in the same order as always: crop box, flip, then the ops.
    """
    image_size: int
    hflip: float = 0.5
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    min_crop_scale: float = 0.08

    def __post_init__(self):
        check_magnitude(self.randaugment_magnitude)
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")

    def plan(self, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The sample's random choices, which need only its size: crop plan int64 [top, left, h, w,
        flip] in full-size pixels, and the RandAugment ops."""
        top, left, h, w = random_resized_crop_box(height, width, rng, (self.min_crop_scale, 1.0))
        flip = rng.random() < self.hflip
        return np.array([top, left, h, w, flip], dtype=np.int64), draw_ops(rng, self.randaugment_ops)

    def __call__(self, jpeg: bytes, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = jpeg_size(jpeg)
        crop, ops = self.plan(height, width, rng)
        top, left, h, w, flip = crop.tolist()
        size = self.image_size
        # Decode at 1/2, 1/4 or 1/8 scale while the crop stays >= the output size: the resize after it
        # stays a downscale, and the decoder skips most of the inverse DCT and colour conversion.
        img = decode_jpeg_rgb(jpeg, min_height=-(-size * height // h), min_width=-(-size * width // w))
        scale_y, scale_x = img.shape[-2] / height, img.shape[-1] / width
        if scale_y != 1.0 or scale_x != 1.0:
            top, h = round(top * scale_y), max(1, round(h * scale_y))
            left, w = round(left * scale_x), max(1, round(w * scale_x))
        img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        if flip:
            img = TF.horizontal_flip(img)
        return img, torch.from_numpy(ops)


@dataclass(frozen=True)
class EvalTransform:
    """decode (DCT-scaled where the resize allows) -> resize the short side to image_size / crop_pct
    -> center crop image_size. Returns (image uint8 (3, S, S),)."""
    image_size: int
    crop_pct: float = 0.875

    def resize_to(self) -> int:
        return int(math.floor(self.image_size / self.crop_pct))

    def __call__(self, jpeg: bytes, rng: np.random.Generator | None = None) -> tuple[torch.Tensor]:
        height, width = jpeg_size(jpeg)
        resize_to = self.resize_to()
        img = decode_jpeg_rgb(jpeg, min_height=resize_to if height <= width else 0,
                              min_width=resize_to if width < height else 0)
        return (self.finish(img),)

    def finish(self, img: torch.Tensor) -> torch.Tensor:
        img = TF.resize(img, [self.resize_to()], antialias=True)
        return TF.center_crop(img, [self.image_size, self.image_size])


def _encoded(jpeg: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)


@dataclass(frozen=True)
class EncodedTrainTransform:
    """For decoding on the training device: the JPEG bytes as stored, with the sample's crop plan and
    RandAugment ops drawn exactly as `TrainTransform` draws them. Returns (bytes uint8 (n,), plan, ops)."""
    train: TrainTransform

    def __call__(self, jpeg: bytes, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        crop, ops = self.train.plan(*jpeg_size(jpeg), rng)
        return _encoded(jpeg), torch.from_numpy(crop), torch.from_numpy(ops)


@dataclass(frozen=True)
class EncodedEvalTransform:
    """For decoding on the training device: the JPEG bytes as stored (their header checked). Returns (bytes,)."""

    def __call__(self, jpeg: bytes, rng: np.random.Generator | None = None) -> tuple[torch.Tensor]:
        jpeg_size(jpeg)
        return (_encoded(jpeg),)


def normalize_batch(images_BCHW: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 BCHW -> float32 BCHW normalized with the ImageNet mean and std."""
    inv_std_C = 1.0 / (torch.tensor(std, dtype=torch.float32, device=images_BCHW.device).view(1, -1, 1, 1) * 255.0)
    bias_C = -torch.tensor(mean, dtype=torch.float32, device=images_BCHW.device).view(1, -1, 1, 1) * 255.0 * inv_std_C
    # In place: ~10x faster on CPU than (x - mean) / std with fresh broadcast outputs.
    return images_BCHW.float().mul_(inv_std_C).add_(bias_C)


# -- batch-level mixing ----------------------------------------------------------------------------
def mixup_cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup_alpha: float,
                 cutmix_alpha: float, label_smoothing: float, generator: torch.Generator,
                 switch_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level mixup or cutmix (timm's 'batch' mode) with label smoothing as soft targets.

    images: float BCHW; labels: int64 B. Returns (mixed images, soft targets B x num_classes).
    The batch is mixed with its reverse. When both alphas are > 0, cutmix is chosen with
    probability switch_prob. All randomness comes from `generator`.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels disagree on batch size: {images.shape[0]} vs {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    off = label_smoothing / num_classes
    targets_BK = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    targets_BK.scatter_(1, labels.view(-1, 1), 1.0 - label_smoothing + off)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets_BK

    # One draw from the torch generator seeds the numpy generator that samples Beta(a, a).
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
    beta = lambda alpha: float(rng.beta(alpha, alpha))  # noqa: E731

    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    flipped = images.flip(0)
    if use_cutmix:
        lam = beta(cutmix_alpha)
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)  # the area actually pasted
    else:
        lam = beta(mixup_alpha)
        images = images * lam + flipped * (1.0 - lam)
    return images, targets_BK * lam + targets_BK.flip(0) * (1.0 - lam)
