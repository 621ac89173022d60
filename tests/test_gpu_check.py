"""tools/gpu_check.sh --dry-run runs every section to its end on the CPU, so the GPU checks cannot
rot between the times a GPU machine is lent (e2e tier: it starts a local Ray cluster, ~1-2 min)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SECTIONS = 5


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PNET_LOG_LEVEL": "WARNING"}
    run = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    out = run.stdout
    assert run.returncode == 0, (out + run.stderr)[-6000:]
    for number in range(1, SECTIONS + 1):
        assert f"== section {number} ok" in out, out[-6000:]
    assert "sections failed: none" in out
    # each section produced its own result, not only an exit status of 0
    assert "MoE-8 (up) / dense tokens/s" in out                        # bench_moe --gpu --dry-run
    assert "ratio parameternet / ghostnet" in out and "channels_last=True" in out   # bench_dynamic_conv
    assert "pnet_dist result:" in out and '"step": 3' in out           # the quickstart trained 3 steps
