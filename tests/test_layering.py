"""Layering: the models package is pure torch -- importing and using it in a fresh interpreter
brings in none of the heavy frameworks (deepspeed, ray, boto3, streaming, tensorboard), nor timm
or transformers (the timm registration waits for the process to import timm)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("deepspeed", "ray", "boto3", "botocore", "streaming", "tensorboard", "timm", "transformers")

PROBE = f"""
import json, sys
import torch
import pnet_dist.models
from pnet_dist.models import create_model, list_models
from pnet_dist.models import counting, dynamic_conv, ghostnet, layers, report
model = create_model("parameternet_debug")
model(torch.randn(1, 3, 32, 32))
counting.count_model(create_model("parameternet_600m", device="meta"), torch.zeros(1, 3, 224, 224, device="meta"))
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"loaded": loaded, "models": list_models()}}))
"""


def test_models_package_imports_no_heavy_framework():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["loaded"] == [], f"pnet_dist.models pulled in {probe['loaded']}"
    assert "parameternet_600m" in probe["models"]
