"""A quiet, quick console: every tool answers --help before loading a heavy library, the shell
tools answer it before installing anything, and the streaming loader asks nothing of the log.
(The per-rank DeepSpeed and torch lines are checked on a real 2-rank run in test_ffcv.py.)"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "numpy", "deepspeed", "ray", "streaming", "ffcv", "boto3", "tensorboard", "PIL"}


@pytest.mark.parametrize("tool", sorted(p.name for p in (REPO / "tools").glob("*.py"))
                         + ["-m pnet_dist.launch", "-m pnet_dist.train"])   # the launchers, and a job YAML's shebang
def test_python_tool_answers_help_before_any_heavy_import(tool):
    program = tool.split() if tool.startswith("-m ") else [str(REPO / "tools" / tool)]
    run = subprocess.run([sys.executable, "-X", "importtime", *program, "--help"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & HEAVY, f"{tool} --help imports {sorted(imported & HEAVY)}"


@pytest.mark.parametrize("tool", ["gpu_check.sh", "quickstart.sh", "run_tests.sh"])
def test_shell_tool_answers_help_without_installing(tmp_path, tool):
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / tool, tmp_path / "tools" / tool)
    run = subprocess.run(["bash", str(tmp_path / "tools" / tool), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 0 and f"tools/{tool}" in run.stdout and "set -euo" not in run.stdout, run.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["tools", f"tools/{tool}"]   # no .venv


def test_streaming_loader_sets_what_streaming_would_log_about(tmp_path, caplog):
    from PIL import Image

    from pnet_dist.data import build_image_loader, convert_images
    from pnet_dist.data.shards import shuffle_block_size
    for i in range(8):
        (tmp_path / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(tmp_path / "src" / f"c{i % 2}" / f"{i}.jpg")
    convert_images(str(tmp_path / "src"), str(tmp_path / "shards"))
    with caplog.at_level(logging.DEBUG, logger="streaming"):
        loader = build_image_loader(str(tmp_path / "shards"), train=True, batch_size=2, image_size=8,
                                    num_workers=0, randaugment_ops=0, num_canonical_nodes=2)
        for _ in range(2):                                      # streaming logged it every epoch
            assert sum(len(batch[1]) for batch in loader) == 8
        state = loader.state_dict()
    assert not [r.getMessage() for r in caplog.records if "was not specified" in r.getMessage()]
    # streaming's own defaults (2 canonical nodes), so the sample order is the one it would pick
    assert loader.dataset.shuffle_block_size == max(4_000_000 // 2, 1 << 18) == shuffle_block_size(2)
    assert loader.dataset.predownload == 8 * 2
    loader.load_state_dict({**state, "num_canonical_nodes": 8})
    assert loader.dataset.shuffle_block_size == shuffle_block_size(8) == 500_000
