"""RandAugment, batched on the training device, with each sample's ops drawn per sample.

Loader workers draw what is random per sample (`draw_ops`: the op of each of the num_ops slots and
its sign, from the sample's own generator, see augment.sample_rng) and ship it beside the uint8
image; `BatchRandAugment` applies those ops to the whole uint8 batch where the batch lives (the GPU
when there is one). Per slot, the samples that drew the same (op, sign) -- at most 23 groups,
since RandAugment's magnitude is fixed per run -- go through one batched kernel call together. The
kernels are torchvision.transforms.v2's tensor kernels, except geometry and sharpness, which are ours
(an integer gather and shifted sums: 2-4x faster on the CPU) and compute the same pixels. The result
for each sample is bit for bit what torchvision's RandAugment computes for that sample alone on a
tensor with the same ops (tests/test_image_pipeline.py checks it, and checks the distribution
against torchvision's per-sample RandAugment on PIL images).

The augmentation space is torchvision's (14 ops, 31 magnitude bins, signed magnitudes negated with
probability 1/2, nearest-neighbour geometry) with fill = the ImageNet mean as timm does.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

NUM_MAGNITUDE_BINS = 31
FILL = [round(255 * m) for m in (0.485, 0.456, 0.406)]   # the ImageNet mean, in uint8 levels

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness"})
_SIGNED_BY_INDEX = np.array([op in SIGNED for op in OPS])


def check_magnitude(magnitude: int) -> int:
    if isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise ValueError(f"randaugment_magnitude must be an integer bin in [0, {NUM_MAGNITUDE_BINS - 1}], "
                         f"got {magnitude!r}")
    return magnitude


def op_magnitude(op: str, magnitude: int, height: int, width: int) -> float:
    """The unsigned magnitude of `op` at bin `magnitude` for an image of this size, computed as
    torchvision's RandAugment computes it (float32 tables)."""
    bins = NUM_MAGNITUDE_BINS
    if op in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    if op == "Posterize":
        return float((8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int()[magnitude])
    if op == "Solarize":
        return 255.0 * float(torch.linspace(1.0, 0.0, bins)[magnitude])
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width, "TranslateY": 150.0 / 331.0 * height,
           "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}[op]
    return float(torch.linspace(0.0, top, bins)[magnitude])


def draw_ops(rng: np.random.Generator, num_ops: int) -> np.ndarray:
    """One sample's RandAugment draw: int64 (num_ops, 2) of [op index into OPS, sign +1/-1]."""
    drawn = np.ones((num_ops, 2), dtype=np.int64)
    for slot in range(num_ops):
        op = int(rng.integers(len(OPS)))
        drawn[slot, 0] = op
        if _SIGNED_BY_INDEX[op] and rng.random() < 0.5:
            drawn[slot, 1] = -1
    return drawn


def apply_op(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One RandAugment op with a signed magnitude on a uint8 (..., 3, H, W) tensor: torchvision's
    tensor kernel -- the definition `apply_op_batched` is tested against."""
    if op == "Identity":
        return images
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, fill=FILL, center=[0, 0],
                         shear=[shear, 0.0] if op == "ShearX" else [0.0, shear])
    if op in ("TranslateX", "TranslateY"):
        return TF.affine(images, angle=0.0, translate=[int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)],
                         scale=1.0, shear=[0.0, 0.0], fill=FILL)
    if op == "Rotate":
        return TF.rotate(images, angle=magnitude, fill=FILL)
    if op == "Brightness":
        return TF.adjust_brightness(images, 1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(images, 1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(images, 1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(images, 1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(images, int(magnitude))
    if op == "Solarize":
        return TF.solarize(images, magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    raise AssertionError(op)


def apply_op_batched(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """`apply_op` on a uint8 (B, 3, H, W) batch, with the two kernels that are slow on the CPU
    (geometry: float grid_sample with a mask channel; sharpness: a depthwise float conv) replaced by
    integer-index gathers and shifted sums that compute the same pixels."""
    if op in _GEOMETRY:
        return _affine_nearest(images, _inverse_affine(op, magnitude, images.shape[-2], images.shape[-1]))
    if op == "Sharpness":
        return _sharpness(images, 1.0 + magnitude)
    return apply_op(images, op, magnitude)


_GEOMETRY = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _inverse_affine(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """torchvision's inverse affine matrix (output -> input, pixel coordinates centred on the image)
    for the geometric ops, as TF.affine / TF.rotate build it."""
    angle, shear_x, shear_y, tx, ty, cx, cy = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if op in ("ShearX", "ShearY"):
        cx, cy = -width * 0.5, -height * 0.5              # center=[0, 0]: the top-left corner
        shear = math.degrees(math.atan(magnitude))
        shear_x, shear_y = (shear, 0.0) if op == "ShearX" else (0.0, shear)
    elif op == "TranslateX":
        tx = float(int(magnitude))
    elif op == "TranslateY":
        ty = float(int(magnitude))
    else:
        angle = -(magnitude % 360)                        # TF.rotate's sign convention
    rot, sx, sy = math.radians(angle), math.radians(shear_x), math.radians(shear_y)
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += cx - matrix[0] * (cx + tx) - matrix[1] * (cy + ty)
    matrix[5] += cy - matrix[3] * (cx + tx) - matrix[4] * (cy + ty)
    return matrix


def _affine_nearest(images: torch.Tensor, matrix: list[float]) -> torch.Tensor:
    """Nearest-neighbour affine warp with FILL outside, by gathering source pixels: torchvision's
    grid (pixel centres, normalized by half the size) and grid_sample's rounding, on uint8."""
    batch, channels, height, width = images.shape
    device = images.device
    theta = torch.tensor(matrix, dtype=torch.float32, device=device).view(2, 3)
    grid = _base_grid(height, width, device) @ (theta.t() / torch.tensor([0.5 * width, 0.5 * height], device=device))
    src_x = (((grid[:, 0] + 1) * width - 1) / 2).round()
    src_y = (((grid[:, 1] + 1) * height - 1) / 2).round()
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    index = torch.where(inside, src_y * width + src_x, torch.zeros((), device=device)).long()
    # gather, not index_select: on the CPU ~3x faster for an index along the last dimension
    out = images.flatten(2).gather(2, index.view(1, 1, -1).expand(batch, channels, -1))
    out = out.view(batch, channels, height, width)
    fill = torch.tensor(FILL, dtype=torch.uint8, device=device).view(1, -1, 1, 1)
    return torch.where(inside.view(1, 1, height, width), out, fill)


@functools.lru_cache(maxsize=8)
def _base_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H*W, 3) pixel centres relative to the image centre, and 1: torchvision's affine base grid."""
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device)
    return torch.stack([xs.expand(height, width), ys.view(-1, 1).expand(height, width),
                        torch.ones(height, width, device=device)], dim=-1).view(-1, 3)


def _sharpness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """TF.adjust_sharpness on uint8: blend with the 3x3 smoothing [[1,1,1],[1,5,1],[1,1,1]] / 13 of
    the interior (borders kept); the 3x3 sum comes from shifted adds instead of a depthwise conv."""
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    x = images.float()
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :, :-2] + rows[..., :, 1:-1] + rows[..., :, 2:]
    centre = x[..., 1:-1, 1:-1]
    blurred = ((box + 4.0 * centre) / 13.0).round_()
    out = x.clone()
    out[..., 1:-1, 1:-1] = centre + (1.0 - factor) * (blurred - centre)
    return out.clamp_(0, 255).to(torch.uint8)


class BatchRandAugment:
    """Applies per-sample RandAugment draws (from `draw_ops`) to a uint8 BCHW batch on its device."""

    def __init__(self, magnitude: int):
        self.magnitude = check_magnitude(magnitude)

    def __call__(self, images_BCHW: torch.Tensor, ops_BN2: torch.Tensor) -> torch.Tensor:
        assert images_BCHW.dtype == torch.uint8 and ops_BN2.shape[0] == images_BCHW.shape[0]
        height, width = images_BCHW.shape[-2:]
        # Group keys on the host (a few hundred ints): the grouping decides which kernels run.
        codes_BN = (ops_BN2[..., 0] * 2 + (ops_BN2[..., 1] < 0)).cpu()
        out = images_BCHW
        for slot in range(codes_BN.shape[1]):
            codes_B = codes_BN[:, slot]
            for code in torch.unique(codes_B).tolist():
                op, negative = OPS[code // 2], code % 2 == 1
                if op == "Identity":
                    continue
                magnitude = op_magnitude(op, self.magnitude, height, width)
                index = (codes_B == code).nonzero().view(-1).to(out.device)
                group = apply_op_batched(out.index_select(0, index), op, -magnitude if negative else magnitude)
                if out is images_BCHW:
                    out = images_BCHW.clone()          # the caller's batch stays as it was
                out.index_copy_(0, index, group)
        return out
