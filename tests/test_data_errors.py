"""Data errors name their cause: a missing, damaged or vanished shard and an epoch with no batch
end in one ValueError on the main thread, naming the dataset and the shard, as soon as they happen
(issue 11). Real mosaicml-streaming datasets written by the project's converter, read from a local
folder through a loader worker process, and from the S3 server on 127.0.0.1."""
from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.unit

SEQ_LEN = 32


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    """40 KJV chapters in 4 input files -> 4 parts, one shard each (~470 samples per shard)."""
    from pnet_dist.data.quickstart import kjv_chapters
    from pnet_dist.data.text import convert_text
    root = tmp_path_factory.mktemp("kjv4")
    chapters = kjv_chapters()[:40]
    inputs = []
    for i in range(4):
        path = root / f"kjv_{i}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for _, _, text in chapters[i * 10:(i + 1) * 10]))
        inputs.append(str(path))
    convert_text(inputs, str(root / "text"), seq_len=SEQ_LEN, vocab_size=512)
    return root / "text"


def copy_of(dataset, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(dataset, out)
    return out


def loader(uri, tmp_path, *, batch_size=8, num_workers=1, shuffle=False):
    from pnet_dist.data.text import build_text_loader
    return build_text_loader(str(uri), batch_size=batch_size, seq_len=SEQ_LEN, num_workers=num_workers,
                             shuffle=shuffle, cache_dir=str(tmp_path / "cache"))


def test_index_listing_a_missing_shard_fails_at_construction(four_shards, tmp_path):
    data = copy_of(four_shards, tmp_path)
    (data / "part_00002" / "shard.00000.mds").unlink()
    with pytest.raises(ValueError, match=rf"dataset {data}: shard part_00002/shard.00000.mds is listed in "
                                         rf"{data}/index.json but missing"):
        loader(data, tmp_path)


def test_same_size_damaged_shard_is_named_on_the_main_thread(four_shards, tmp_path):
    data = copy_of(four_shards, tmp_path)
    shard = data / "part_00000" / "shard.00000.mds"
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size: passes the listing, fails the read
    with pytest.raises(ValueError, match=rf"dataset {data}: shard part_00000/shard.00000.mds cannot be read"):
        for _ in loader(data, tmp_path):
            pass


def test_shard_that_disappears_mid_run_is_named(four_shards, tmp_path):
    data = copy_of(four_shards, tmp_path)
    batches = iter(loader(data, tmp_path))
    next(batches)  # reading part_00000 (shuffle off: the shards in order)
    (data / "part_00003" / "shard.00000.mds").unlink()
    with pytest.raises(ValueError, match=rf"dataset {data}: shard part_00003/shard.00000.mds (disappeared|cannot "
                                         r"be fetched or read)"):
        for _ in batches:
            pass


def test_epoch_without_a_batch_is_an_error_not_a_hang(four_shards, tmp_path):
    with pytest.raises(ValueError, match=rf"dataset {four_shards}: an epoch yields no batch: its \d+ samples over "
                                         r"1 rank\(s\) x 1 loader worker\(s\) give no rank a full batch of 4096"):
        next(iter(loader(four_shards, tmp_path, batch_size=4096)))


def test_training_data_without_a_batch_stops_the_loop():
    from pnet_dist.train import BatchStream
    with pytest.raises(ValueError, match="yields no batch in a whole epoch"):
        BatchStream([]).next(1)


def test_s3_shard_missing_or_vanished(four_shards, s3_bucket, tmp_path):
    from pnet_dist.storage import open_storage
    uri = f"{s3_bucket}/text"
    storage = open_storage(uri)
    for path in four_shards.rglob("*"):
        if path.is_file():
            storage.put_file(path, str(path.relative_to(four_shards)))
    batches = iter(loader(uri, tmp_path))
    next(batches)
    storage.delete("part_00003/shard.00000.mds")
    with pytest.raises(ValueError, match=rf"dataset {uri}: shard part_00003/shard.00000.mds cannot be fetched"):
        for _ in batches:
            pass
    with pytest.raises(ValueError, match=rf"dataset {uri}: shard part_00003/shard.00000.mds is listed in "
                                         rf"{uri}/index.json but missing"):
        loader(uri, tmp_path / "again")
