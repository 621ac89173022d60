"""The training loop on one GPU (nccl, bf16 and fp16): skipped where no CUDA device exists."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config,precision", [("train_vision_debug.yaml", "bf16"), ("train_lm_debug.yaml", "bf16"),
                                              ("train_lm_debug.yaml", "fp16")])
def test_trains_and_resumes_on_one_gpu(tmp_path, config, precision):
    overrides = [f"checkpoint.uri={tmp_path}", f"deepspeed.precision={precision}", "scaling.use_gpu=true",
                 "checkpoint.every_steps=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "pnet_dist.train",
           str(REPO / "tests" / "configs" / config), *overrides]
    first = subprocess.run(cmd + ["train.max_steps=3"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    second = subprocess.run(cmd + ["train.max_steps=6"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == 3 and result["step"] == 6 and math.isfinite(result["loss"])
