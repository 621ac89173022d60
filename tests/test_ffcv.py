"""The ffcv path (pnet_dist.data.ffcv_path): the resumable order, the dataset folder, and a job
trained through it on 2 gloo ranks.

Unit: the order deals the rest of an epoch to any number of ranks with no sample repeated or
lost; a real .beton written from image shards (local and S3) reads back every label, and a loader
stopped after two batches and restored from its state yields the rest of the epoch.
Dist: `data.format: ffcv` trains parameternet_debug on MNIST digits through a .beton on 2 ranks,
straight and SIGTERMed mid-epoch + resumed: the resumed run consumes exactly the samples the
straight run consumed, in the same order (ffcv's crops are not seeded, so losses may differ).

This file is also the rank program of the dist test (`main`).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _make_image_shards(root: Path, labels: list[int], images: list[np.ndarray], num_classes: int) -> str:
    """An ImageFolder of the given arrays -> image shards under root/shards (one folder per label)."""
    from PIL import Image

    from pnet_dist.data import convert_images
    for i, (label, image) in enumerate(zip(labels, images)):
        folder = root / "src" / f"{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((32, 32)).save(folder / f"{i:05d}.jpg")
    convert_images(str(root / "src"), str(root / "shards"), layout="folder",
                   class_index={f"{c:02d}": c for c in range(num_classes)})
    return str(root / "shards")


# -- unit --------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("overrides, error", [
    (["data.randaugment_ops=2"], "data.randaugment_ops: is 2, but ffcv has no RandAugment"),
    (["data.kind=text", "model.name=llama_debug", "data.randaugment_ops=0"], "data.format: ffcv reads image datasets"),
    (["data.train_uri=synthetic:", "data.randaugment_ops=0"], "data.format: synthetic: data is made"),
])
def test_ffcv_jobs_that_cannot_work_are_refused_at_config_time(overrides, error):
    from pnet_dist.config import load_config
    with pytest.raises(ValueError, match=error):
        load_config(REPO / "tests" / "configs" / "train_vision_debug.yaml",
                    ["data.format=ffcv", "data.train_uri=/data/ffcv", "data.eval_uri=null", *overrides])
    assert load_config(REPO / "tests" / "configs" / "train_vision_debug.yaml", [
        "data.format=ffcv", "data.train_uri=/data/ffcv", "data.randaugment_ops=0"]).data.format == "ffcv"


@pytest.mark.unit
def test_resumed_order_deals_the_rest_of_the_epoch_to_any_number_of_ranks():
    pytest.importorskip("ffcv")
    from pnet_dist.data.ffcv_path import ResumableOrder

    def orders(world_size, resume_at=None, drop_last=True):
        loader = SimpleNamespace(indices=np.arange(37, dtype="uint64"), seed=7, distributed=False, batch_size=4)
        ranks = [ResumableOrder(loader, shuffle=True, drop_last=drop_last, rank=r, world_size=world_size)
                 for r in range(world_size)]
        for order in ranks:
            order.resume_at = resume_at
        return [order.sample_order(epoch=3) for order in ranks]

    full = orders(1)[0]
    assert sorted(full.tolist()) == sorted(np.random.default_rng(7 + 3).permutation(37)[:36].tolist())
    # Two ranks for 2 steps (2 x 4 x 2 = 16 samples), then the rest of the epoch on 3 ranks.
    first = orders(2)
    assert len(first[0]) == len(first[1]) == 16                  # 37 // 2 // 4 full batches each
    consumed = np.concatenate([rank[:8] for rank in first])
    assert sorted(consumed.tolist()) == sorted(np.random.default_rng(10).permutation(37)[:16].tolist())
    rest = orders(3, resume_at=(3, 16), drop_last=False)
    assert sorted(np.concatenate([consumed, *rest]).tolist()) == list(range(37))   # nothing repeated or lost
    assert orders(3, resume_at=(2, 16))[0].tolist() == orders(3)[0].tolist()   # another epoch: untouched
    assert [len(o) for o in orders(3, resume_at=(3, 16))] == [4, 4, 4]          # 21 left, full batches only


@pytest.mark.unit
def test_beton_reads_back_and_a_restored_loader_finishes_the_epoch(tmp_path, caplog):
    pytest.importorskip("ffcv")
    from pnet_dist.data import build_image_loader
    from pnet_dist.data.ffcv_path import build_ffcv_image_loader, write_beton
    labels = list(range(16))                                     # one image per class: a label names its sample
    rng = np.random.default_rng(0)
    shards = _make_image_shards(tmp_path, labels, [rng.integers(0, 255, (40, 36, 3), np.uint8) for _ in labels], 16)
    assert write_beton(shards, str(tmp_path / "ffcv")) == 16
    meta = json.loads((tmp_path / "ffcv" / "dataset.json").read_text())
    assert meta["ffcv_beton"] == "dataset.beton" and meta["num_classes"] == 16 and meta["num_samples"] == 16
    assert (tmp_path / "ffcv" / "class_index.json").read_bytes() == (Path(shards) / "class_index.json").read_bytes()

    evaluation = build_ffcv_image_loader(str(tmp_path / "ffcv"), train=False, batch_size=5, image_size=16)
    batches = list(evaluation)
    assert len(evaluation) == len(batches) == 4 and batches[0][0].shape == (5, 3, 16, 16)
    assert str(batches[0][0].dtype) == "torch.float32" and str(batches[0][1].dtype) == "torch.int64"
    assert sorted(int(y) for _, labels_B in batches for y in labels_B) == labels

    def train_loader():
        return build_ffcv_image_loader(str(tmp_path / "ffcv"), train=True, batch_size=4, image_size=16, seed=3)
    straight = train_loader()
    epoch0 = [labels_B.tolist() for _, labels_B in straight]
    epoch1 = [labels_B.tolist() for _, labels_B in straight]
    assert len(epoch0) == 4 and epoch0 != epoch1                # every epoch its own permutation
    stopped = train_loader()
    head = [labels_B.tolist() for _, (_, labels_B) in zip(range(2), stopped)]
    state = stopped.state_dict()
    assert state == {"epoch": 0, "sample_in_epoch": 8, "seed": 3}
    resumed = train_loader()
    with caplog.at_level(logging.WARNING, logger="pnet_dist"):
        resumed.load_state_dict(state)
    assert "resuming epoch 0 after its first 8 samples" in caplog.text and "not bit-identical" in caplog.text
    assert head + [labels_B.tolist() for _, labels_B in resumed] == epoch0
    assert [labels_B.tolist() for _, labels_B in resumed] == epoch1
    assert resumed.state_dict() == {"epoch": 2, "sample_in_epoch": 0, "seed": 3}

    with pytest.raises(ValueError, match="holds image shards, not an ffcv dataset.*make_ffcv_beton"):
        build_ffcv_image_loader(shards, train=True, batch_size=4)
    with pytest.raises(ValueError, match="holds an ffcv dataset.*data.format=ffcv"):
        build_image_loader(str(tmp_path / "ffcv"), train=True, batch_size=4)
    with pytest.raises(ValueError, match="data.shuffle_seed is 3"):
        stopped.load_state_dict({**state, "seed": 4})


@pytest.mark.unit
def test_beton_in_s3_is_downloaded_once_and_read(tmp_path, s3_bucket):
    pytest.importorskip("ffcv")
    from pnet_dist.data.ffcv_path import build_ffcv_image_loader, write_beton
    rng = np.random.default_rng(1)
    shards = _make_image_shards(tmp_path, [0, 1, 2] * 2, [rng.integers(0, 255, (30, 30, 3), np.uint8) for _ in range(6)], 3)
    assert write_beton(shards, f"{s3_bucket}/ffcv") == 6
    cache = tmp_path / "cache"
    loader = build_ffcv_image_loader(f"{s3_bucket}/ffcv", train=False, batch_size=6, image_size=16,
                                     cache_dir=str(cache))
    (beton,) = cache.rglob("dataset.beton")
    assert sorted(next(iter(loader))[1].tolist()) == [0, 0, 1, 1, 2, 2]
    mtime = beton.stat().st_mtime_ns
    build_ffcv_image_loader(f"{s3_bucket}/ffcv", train=False, batch_size=6, image_size=16, cache_dir=str(cache))
    assert beton.stat().st_mtime_ns == mtime                     # the complete local copy is reused


# -- dist: a job through ffcv ------------------------------------------------------------------
STOP_AT_STEP = 3          # 96 digits / (8 x 2 ranks) = 6 steps an epoch: a stop mid-epoch


def run_recording(overrides: list[str], on_item=None) -> dict:
    """train_worker with the labels of every batch this rank consumed recorded in the result."""
    from test_train_dist import CONFIGS, Intercept

    from pnet_dist.config import load_config
    from pnet_dist.tasks import build_task
    from pnet_dist.train import train_worker

    cfg = load_config(CONFIGS / "train_vision_debug.yaml", overrides)
    task, seen = build_task(cfg), []
    build = task.build_loaders

    def record(index, batch):
        seen.append(batch[1].tolist())
        return on_item(index, batch) if on_item else batch

    def build_recording():
        train_loader, eval_loader = build()
        return Intercept(train_loader, record), eval_loader
    task.build_loaders = build_recording
    result = train_worker(cfg, task)
    return {**result, "labels": seen[:result["step"] - (result["resumed_from"] or 0)]}


def scenario_ffcv(workdir: Path) -> dict:
    from test_train_dist import sigterm_on_rank1

    import torch.distributed as dist
    data = f"data.train_uri={workdir}/ffcv/train", f"data.eval_uri={workdir}/ffcv/val"
    common = [*data, "data.format=ffcv", "data.randaugment_ops=0", "data.batch_size=8", "data.num_workers=1",
              "train.max_steps=8", "checkpoint.every_steps=100", f"checkpoint.uri={workdir}/runs"]
    results = {"straight": run_recording(common + ["run_name=straight"]),
               "stopped": run_recording(common + ["run_name=resume"], sigterm_on_rank1(STOP_AT_STEP - 1)),
               "resumed": run_recording(common + ["run_name=resume"])}
    results["rank"] = dist.get_rank()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return {"ranks": gathered}


def main() -> None:
    import torch.distributed as dist
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    results = globals()[f"scenario_{scenario}"](workdir)
    if dist.get_rank() == 0:
        (workdir / f"{scenario}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ffcv_runs(tmp_path_factory):
    pytest.importorskip("ffcv")
    from test_train_dist import launch

    from pnet_dist.data.ffcv_path import write_beton
    from pnet_dist.data.quickstart import mnist_digits
    workdir = tmp_path_factory.mktemp("ffcv_train")
    images, labels = mnist_digits()
    picked = np.random.default_rng(0).permutation(len(labels))    # the digits are stored sorted by label
    for split, index in (("train", picked[:96]), ("val", picked[96:128])):
        shards = _make_image_shards(workdir / split, [int(labels[i]) for i in index],
                                    [np.stack([images[i]] * 3, axis=-1) for i in index], 10)
        write_beton(shards, str(workdir / "ffcv" / split))
    proc = launch("ffcv", workdir, timeout_s=480, program=Path(__file__))
    assert proc.returncode == 0, f"ffcv runs failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return json.loads((workdir / "ffcv.json").read_text())["ranks"], proc.stdout + proc.stderr


@pytest.mark.dist
def test_a_job_trains_through_ffcv_and_resumes_the_epoch_where_it_stopped(ffcv_runs):
    ranks, console = ffcv_runs
    for rank in ranks:
        straight, stopped, resumed = rank["straight"], rank["stopped"], rank["resumed"]
        assert straight["step"] == 8 and all(math.isfinite(v) for v in straight["losses"].values())
        assert stopped["preempted"] and stopped["step"] == STOP_AT_STEP and resumed["resumed_from"] == STOP_AT_STEP
        # The same samples in the same order, across the stop and across the epoch boundary (step 6).
        assert len(straight["labels"]) == 8 and all(len(labels) == 8 for labels in straight["labels"])
        assert stopped["labels"] + resumed["labels"] == straight["labels"]
        assert resumed["eval"]["model"]["samples"] == 32 and 0 <= resumed["eval"]["model"]["top1"] <= 100
    assert ranks[0]["straight"]["labels"] != ranks[1]["straight"]["labels"]     # each rank its own share
    assert console.count("ffcv loader: resuming epoch 0 after its first 48 samples") == 1   # rank 0 says it once
    # A quiet console: none of the per-rank library lines that pnet_dist.engine filters at the source.
    for line in ("Setting accelerator to CPU", "No CUDA runtime is found", "built successfully", "FutureWarning"):
        assert line not in console


if __name__ == "__main__":
    main()
