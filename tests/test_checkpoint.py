"""CheckpointManager on one rank with a real DeepSpeed engine (gloo): markers, manifests and
checksums, keep-last-k, the local S3 server, retried transient S3 failures, failed uploads."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading

import pytest
import torch
from torch import nn

from pnet_dist.checkpoint import CheckpointManager, client_state_name, step_dir_name
from pnet_dist.storage import RetryPolicy

pytestmark = pytest.mark.unit


@pytest.fixture
def pnet_logs(caplog):
    """pnet_dist's logger does not propagate to the root logger caplog listens on."""
    logger = logging.getLogger("pnet_dist")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def build_engine(stage: int = 1):
    import deepspeed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def train(engine, first_step: int, num_steps: int) -> list[float]:
    losses = []
    for step in range(first_step, first_step + num_steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def snapshot(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()  # a loaded ZeRO-1/2 links them at its next step
    out = {}
    for name, param in engine.module.named_parameters():
        out[name] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).clone()
    out["lr"] = torch.tensor(engine.lr_scheduler.get_last_lr())
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def fast_retry(manager: CheckpointManager, attempts: int = 5) -> None:
    manager.storage.retry = RetryPolicy(max_attempts=attempts, base_delay_s=0.01, max_delay_s=0.05, timeout_s=30)


@pytest.mark.parametrize("async_upload", [True, False])
def test_save_then_load_restores_weights_optimizer_scheduler_and_client_state(process_group, tmp_path, async_upload):
    engine = build_engine()
    manager = CheckpointManager(str(tmp_path / "run"), keep_last=3, async_upload=async_upload)
    train(engine, 0, 3)
    saved = snapshot(engine)
    rng = torch.get_rng_state()
    manager.save(engine, 3, {"step": 3, "loader": {"pos": 12}, "rng": rng})
    manager.wait()
    reference_losses = train(engine, 3, 2)

    engine = build_engine()
    assert manager.latest_complete() == 3
    client_state = manager.load(engine, 3)
    assert_same(snapshot(engine), saved)
    assert engine.global_steps == 3
    assert client_state["loader"] == {"pos": 12} and client_state["step"] == 3
    assert torch.equal(client_state["rng"], rng)
    assert train(engine, 3, 2) == reference_losses

    step_dir = tmp_path / "run" / "ckpt" / step_dir_name(3)
    manifest = json.loads((step_dir / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 1 and manifest["zero_stage"] == 1 and manifest["format"] == "deepspeed"
    assert client_state_name(0) in manifest["files"]
    for rel, meta in manifest["files"].items():
        assert (step_dir / rel).stat().st_size == meta["size"]
    assert not any((tmp_path / "run" / ".staging").rglob("*.pt")), "staging folder was not emptied"


def test_async_save_holds_the_state_of_its_step_while_training_goes_on(process_group, tmp_path):
    engine = build_engine(stage=2)
    manager = CheckpointManager(str(tmp_path), keep_last=1, async_upload=True)
    train(engine, 0, 2)
    saved = snapshot(engine)
    release = threading.Event()
    run_job = manager._run_in_background
    manager._run_in_background = lambda job: (release.wait(), run_job(job))  # hold the background write
    manager.save(engine, 2, {"step": 2})
    assert manager.uploading() and not (tmp_path / "ckpt").exists()
    train(engine, 2, 3)  # changes every live tensor DeepSpeed handed to the checkpoint engine
    release.set()
    manager.wait()
    manager.load(engine, 2)  # into the engine that went on (as a reload after non-finite losses does)
    assert_same(snapshot(engine), saved)


def test_checkpoint_without_marker_is_skipped_with_a_warning(process_group, tmp_path, pnet_logs):
    engine = build_engine()
    manager = CheckpointManager(str(tmp_path), keep_last=5, async_upload=True)
    for step in (1, 2):
        train(engine, step, 1)
        manager.save(engine, step, {"step": step})
    manager.wait()
    (tmp_path / "ckpt" / step_dir_name(2) / "COMPLETE").unlink()
    assert manager.latest_complete() == 1
    assert any(step_dir_name(2) in r.getMessage() and "COMPLETE" in r.getMessage()
               for r in pnet_logs.records if r.levelno == logging.WARNING)
    with pytest.raises(ValueError, match=step_dir_name(2)):
        manager.load(engine, 2)


def test_truncated_or_corrupted_shard_is_skipped_and_never_loaded(process_group, tmp_path, pnet_logs):
    engine = build_engine()
    manager = CheckpointManager(str(tmp_path), keep_last=5, async_upload=False)
    for step in (1, 2, 3):
        train(engine, step, 1)
        manager.save(engine, step, {"step": step})
    # step 3: a shard cut short; step 2: same size, flipped bytes (only a checksum sees it)
    shard3 = tmp_path / "ckpt" / step_dir_name(3) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard3.write_bytes(shard3.read_bytes()[:-100])
    shard2 = tmp_path / "ckpt" / step_dir_name(2) / "mp_rank_00_model_states.pt"
    data = bytearray(shard2.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])
    shard2.write_bytes(bytes(data))

    assert manager.latest_complete() == 2
    warnings = [r.getMessage() for r in pnet_logs.records if r.levelno == logging.WARNING]
    assert any(step_dir_name(3) in m and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in m and "bytes" in m
               for m in warnings)
    assert manager.latest_complete(verify="sha256") == 1
    assert any(step_dir_name(2) in m and "sha256" in m for m in
               [r.getMessage() for r in pnet_logs.records if r.levelno == logging.WARNING])
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt does not match its sha256"):
        manager.load(build_engine(), 2)


def test_keep_last_k_and_stale_partial_saves_removed(process_group, tmp_path):
    engine = build_engine()
    manager = CheckpointManager(str(tmp_path), keep_last=2, async_upload=True)
    # what a crash mid-save leaves: a step folder without marker, older and at a step we save again
    for stale in (1, 4):
        folder = tmp_path / "ckpt" / step_dir_name(stale)
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    for step in (2, 3, 4, 5):
        train(engine, step, 1)
        manager.save(engine, step, {"step": step})
    manager.wait()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [step_dir_name(4), step_dir_name(5)]
    manifest = json.loads((tmp_path / "ckpt" / step_dir_name(4) / "MANIFEST.json").read_text())
    assert manifest["files"]["mp_rank_00_model_states.pt"]["size"] > len(b"half-written")
    assert manager.latest_complete() == 5


def test_saving_a_step_that_is_already_complete_keeps_it(process_group, tmp_path):
    engine = build_engine()
    manager = CheckpointManager(str(tmp_path), keep_last=2, async_upload=False)
    train(engine, 0, 1)
    manager.save(engine, 1, {"step": 1})
    before = (tmp_path / "ckpt" / step_dir_name(1) / "MANIFEST.json").read_bytes()
    train(engine, 1, 1)
    manager.save(engine, 1, {"step": 1})
    assert (tmp_path / "ckpt" / step_dir_name(1) / "MANIFEST.json").read_bytes() == before


def test_s3_save_and_load_back(process_group, s3_bucket):
    engine = build_engine(stage=2)
    manager = CheckpointManager(f"{s3_bucket}/runs/r1", keep_last=2, async_upload=True,
                                model_name="mlp", model_kwargs={"width": 16})
    train(engine, 0, 2)
    saved = snapshot(engine)
    manager.save(engine, 2, {"step": 2})
    train(engine, 2, 1)
    manager.save(engine, 3, {"step": 3})
    manager.wait()
    keys = manager.storage.list("ckpt/")
    assert f"ckpt/{step_dir_name(2)}/COMPLETE" in keys and f"ckpt/{step_dir_name(3)}/COMPLETE" in keys
    manifest = json.loads(manager.storage.get_bytes(f"ckpt/{step_dir_name(2)}/MANIFEST.json"))
    assert manifest["model"] == {"name": "mlp", "kwargs": {"width": 16}}

    fresh = CheckpointManager(f"{s3_bucket}/runs/r1", keep_last=2, async_upload=True)
    engine = build_engine(stage=2)
    assert fresh.latest_complete() == 3
    assert fresh.load(engine, 2) == {"step": 2}
    assert_same(snapshot(engine), saved)


class FlakyS3Client:
    """The real boto3 client, except that the first `failures` writes raise a connection error."""

    def __init__(self, client, failures: int):
        self._client, self.failures_left, self.failed = client, failures, 0

    def _maybe_fail(self):
        if self.failures_left > 0:
            from botocore.exceptions import EndpointConnectionError
            self.failures_left -= 1
            self.failed += 1
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1 (injected failure)")

    def upload_file(self, *args, **kwargs):
        self._maybe_fail()
        return self._client.upload_file(*args, **kwargs)

    def put_object(self, *args, **kwargs):
        self._maybe_fail()
        return self._client.put_object(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_transient_s3_failures_are_retried(process_group, s3_bucket, pnet_logs):
    engine = build_engine()
    manager = CheckpointManager(f"{s3_bucket}/flaky", keep_last=2, async_upload=True)
    fast_retry(manager)
    flaky = FlakyS3Client(manager.storage.client, failures=3)
    manager.storage._client = flaky
    train(engine, 0, 1)
    manager.save(engine, 1, {"step": 1})
    manager.wait()
    assert flaky.failed == 3 and flaky.failures_left == 0
    assert manager.latest_complete(verify="sha256") == 1
    assert sum("injected failure" in r.getMessage() for r in pnet_logs.records) == 3


def test_failed_upload_surfaces_in_wait_and_leaves_no_marker(process_group, s3_bucket):
    engine = build_engine()
    manager = CheckpointManager(f"{s3_bucket}/down", keep_last=2, async_upload=True)
    fast_retry(manager, attempts=2)
    manager.storage._client = FlakyS3Client(manager.storage.client, failures=10**6)
    train(engine, 0, 1)
    manager.save(engine, 1, {"step": 1})
    with pytest.raises(RuntimeError, match="checkpoint upload failed"):
        manager.wait()
    manager.wait()  # the error is reported once
    manager.storage._client = None
    assert manager.latest_complete() is None
    assert not manager.storage.exists(f"ckpt/{step_dir_name(1)}/COMPLETE")


def test_loading_into_another_zero_stage_is_a_value_error(process_group, tmp_path):
    engine = build_engine(stage=1)
    manager = CheckpointManager(str(tmp_path), keep_last=1, async_upload=False)
    train(engine, 0, 1)
    manager.save(engine, 1, {"step": 1})
    with pytest.raises(ValueError, match="saved with ZeRO stage 1, the job runs stage 2"):
        manager.load(build_engine(stage=2), 1)


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(str(tmp_path), keep_last=0)
    with pytest.raises(ValueError, match="upload_timeout_s"):
        CheckpointManager(str(tmp_path), upload_timeout_s=0)
    with pytest.raises(ValueError, match="verify"):
        CheckpointManager(str(tmp_path)).latest_complete(verify="md5")


def test_staging_left_by_a_dead_process_is_removed(tmp_path):
    dead = tmp_path / ".staging" / f"{socket.gethostname()}-{2**22 + 12345}-abcd1234"
    (dead / "save").mkdir(parents=True)
    alive = tmp_path / ".staging" / f"{socket.gethostname()}-{os.getpid()}-abcd1234"
    alive.mkdir()
    CheckpointManager(str(tmp_path))
    assert not dead.exists() and alive.exists()
