"""Unit tests of pnet_dist.data: augmentation determinism, mixup/cutmix, converters, stale shm clean-up."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size=(40, 30), mode="RGB", fmt="JPEG") -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def _photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A crop of one of scikit-learn's two photos (real image statistics), resized to width x height."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photo = load_sample_images().images[seed % 2]
    out = io.BytesIO()
    Image.fromarray(photo).resize((width, height), Image.BICUBIC).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def test_import_is_light():
    code = "import sys, pnet_dist.data; print(any(m in sys.modules for m in ('streaming', 'boto3', 'ffcv')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_train_transform_is_a_function_of_seed_epoch_sample():
    from pnet_dist.data.augment import TrainTransform, sample_rng
    transform = TrainTransform(24, hflip=0.5, randaugment_ops=2, randaugment_magnitude=9)
    jpeg = _jpeg(0)
    a, ops_a = transform(jpeg, sample_rng(1, 0, 5))
    b, ops_b = transform(jpeg, sample_rng(1, 0, 5))
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8 and ops_a.shape == (2, 2)
    assert torch.equal(a, b) and torch.equal(ops_a, ops_b)
    others = [transform(jpeg, sample_rng(1, e, s)) for e, s in ((1, 5), (0, 6))]
    assert all(not (torch.equal(a, o) and torch.equal(ops_a, o_ops)) for o, o_ops in others)


def test_decode_is_dct_scaled_to_what_the_crop_needs():
    from pnet_dist.data.augment import TrainTransform, decode_jpeg_rgb, jpeg_size, random_resized_crop_box, sample_rng
    import torchvision.transforms.v2.functional as TF
    jpeg = _photo_jpeg(800, 600)
    assert jpeg_size(jpeg) == (600, 800)
    assert decode_jpeg_rgb(jpeg, min_height=140, min_width=180).shape == (3, 150, 200)   # 1/4
    assert decode_jpeg_rgb(jpeg, min_height=500).shape == (3, 600, 800)                  # 7/8 is not used
    transform = TrainTransform(64, randaugment_ops=0, min_crop_scale=0.5)
    full_decode = decode_jpeg_rgb(jpeg)
    diffs, references = [], []
    for sample in range(8):
        image, _ = transform(jpeg, sample_rng(0, 0, sample))
        rng = sample_rng(0, 0, sample)
        top, left, h, w = random_resized_crop_box(600, 800, rng, (0.5, 1.0))
        reference = TF.resized_crop(full_decode, top, left, h, w, [64, 64], antialias=True)
        if rng.random() < 0.5:
            reference = TF.horizontal_flip(reference)
        diffs.append((image.float() - reference.float()).abs().mean().item())
        references.append(reference)
    # The same crop of the same photo, once from a scaled decode (its box rounded to the scaled pixel
    # grid): a few levels apart; two different crops of the photo are tens of levels apart.
    others = [(a.float() - b.float()).abs().mean().item() for a, b in zip(references, references[1:])]
    assert max(diffs) < 8.0 < min(others), (diffs, others)


def test_eval_transform_and_normalize():
    from pnet_dist.data.augment import EvalTransform, normalize_batch
    (img,) = EvalTransform(16, crop_pct=0.875)(_jpeg(2, size=(50, 20)))
    assert img.shape == (3, 16, 16)
    x = normalize_batch(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_gray_jpeg_decodes_as_rgb():
    from pnet_dist.data.augment import decode_jpeg_rgb
    from pnet_dist.data.device_pipeline import decode_jpegs
    assert decode_jpeg_rgb(_jpeg(3, mode="L")).shape == (3, 30, 40)
    encoded = torch.frombuffer(bytearray(_jpeg(3, mode="L")), dtype=torch.uint8)
    assert decode_jpegs([encoded], torch.device("cpu"))[0].shape == (3, 30, 40)


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_soft_targets(mixup_alpha, cutmix_alpha):
    from pnet_dist.data.augment import mixup_cutmix
    images = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    outs = [mixup_cutmix(images, labels, 5, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=0.1,
                         generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    (mixed, targets), (mixed2, targets2) = outs
    assert torch.equal(mixed, mixed2) and torch.equal(targets, targets2)
    assert targets.shape == (6, 5)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert float(targets.min()) >= 0.1 / 5 - 1e-6
    if mixup_alpha == 0 and cutmix_alpha == 0:
        assert torch.equal(mixed, images)
        assert torch.allclose(targets[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    else:
        assert not torch.equal(mixed, images)


def test_mixup_cutmix_rejects_bad_labels():
    from pnet_dist.data.augment import mixup_cutmix
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        mixup_cutmix(torch.zeros(2, 3, 4, 4), torch.tensor([0, 3]), 3, mixup_alpha=0.8, cutmix_alpha=1.0,
                     label_smoothing=0.1, generator=torch.Generator())


def test_prepare_jpeg_keeps_reencodes_and_rejects():
    from pnet_dist.data.images import prepare_jpeg
    jpeg = _jpeg(4)
    assert prepare_jpeg(jpeg) == (jpeg, False)
    png, reencoded = prepare_jpeg(_jpeg(4, fmt="PNG"))
    assert reencoded and png[:2] == b"\xff\xd8"
    small, reencoded = prepare_jpeg(_jpeg(4, size=(64, 32)), max_side=16)
    from PIL import Image
    assert reencoded and Image.open(io.BytesIO(small)).size == (16, 8)
    with pytest.raises(ValueError, match="not a decodable image"):
        prepare_jpeg(jpeg[: len(jpeg) // 2])
    with pytest.raises(ValueError, match="not a decodable image"):
        prepare_jpeg(b"definitely not an image")


def test_image_folder_conversion_skips_corrupt_and_resumes(tmp_path):
    from pnet_dist.data.images import convert_images, read_class_index
    from pnet_dist.data.shards import dataset_info
    src = tmp_path / "src"
    for c in range(3):
        (src / f"n0000000{c}").mkdir(parents=True)
        for i in range(4):
            (src / f"n0000000{c}" / f"img_{i}.JPEG").write_bytes(_jpeg(c * 10 + i))
    bad = src / "n00000001" / "broken.JPEG"
    bad.write_bytes(_jpeg(99)[:300])
    out = tmp_path / "out"
    summary = convert_images(str(src), str(out), images_per_part=5)
    assert summary.num_samples == 12 and summary.num_parts == 3 and summary.num_parts_reused == 0
    assert [name for name, _ in summary.skipped] == [str(bad)]
    assert str(bad) in summary.report()
    assert read_class_index(str(out)) == {"n00000000": 0, "n00000001": 1, "n00000002": 2}
    assert dataset_info(str(out))["num_classes"] == 3
    index = json.loads((out / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 12
    # Interrupted run: part 1 lost its done marker -> only part 1 is rewritten.
    (out / "part_00001" / "done.json").unlink()
    before = (out / "part_00000" / "shard.00000.mds").stat().st_mtime_ns
    again = convert_images(str(src), str(out), images_per_part=5)
    assert again.num_parts_reused == 2 and again.num_samples == 12
    assert (out / "part_00000" / "shard.00000.mds").stat().st_mtime_ns == before
    assert [name for name, _ in again.skipped] == [str(bad)]
    with pytest.raises(ValueError, match="was written with options"):
        convert_images(str(src), str(out), images_per_part=5, max_side=16)
    # The labels live in the shards: another class index is another conversion, and the refused
    # re-run leaves the class index of the shards on disk.
    with pytest.raises(ValueError, match="was written with options"):
        convert_images(str(src), str(out), images_per_part=5,
                       class_index={"n00000000": 2, "n00000001": 1, "n00000002": 0})
    assert read_class_index(str(out)) == {"n00000000": 0, "n00000001": 1, "n00000002": 2}


def test_synset_tars_are_read(tmp_path):
    import tarfile
    from pnet_dist.data.images import list_synset_tars
    for c, count in (("n01", 2), ("n02", 3)):
        with tarfile.open(tmp_path / f"{c}.tar", "w") as tar:
            for i in range(count):
                data = _jpeg(i)
                info = tarfile.TarInfo(f"{c}_{i}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    items = list_synset_tars(str(tmp_path))
    assert len(items) == 5 and items.synsets == ["n01", "n02"]
    assert items.labels.tolist() == [0, 0, 1, 1, 1]
    assert items.read(3) == _jpeg(1) and items.names[3] == b"n02.tar/n02_1.JPEG"


def test_class_index_mismatch_is_a_clear_error(tmp_path):
    from pnet_dist.data.images import list_image_folder
    (tmp_path / "n9").mkdir()
    with pytest.raises(ValueError, match="not in the given class index"):
        list_image_folder(str(tmp_path), {"n1": 0})


def test_text_conversion_round_trips(tmp_path):
    from tokenizers import Tokenizer
    from pnet_dist.data.text import convert_text
    docs = [f"Document number {i} says: " + " ".join(["the quick brown fox"] * (i + 3)) for i in range(40)]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "text"
    summary = convert_text([str(src)], str(out), seq_len=16, vocab_size=300, field="body")
    info = json.loads((out / "dataset.json").read_text())
    assert info["dtype"] == "uint16" and info["seq_len"] == 16 and summary.num_samples == info["num_samples"]
    from streaming import LocalDataset
    samples = [LocalDataset(local=str(out))[i]["tokens"] for i in range(summary.num_samples)]
    assert all(s.dtype == np.uint16 and s.shape == (17,) for s in samples)
    assert all(a[-1] == b[0] for a, b in zip(samples, samples[1:]))     # one-token overlap
    stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = info["eos_id"]
    text = tokenizer.decode([int(t) for t in stream], skip_special_tokens=False)
    expected = "".join(d + "<|endoftext|>" for d in docs)
    assert len(text) > len(expected) // 2 and expected.startswith(text)      # only the tail is dropped
    assert int((stream == eos).sum()) == text.count("<|endoftext|>")
    assert summary.extra["num_tokens"] == summary.num_samples * 16


def test_text_input_errors_name_the_record(tmp_path):
    from pnet_dist.data.text import iter_documents
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no string field 'text'"):
        list(iter_documents(str(bad)))


def test_clean_stale_shared_memory_only_touches_dead_blocks_of_our_dirs_or_of_no_dir(tmp_path):
    from pnet_dist.data.shards import clean_stale_shared_memory
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    base = 900000 + int(uuid.uuid4().int % 90000)
    created = []

    def block(prefix: int, kind: str, payload: bytes = b"\0" * 8):
        shm = shared_memory.SharedMemory(f"{prefix:06}_{kind}", create=True, size=max(len(payload), 8))
        shm.buf[:len(payload)] = payload
        created.append(shm)
        return shm

    def locals_payload(dirs):
        text = ("\0".join(dirs) + "\0" + "0").encode()
        return (4 + len(text)).to_bytes(4, "little") + text

    try:
        dead_ours = block(base, "locals", locals_payload([ours]))
        block(base, "barrier")
        block(base + 1, "locals", locals_payload([theirs]))     # dead, but another run's directory
        live_ours = block(base + 2, "locals", locals_payload([ours]))   # mapped by this live process
        block(base + 3, "locals", (0).to_bytes(4, "little") + b"\0" * 4)  # released, never unlinked
        # Headless: a dead group that lost its _locals (streaming would hand out this prefix and
        # attach to the old blocks), and one still mapped by a live process.
        block(base + 4, "barrier")
        block(base + 4, "epoch_data", b"\0" * 64)
        live_headless = block(base + 5, "shard_states")
        for shm in created:
            if shm is not live_ours and shm is not live_headless:
                shm.close()                                     # unmapped: nobody alive holds it
        removed = clean_stale_shared_memory([ours])
        ours_removed = sorted(n for n in removed if base <= int(n[:6]) < base + 6)
        assert ours_removed == [f"{base:06}_barrier", f"{base:06}_locals", f"{base + 3:06}_locals",
                                f"{base + 4:06}_barrier", f"{base + 4:06}_epoch_data"]
        assert not os.path.exists(f"/dev/shm/{base:06}_locals")
        assert os.path.exists(f"/dev/shm/{base + 1:06}_locals") and os.path.exists(f"/dev/shm/{base + 2:06}_locals")
        assert os.path.exists(f"/dev/shm/{base + 5:06}_shard_states")
        del dead_ours
    finally:
        for shm in created:
            try:
                shm.close()
                shm.unlink()
            except FileNotFoundError:
                pass
