"""Image datasets: ImageNet-1K/22K layouts -> MDS shards, and the image train/eval loaders.

Input layouts (`detect_layout`):
  folder  ImageFolder, root/<synset>/<image> (ImageNet-1K train, or val after sorting into folders);
  tars    the ImageNet-22K release once its outer tar is unpacked: root/<synset>.tar, each holding
          that synset's images, read in place (no second unpacking);
  flat    ImageNet-1K's official validation layout: root/<image> with the labels in a separate
          file (`read_image_labels`: the ILSVRC2012 devkit archive, Kaggle's LOC_val_solution.csv,
          or "<file> <synset>" lines).
Hold-out split: `convert_images(..., holdout_per_class=N, holdout_uri=...)` writes N images of
each class, chosen with the seed, to their own dataset (the same class index) and the rest to
the training output -- ImageNet-22K has no validation split. A class keeps at least half of its
images for training (one with 2N images or fewer gives up half, rounded down).

Shard columns: jpeg (the file's bytes as stored, unless it had to be re-encoded), label (int),
synset (str), name (str, the input's path relative to the source, for tracing a sample back).
Inputs are listed, globally shuffled with a fixed seed (so every shard mixes classes, which
matters for ImageNet-22K where a release tar holds one synset), and cut into parts of
`images_per_part`; see shards.py for the part/resume scheme.

Each input is decoded once while converting (at 1/8 scale through libjpeg's DCT scaling, which
still reads every byte): files that do not decode are skipped, named and counted. Non-JPEG files
(ImageNet-1K has a PNG and CMYK JPEGs among its .JPEGs) and, with max_side, images larger than
max_side are re-encoded to RGB JPEG.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pnet_dist.data.augment import EncodedEvalTransform, EncodedTrainTransform, EvalTransform, TrainTransform
from pnet_dist.data.shards import (SHARD_SIZE_LIMIT, ConversionSummary, PartResult, ShardLoader, count_progress,
                                   dataset_info, streaming_kwargs, write_parts)
from pnet_dist.log import get_logger
from pnet_dist.storage import open_storage

log = get_logger(__name__)

CLASS_INDEX = "class_index.json"
COLUMNS = {"jpeg": "bytes", "label": "int", "synset": "str", "name": "str"}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


# -- listing inputs ------------------------------------------------------------------------------------
@dataclass
class ImageItems:
    """Every input image: a whole file (offset -1) or a member of a tar (offset, size)."""
    sources: list[str]            # file or tar paths
    source_idx: np.ndarray        # int32 per item
    offsets: np.ndarray           # int64 per item, -1 = whole file
    sizes: np.ndarray             # int64 per item
    names: np.ndarray             # str (or utf-8 bytes) per item, relative to the input root
    labels: np.ndarray            # int64 per item
    synsets: list[str]            # label -> synset

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "ImageItems":
        return ImageItems(self.sources, self.source_idx[index], self.offsets[index], self.sizes[index],
                          self.names[index], self.labels[index], self.synsets)

    def read(self, i: int) -> bytes:
        path = self.sources[self.source_idx[i]]
        with open(path, "rb") as f:
            if self.offsets[i] < 0:
                return f.read()
            f.seek(int(self.offsets[i]))
            return f.read(int(self.sizes[i]))


def load_class_index(path: str) -> dict[str, int]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or sorted(data.values()) != list(range(len(data))):
        raise ValueError(f"{path}: a class index must map synset -> label with labels 0..N-1")
    return data


def _resolve_classes(found: list[str], class_index: dict[str, int] | None, root: str) -> dict[str, int]:
    if class_index is None:
        return {synset: i for i, synset in enumerate(sorted(found))}
    unknown = sorted(set(found) - set(class_index))
    if unknown:
        raise ValueError(f"{root}: classes {unknown[:5]} ({len(unknown)} in all) are not in the given class "
                         f"index; pass the class index of the training set this split belongs to")
    return class_index


def list_image_folder(root: str, class_index: dict[str, int] | None = None) -> ImageItems:
    """ImageFolder layout: root/<synset>/<image>. Labels: sorted synsets, or the given class index."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise ValueError(f"{root} is not a directory; expected an ImageFolder tree root/<class>/<image>")
    class_dirs = sorted(p for p in root_path.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-directories; expected root/<class>/<image>")
    classes = _resolve_classes([p.name for p in class_dirs], class_index, root)
    paths, labels = [], []
    for class_dir in class_dirs:
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(file))
                labels.append(classes[class_dir.name])
    n = len(paths)
    return ImageItems(paths, np.arange(n, dtype=np.int32), np.full(n, -1, np.int64), np.zeros(n, np.int64),
                      np.array([os.path.relpath(p, root) for p in paths]), np.array(labels, np.int64),
                      sorted(classes, key=classes.get))


def _list_tar(path: str) -> tuple[list[str], list[int], list[int]]:
    names, offsets, sizes = [], [], []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                names.append(member.name)
                offsets.append(member.offset_data)
                sizes.append(member.size)
    return names, offsets, sizes


def list_synset_tars(root: str, class_index: dict[str, int] | None = None, num_workers: int = 1) -> ImageItems:
    """ImageNet-22K release layout: root/<synset>.tar, each holding that synset's images."""
    tars = sorted(Path(root).glob("*.tar")) if Path(root).is_dir() else []
    if not tars:
        raise ValueError(f"{root} holds no <synset>.tar files; expected the ImageNet-22K release layout")
    classes = _resolve_classes([t.stem for t in tars], class_index, root)
    if num_workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(num_workers) as pool:
            listings = pool.map(_list_tar, [str(t) for t in tars], chunksize=16)
    else:
        listings = [_list_tar(str(t)) for t in tars]
    counts = [len(names) for names, _, _ in listings]
    return ImageItems([str(t) for t in tars],
                      np.repeat(np.arange(len(tars), dtype=np.int32), counts),
                      np.concatenate([np.array(o, np.int64) for _, o, _ in listings]),
                      np.concatenate([np.array(s, np.int64) for _, _, s in listings]),
                      # bytes, not str: a quarter of the memory for ImageNet-22K's 14M names
                      np.array([f"{t.name}/{n}".encode() for t, (names, _, _) in zip(tars, listings) for n in names]),
                      np.concatenate([np.full(c, classes[t.stem], np.int64) for t, c in zip(tars, counts)]),
                      sorted(classes, key=classes.get))


def _image_stem(name: str) -> str:
    return Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def read_image_labels(path: str) -> dict[str, str]:
    """Image file stem -> synset from a label file: the ILSVRC2012 devkit archive
    (ILSVRC2012_devkit_t12.tar.gz: data/meta.mat numbers the synsets, and line i of
    data/ILSVRC2012_validation_ground_truth.txt is the number of ILSVRC2012_val_<i, 8 digits>),
    Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the first word of the prediction is
    the synset), or lines "<file> <synset>" (whitespace or comma separated)."""
    if tarfile.is_tarfile(path):
        return _read_devkit_labels(path)
    labels: dict[str, str] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields or (number == 1 and fields[0] == "ImageId"):
                continue
            if len(fields) < 2 or not fields[1].startswith("n"):
                raise ValueError(f"{path}:{number}: expected '<image file> <synset>' (e.g. 'ILSVRC2012_val_00000001"
                                 f".JPEG n01751748'), got {line.strip()!r}")
            labels[_image_stem(fields[0])] = fields[1]
    return labels


def _read_devkit_labels(path: str) -> dict[str, str]:
    from scipy.io import loadmat

    with tarfile.open(path) as tar:
        members = {Path(m.name).name: m for m in tar if m.isfile()}
        missing = {"meta.mat", "ILSVRC2012_validation_ground_truth.txt"} - set(members)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: pass the ILSVRC2012 devkit archive "
                             f"(ILSVRC2012_devkit_t12.tar.gz) or a '<file> <synset>' label file")
        synsets = loadmat(io.BytesIO(tar.extractfile(members["meta.mat"]).read()), squeeze_me=True)["synsets"]
        ground_truth = tar.extractfile(members["ILSVRC2012_validation_ground_truth.txt"]).read().decode().split()
    wnid_of = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets}
    return {f"ILSVRC2012_val_{i:08d}": wnid_of[int(number)] for i, number in enumerate(ground_truth, 1)}


def list_flat_folder(root: str, labels: dict[str, str], class_index: dict[str, int] | None = None,
                     labels_source: str = "the label file") -> ImageItems:
    """ImageNet-1K validation layout: root/<image>, labels by file stem (see read_image_labels)."""
    root_path = Path(root)
    files = sorted(p for p in root_path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
        if root_path.is_dir() else []
    if not files:
        raise ValueError(f"{root} holds no image files; expected a flat folder of images (ILSVRC2012 val)")
    unlabelled = [p.name for p in files if p.stem not in labels]
    if unlabelled:
        raise ValueError(f"{root}: {len(unlabelled)} images have no label in {labels_source}, e.g. "
                         f"{unlabelled[:3]}; pass the label file of this image set")
    classes = _resolve_classes(sorted({labels[p.stem] for p in files}), class_index, root)
    n = len(files)
    return ImageItems([str(p) for p in files], np.arange(n, dtype=np.int32), np.full(n, -1, np.int64),
                      np.zeros(n, np.int64), np.array([p.name for p in files]),
                      np.array([classes[labels[p.stem]] for p in files], np.int64), sorted(classes, key=classes.get))


def detect_layout(root: str) -> str:
    path = Path(root)
    if path.is_dir() and any(path.glob("*.tar")):
        return "tars"
    if path.is_dir() and not any(p.is_dir() for p in path.iterdir()) \
            and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        return "flat"
    return "folder"


def split_holdout(items: ImageItems, per_class: int, seed: int) -> tuple[ImageItems, ImageItems]:
    """(training items, held-out items), each in listing order: per class, `per_class` items drawn
    with `seed`, at most half of the class (rounded down)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(items), dtype=bool)
    order = np.argsort(items.labels, kind="stable")
    starts = np.searchsorted(items.labels[order], np.arange(len(items.synsets) + 1))
    for label in range(len(items.synsets)):
        members = order[starts[label]:starts[label + 1]]
        held[rng.permutation(members)[:min(per_class, len(members) // 2)]] = True
    return items.take(np.flatnonzero(~held)), items.take(np.flatnonzero(held))


# -- validating / re-encoding one image ---------------------------------------------------------------
def prepare_jpeg(data: bytes, max_side: int | None = None, quality: int = 90) -> tuple[bytes, bool]:
    """(JPEG bytes to store, re-encoded?) Raises ValueError when the bytes do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, size = img.format, img.mode, img.size
            too_big = max_side is not None and max(size) > max_side
            if fmt == "JPEG" and mode in ("RGB", "L") and not too_big:
                img.draft(mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                img.load()
                return data, False
            img.load()
            rgb = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for bad files
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    if too_big:
        scale = max_side / max(size)
        rgb = rgb.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), True


# -- writing -------------------------------------------------------------------------------------------
def _write_image_part(items: ImageItems, parts: list[np.ndarray], max_side: int | None, quality: int,
                      index: int, part_uri: str) -> PartResult:
    from streaming import MDSWriter

    part = items.take(parts[index])
    skipped, num_written, num_reencoded = [], 0, 0
    with MDSWriter(out=part_uri, columns=COLUMNS, size_limit=SHARD_SIZE_LIMIT, exist_ok=True) as writer:
        for i in range(len(part)):
            name = part.names[i].decode() if isinstance(part.names[i], bytes) else str(part.names[i])
            try:
                jpeg, reencoded = prepare_jpeg(part.read(i), max_side, quality)
            except (ValueError, OSError) as exc:
                skipped.append((f"{part.sources[part.source_idx[i]]}:{name}" if part.offsets[i] >= 0
                                else part.sources[part.source_idx[i]], str(exc)))
                log.warning("skipping %s: %s", skipped[-1][0], exc)
                count_progress()
                continue
            label = int(part.labels[i])
            writer.write({"jpeg": jpeg, "label": label, "synset": part.synsets[label], "name": name})
            num_written += 1
            num_reencoded += reencoded
            count_progress()
    return PartResult(index, num_written, skipped, {"num_reencoded": num_reencoded})


def convert_images(src: str, out_uri: str, *, layout: str = "auto", class_index: dict[str, int] | None = None,
                   labels_file: str | None = None, holdout_per_class: int = 0, holdout_uri: str | None = None,
                   images_per_part: int = 10_000, num_workers: int = 1, max_side: int | None = None,
                   quality: int = 90, seed: int = 0) -> ConversionSummary:
    """An image tree (see the module docstring for the layouts) -> MDS shards + class_index.json at
    out_uri; with holdout_per_class, that many images of each class go to holdout_uri instead
    (the returned summary's `holdout`)."""
    for name, value, lowest in (("images_per_part", images_per_part, 1), ("num_workers", num_workers, 1),
                                ("quality", quality, 1)):
        if value < lowest:   # before anything is listed or written
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= {lowest}, got {value}")
    layout = detect_layout(src) if layout == "auto" else layout
    if (labels_file is not None) != (layout == "flat"):
        raise ValueError(f"{src}: the flat layout (a folder of images, ILSVRC2012 val) needs a label file and "
                         f"only it takes one; layout is {layout!r}, label file {labels_file!r}")
    if bool(holdout_per_class) != bool(holdout_uri):
        raise ValueError("a hold-out split needs both holdout_per_class (> 0) and holdout_uri")
    if layout == "folder":
        items = list_image_folder(src, class_index)
    elif layout == "tars":
        items = list_synset_tars(src, class_index, num_workers)
    elif layout == "flat":
        items = list_flat_folder(src, read_image_labels(labels_file), class_index, labels_file)
    else:
        raise ValueError(f"layout must be auto, folder, tars or flat; got {layout!r}")
    if not len(items):
        raise ValueError(f"{src}: no image files found")
    write = functools.partial(write_image_items, images_per_part=images_per_part, num_workers=num_workers,
                              max_side=max_side, quality=quality, seed=seed, source=src)
    if not holdout_per_class:
        return write(items, out_uri)
    train_items, holdout_items = split_holdout(items, holdout_per_class, seed)
    split = {"holdout_per_class": holdout_per_class, "holdout_seed": seed}
    holdout = write(holdout_items, holdout_uri, split={**split, "split": "holdout"})
    summary = write(train_items, out_uri, split={**split, "split": "train"})
    summary.holdout = holdout
    return summary


def write_image_items(items: ImageItems, out_uri: str, *, images_per_part: int = 10_000, num_workers: int = 1,
                      max_side: int | None = None, quality: int = 90, seed: int = 0,
                      source: str = "", split: dict | None = None) -> ConversionSummary:
    order = np.random.default_rng(seed).permutation(len(items))
    parts = np.array_split(order, max(1, -(-len(items) // images_per_part)))
    class_index = json.dumps({synset: label for label, synset in enumerate(items.synsets)}, indent=0).encode()
    meta = {"kind": "image", "num_classes": len(items.synsets), "source": source, "format": "jpeg", **(split or {})}
    # The labels are in the shards: a re-run with another class index (or split) must not reuse their parts.
    options = {"num_items": len(items), "images_per_part": images_per_part, "seed": seed, "max_side": max_side,
               "quality": quality, "class_index_sha256": hashlib.sha256(class_index).hexdigest(), **(split or {})}
    return write_parts(out_uri, len(parts), functools.partial(_write_image_part, items, parts, max_side, quality),
                       num_workers=num_workers, total_inputs=len(items), desc="images", meta=meta,
                       options=options, side_files={CLASS_INDEX: class_index})


# -- reading -------------------------------------------------------------------------------------------
def _collate_images(samples):
    """(image, label, *extras) samples -> (images, labels, *extras) with each field stacked; JPEG byte
    tensors (1-D, decode on the device) differ in length and stay a list."""
    images, labels, *extras = zip(*samples)
    return (list(images) if images[0].dim() == 1 else torch.stack(images), torch.tensor(labels, dtype=torch.int64),
            *(torch.stack(field) for field in extras))


def build_image_loader(uri: str, *, train: bool, batch_size: int, image_size: int = 224, num_workers: int = 1,
                       seed: int = 42, crop_pct: float = 0.875, randaugment_ops: int = 2,
                       randaugment_magnitude: int = 9, hflip: float = 0.5, num_canonical_nodes: int | None = None,
                       shuffle: bool | None = None, cache_dir: str | None = None,
                       min_crop_scale: float = 0.08, decode_on_device: bool = False) -> ShardLoader:
    """Loader over image shards; see shards.ShardLoader and, for what it yields, device_pipeline.

    train: RandomResizedCrop(min_crop_scale..1) + flip in the workers, plus each sample's RandAugment
    draw (applied batched on the device); drop_last, shuffled by default.
    eval: resize to image_size / crop_pct + center crop, every batch kept, not shuffled by default.
    decode_on_device: workers only read the header and draw the sample's choices; they yield the
    JPEG bytes, which pnet_dist.data.device_pipeline decodes (nvJPEG on a GPU) and crops.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = dataset_info(uri)
    if info.get("kind") != "image":
        raise ValueError(f"{uri} holds a {info.get('kind')!r} dataset, not images")
    if "ffcv_beton" in info:
        raise ValueError(f"{uri} holds an ffcv dataset, not image shards: set data.format=ffcv to read it")
    if train:
        transform = TrainTransform(image_size, hflip, randaugment_ops, randaugment_magnitude, min_crop_scale)
        transform = EncodedTrainTransform(transform) if decode_on_device else transform
    else:
        transform = EncodedEvalTransform() if decode_on_device else EvalTransform(image_size, crop_pct)
    shuffle = train if shuffle is None else shuffle
    from pnet_dist.data.datasets import ImageShardDataset

    dataset = ImageShardDataset(
        transform=transform, aug_seed=seed,
        **streaming_kwargs(uri, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           num_canonical_nodes=num_canonical_nodes, cache_dir=cache_dir))
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=train,
                       collate_fn=_collate_images)


def read_class_index(uri: str) -> dict[str, int]:
    return json.loads(open_storage(uri).get_bytes(CLASS_INDEX))
