"""Shards in a real S3-compatible server on 127.0.0.1, streamed back on 2 ranks, stopped and resumed.

Ranks are processes forked from one forkserver that imported torch + streaming once (importing
streaming costs ~5 s), each with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE and a gloo group.
Every image has its own label, so labels identify samples: resumes are checked for no sample
repeated or lost, and (same world size) for bit-identical batches.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 96
BATCH = 4
SEED = 7


def _rank_main(rank: int, world: int, port: int, env: dict, plan: dict, out_path: str) -> None:
    """One rank: build the train loader, maybe load a state, record (labels, image hash) per batch."""
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist
    from pnet_dist.data import build_image_loader
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loader = build_image_loader(plan["uri"], train=True, batch_size=BATCH, image_size=16, seed=SEED,
                                num_workers=plan.get("num_workers", 1), cache_dir=plan["cache_dir"])
    if plan.get("state"):
        loader.load_state_dict(plan["state"])
    record, saved = [], None
    for i, (images, labels, randaugment_ops) in enumerate(loader):
        digest = hashlib.sha1(images.numpy().tobytes() + randaugment_ops.numpy().tobytes()).hexdigest()
        record.append([labels.tolist(), digest])
        if i + 1 == plan.get("save_after"):
            saved = loader.state_dict()
        if plan.get("signal_after") and i + 1 == plan["signal_after"]:
            Path(out_path + ".started").write_text("1")
            time.sleep(600)                                   # wait to be killed
    result = {"record": record, "saved": saved, "end_state": loader.state_dict(), "len": len(loader)}
    Path(out_path).write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    atexit._run_exitfuncs()                                   # multiprocessing children skip atexit


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "streaming", "pnet_dist.data.images", "pnet_dist.data.datasets"])
    return ctx


def _launch(ctx, world: int, plan: dict, tmp: Path, tag: str, timeout: float = 120) -> list[dict]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "S3_"))}
    outs = [str(tmp / f"{tag}_rank{r}.json") for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, env, plan, outs[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"{tag}: rank exit codes {codes}"
    return [json.loads(Path(o).read_text()) for o in outs]


def _labels(record) -> list[int]:
    return [label for labels, _ in record for label in labels]


@pytest.fixture(scope="module")
def s3_images(s3_server, tmp_path_factory):
    """96 single-image classes + one corrupt JPEG, converted straight into a fresh bucket."""
    import boto3
    from PIL import Image
    from pnet_dist.data.images import convert_images
    bucket = f"data-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = src / f"n{i:08d}"
        folder.mkdir()
        pixels = rng.integers(0, 255, (20 + i % 7, 24 + i % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"n{i:08d}_1.JPEG", quality=90)
    corrupt = src / "n00000005" / "n00000005_2.JPEG"
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    corrupt.write_bytes(buf.getvalue()[:200])
    uri = f"s3://{bucket}/imagenet/train"
    summary = convert_images(str(src), uri, images_per_part=40)
    return uri, summary, str(corrupt)


def test_conversion_to_s3_reports_the_corrupt_image(s3_images):
    from pnet_dist.data import dataset_info
    from pnet_dist.data.images import read_class_index
    from pnet_dist.storage import open_storage
    uri, summary, corrupt = s3_images
    assert summary.num_samples == NUM_IMAGES and summary.num_parts == 3
    assert [name for name, _ in summary.skipped] == [corrupt]
    assert "1 inputs skipped" in summary.report() and corrupt in summary.report()
    assert dataset_info(uri)["num_samples"] == NUM_IMAGES
    assert len(read_class_index(uri)) == NUM_IMAGES
    keys = open_storage(uri).list()
    assert "index.json" in keys and "part_00002/done.json" in keys


def test_two_ranks_stop_and_resume_on_same_and_other_world_size(s3_images, forkserver, tmp_path):
    uri = s3_images[0]
    cache = str(tmp_path / "cache")
    plan = {"uri": uri, "cache_dir": cache}
    # A: two ranks, a whole epoch, state saved after 5 batches.
    full = _launch(forkserver, 2, {**plan, "save_after": 5}, tmp_path, "full")
    per_rank = [_labels(r["record"]) for r in full]
    assert [len(r["record"]) for r in full] == [NUM_IMAGES // (2 * BATCH)] * 2 == [r["len"] for r in full]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(NUM_IMAGES))          # disjoint, complete
    assert full[0]["saved"] == full[1]["saved"] and full[0]["saved"]["sample_in_epoch"] == 5 * 2 * BATCH
    assert full[0]["end_state"]["epoch"] == 1 and full[0]["end_state"]["sample_in_epoch"] == 0
    state = full[0]["saved"]
    seen = {label for r in full for label in _labels(r["record"][:5])}

    # B: same world size -> exactly the batches that came after batch 5.
    same = _launch(forkserver, 2, {**plan, "state": state}, tmp_path, "same")
    for rank in range(2):
        assert same[rank]["record"] == full[rank]["record"][5:]

    # C: one rank continues the epoch: everything not yet seen, once. State saved after 4 batches.
    one = _launch(forkserver, 1, {**plan, "state": state, "save_after": 4, "num_workers": 2}, tmp_path, "one")[0]
    rest = _labels(one["record"])
    assert sorted(rest) == sorted(set(range(NUM_IMAGES)) - seen)
    # D: back to two ranks from C's state: the rest of C's epoch, once, no sample lost.
    two = _launch(forkserver, 2, {**plan, "state": one["saved"]}, tmp_path, "two")
    after = _labels(two[0]["record"]) + _labels(two[1]["record"])
    assert sorted(after) == sorted(rest[4 * BATCH:])


def test_killed_run_leaves_shared_memory_that_the_restart_cleans(s3_images, forkserver, tmp_path):
    uri = s3_images[0]
    cache = str(tmp_path / "cache")
    local_dir = None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "S3_"))}
    out = str(tmp_path / "killed.json")
    proc = forkserver.Process(target=_rank_main, args=(0, 1, port, env, {"uri": uri, "cache_dir": cache,
                                                                          "num_workers": 0, "signal_after": 2}, out))
    proc.start()
    deadline = time.monotonic() + 60
    while not Path(out + ".started").exists():
        assert time.monotonic() < deadline and proc.is_alive(), "the run to be killed never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    from pnet_dist.data.shards import _unpack_locals, stream_dirs
    local_dir = stream_dirs(uri, cache)[1]
    stale = [n for n in os.listdir("/dev/shm") if n.endswith("_locals")
             and local_dir in _unpack_locals(Path("/dev/shm", n).read_bytes())]
    assert stale, "the killed run should have left its shared memory behind"
    # Without clean-up streaming refuses the directory ("Reused local directory"); ours removes it.
    again = _launch(forkserver, 1, {"uri": uri, "cache_dir": cache}, tmp_path, "restart")[0]
    assert len(again["record"]) == NUM_IMAGES // BATCH
    assert not [n for n in stale if os.path.exists(f"/dev/shm/{n}") and
                local_dir in _unpack_locals(Path("/dev/shm", n).read_bytes())]


def test_truncated_shard_in_s3_is_a_clear_error(s3_images, tmp_path):
    from pnet_dist.data import build_image_loader
    from pnet_dist.storage import open_storage
    uri = s3_images[0]
    storage = open_storage(uri)
    bad_uri = uri.replace("/train", "/train_truncated")
    bad = open_storage(bad_uri)
    for key in storage.list():
        bad.put_bytes(storage.get_bytes(key), key)
    shard = "part_00001/shard.00000.mds"
    data = bad.get_bytes(shard)
    bad.put_bytes(data[: len(data) // 2], shard)
    with pytest.raises(ValueError, match=rf"dataset {bad_uri}: shard part_00001/shard.00000.mds is \d+ bytes but its "
                                         r"index says \d+: the shard is truncated"):  # the listing at construction
        build_image_loader(bad_uri, train=False, batch_size=BATCH, image_size=16, num_workers=0,
                           cache_dir=str(tmp_path / "cache"))


def test_text_tool_to_s3_and_token_loader_resume(s3_server, tmp_path):
    import boto3
    import torch
    from pnet_dist.data import build_text_loader, dataset_info
    bucket = f"text-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    corpus = tmp_path / "corpus.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = np.random.default_rng(1)
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n" for _ in range(60)))
    uri = f"s3://{bucket}/text/train"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_text_shards.py"), str(corpus), "--out", uri,
                           "--seq-len", "32", "--train-vocab-size", "300"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 inputs skipped" in proc.stdout
    info = dataset_info(uri)
    assert info["kind"] == "text" and info["dtype"] == "uint16" and info["num_samples"] >= 16

    def run(state=None, stop=None):
        loader = build_text_loader(uri, batch_size=2, seq_len=32, num_workers=0, seed=3,
                                   cache_dir=str(tmp_path / "cache"))
        if state:
            loader.load_state_dict(state)
        batches, saved = [], None
        for i, (input_ids, labels) in enumerate(loader):
            assert input_ids.shape == labels.shape == (2, 32) and input_ids.dtype == torch.int64
            assert torch.equal(input_ids[:, 1:], labels[:, :-1])
            batches.append(torch.cat([input_ids, labels[:, -1:]], 1))
            if i + 1 == stop:
                saved = loader.state_dict()
        return batches, saved

    reference, state = run(stop=3)
    resumed, _ = run(state=state)
    assert len(resumed) == len(reference) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference[3:]))
    with pytest.raises(ValueError, match="written with seq_len 32"):
        build_text_loader(uri, batch_size=2, seq_len=64, num_workers=0)


def test_eval_set_reads_global_batches_by_index_with_and_without_workers(s3_images, tmp_path):
    """pnet_dist.train.evaluate hands global batch b to rank b % world_size: a batch must be the
    same samples whoever reads it, in any order, through loader workers or not."""
    import torch
    from pnet_dist.data import build_eval_set
    uri = s3_images[0]
    read = {}
    for num_workers in (0, 2):
        eval_set = build_eval_set(uri, batch_size=5, image_size=16, num_workers=num_workers,
                                  cache_dir=str(tmp_path / f"cache{num_workers}"))
        assert eval_set.num_samples == NUM_IMAGES
        read[num_workers] = list(eval_set.batches([2, 0, 1], 12))   # out of order; 12 samples: the last is short
        if num_workers == 0:
            expected = [eval_set.dataset[i][1] for i in range(12)]  # sample i, by index
        del eval_set
    assert [len(labels) for _, labels in read[0]] == [2, 5, 5]
    for (images_a, labels_a), (images_b, labels_b) in zip(read[0], read[2]):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    labels = torch.cat([read[0][1][1], read[0][2][1], read[0][0][1]]).tolist()  # batches 0, 1, 2
    assert labels == expected and len(set(labels)) == 12  # every image is its own class
