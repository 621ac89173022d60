"""The image converter's ImageNet layouts: the seeded per-class hold-out split (ImageNet-22K's
evaluation set, through tools/make_image_shards.py as the README runs it) and ImageNet-1K's flat
validation folder with each kind of label file."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _synset_tars(root: Path, counts: dict[str, int]) -> None:
    """The ImageNet-22K release layout: root/<synset>.tar holding <synset>_<i>.JPEG."""
    root.mkdir(parents=True)
    for k, (synset, count) in enumerate(counts.items()):
        with tarfile.open(root / f"{synset}.tar", "w") as tar:
            for i in range(count):
                data = _jpeg(100 * k + i)
                info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _names(uri: Path) -> dict[str, int]:
    from streaming import LocalDataset
    dataset = LocalDataset(local=str(uri))
    return {dataset[i]["name"]: dataset[i]["label"] for i in range(len(dataset))}


def test_holdout_split_through_the_tool_is_per_class_seeded_and_disjoint(tmp_path):
    counts = {"n01": 7, "n02": 7, "n03": 3, "n04": 1}
    _synset_tars(tmp_path / "src", counts)

    def convert(out: str, per_class: int, seed: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "tools" / "make_image_shards.py"), str(tmp_path / "src"),
                               str(tmp_path / out / "train"), "--holdout-per-class", str(per_class),
                               "--holdout-out", str(tmp_path / out / "holdout"), "--seed", str(seed)],
                              capture_output=True, text=True, cwd=tmp_path)
    run = convert("a", 2, seed=0)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "held out: 5 samples" in run.stdout
    train, holdout = _names(tmp_path / "a" / "train"), _names(tmp_path / "a" / "holdout")
    assert not set(train) & set(holdout) and len(train) + len(holdout) == 18
    per_class = {synset: sum(name.startswith(synset) for name in holdout) for synset in counts}
    assert per_class == {"n01": 2, "n02": 2, "n03": 1, "n04": 0}       # never more than half a class
    assert all(label == int(name[1:3]) - 1 for name, label in {**train, **holdout}.items())
    class_index = (tmp_path / "a" / "train" / "class_index.json").read_text()
    assert (tmp_path / "a" / "holdout" / "class_index.json").read_text() == class_index
    meta = json.loads((tmp_path / "a" / "holdout" / "dataset.json").read_text())
    assert meta["split"] == "holdout" and meta["holdout_per_class"] == 2 and meta["num_classes"] == 4

    # The seed decides the split, and the tool's output is that split.
    from pnet_dist.data.images import list_synset_tars, split_holdout
    items = list_synset_tars(str(tmp_path / "src"))
    held = {seed: {name.decode() for name in split_holdout(items, 2, seed)[1].names} for seed in (0, 1, 2)}
    assert held[0] == set(holdout) and held[1] != held[0] and held[2] != held[0]
    again = convert("a", 3, seed=0)                                        # another split over the same output
    assert again.returncode != 0 and "this run asks for" in again.stderr and "holdout_per_class" in again.stderr


def test_in22k_job_evaluates_on_what_the_readme_command_writes():
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"python tools/make_image_shards.py\s+\S+\s+(\S+)[^\n]*?--holdout-per-class\s+(\d+)"
                            r"\s+--holdout-out\s+(\S+)", readme.replace("\\\n", " "))
    train_out, per_class, holdout_out = command
    job = yaml.safe_load((REPO / "jobs" / "in22k_pretrain.yaml").read_text())
    assert (job["data"]["train_uri"], job["data"]["eval_uri"]) == (train_out, holdout_out)
    assert f"{per_class} images per class" in (REPO / "jobs" / "in22k_pretrain.yaml").read_text()


def _devkit(path: Path, wnids: list[str], ground_truth: list[int]) -> None:
    """An archive laid out as ILSVRC2012_devkit_t12.tar.gz: data/meta.mat (a struct array
    `synsets` with ILSVRC2012_ID and WNID among its fields) and the validation ground truth."""
    from scipy.io import savemat
    synsets = np.zeros(len(wnids), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                          ("num_children", "O")])
    for i, wnid in enumerate(wnids):
        synsets[i] = (i + 1, wnid, f"class {wnid}", 0)
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                            "".join(f"{n}\n" for n in ground_truth).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("label_format", ["devkit", "kaggle_csv", "lines"])
def test_flat_validation_folder_takes_its_labels_from_the_label_file(tmp_path, label_format):
    from pnet_dist.data.images import convert_images
    val = tmp_path / "val"
    val.mkdir()
    truth = ["n03", "n01", "n03", "n02", "n01"]                 # synset of ILSVRC2012_val_0000000{1..5}
    for i in range(1, 6):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg(i))
    if label_format == "devkit":
        labels = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
        # The devkit numbers synsets its own way (here n03=1, n01=2, n02=3), not as the train index.
        _devkit(labels, ["n03", "n01", "n02"], [{"n03": 1, "n01": 2, "n02": 3}[s] for s in truth])
    elif label_format == "kaggle_csv":
        labels = tmp_path / "LOC_val_solution.csv"
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"ILSVRC2012_val_{i:08d},{s} 10 20 100 200 {s} 1 2 3 4\n" for i, s in reversed(list(enumerate(truth, 1)))))
    else:
        labels = tmp_path / "val_labels.txt"
        labels.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {s}\n" for i, s in enumerate(truth, 1)))
    train_index = {"n01": 0, "n02": 1, "n03": 2, "n04": 3}
    summary = convert_images(str(val), str(tmp_path / "shards"), labels_file=str(labels), class_index=train_index)
    assert summary.num_samples == 5
    names = _names(tmp_path / "shards")
    assert names == {f"ILSVRC2012_val_{i:08d}.JPEG": train_index[s] for i, s in enumerate(truth, 1)}
    assert json.loads((tmp_path / "shards" / "dataset.json").read_text())["num_classes"] == 4

    (val / "extra.JPEG").write_bytes(_jpeg(9))
    with pytest.raises(ValueError, match=r"1 images have no label in .*\['extra.JPEG'\]"):
        convert_images(str(val), str(tmp_path / "other"), labels_file=str(labels), class_index=train_index)
    with pytest.raises(ValueError, match="flat layout .* needs a label file"):
        convert_images(str(val), str(tmp_path / "other"))
