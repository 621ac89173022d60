"""Shared test fixtures: tiers, a real S3-compatible HTTP server on 127.0.0.1, process env.

The S3 server is moto in server mode (a real HTTP endpoint that boto3, mosaicml-streaming,
pyarrow and TensorBoard all talk to through AWS_ENDPOINT_URL_S3). It is bound to 127.0.0.1 only.
"""
from __future__ import annotations

import atexit
import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before anything imports deepspeed/ray/boto3, so every test process (and its children)
# shares one JIT cache, never touches a real AWS account, and keeps Ray on loopback.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pnet_dist.dist import free_port  # noqa: E402,F401 -- after the settings above; tests import it from here


def pytest_collection_modifyitems(config, items):
    import torch
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def restore_env(saved: dict[str, str | None]) -> None:
    """Put environment variables back as `saved` ({name: value or None for unset}) had them."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group for in-process DeepSpeed engines.

    Created once and kept for the rest of the session: DeepSpeed caches the groups it derives
    from the default group, so a destroyed and re-created one would break later engines.
    """
    import torch.distributed as dist
    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # DeepSpeed's launcher check
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    yield
    restore_env(saved)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL and exports it to the environment."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "S3_ENDPOINT", "S3_USE_HTTPS", "S3_VERIFY_SSL")}
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint       # boto3 (and anything using the AWS chain)
    os.environ["S3_ENDPOINT_URL"] = endpoint           # mosaicml-streaming
    os.environ["S3_ENDPOINT"] = f"{host}:{port}"       # TensorBoard's S3 filesystem
    os.environ["S3_USE_HTTPS"] = "0"
    os.environ["S3_VERIFY_SSL"] = "0"
    try:
        yield endpoint
    finally:
        server.stop()
        restore_env(saved)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields 's3://<bucket>'."""
    import boto3
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def kjv_text_dataset(tmp_path_factory):
    """40 KJV chapters tokenized by the project's converter: byte-level BPE of 512 tokens (the
    debug LLaMA vocabulary), EOS id 0, seq_len 32; yields the dataset folder."""
    import json
    from pnet_dist.data.quickstart import kjv_chapters
    from pnet_dist.data.text import convert_text
    root = tmp_path_factory.mktemp("kjv")
    with open(root / "kjv.jsonl", "w") as f:
        for _, _, text in kjv_chapters()[:40]:
            f.write(json.dumps({"text": text}) + "\n")
    convert_text([str(root / "kjv.jsonl")], str(root / "text"), seq_len=32, vocab_size=512)
    return str(root / "text")
