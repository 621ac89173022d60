"""Checkpoints on one rank with real DeepSpeed engines (gloo): the commit protocol
(pnet_dist.checkpoint) under the engine side (pnet_dist.engine_checkpoint) -- manifests and
checksums, keep-last-k, the local S3 server, retried transient failures, every kind of damaged
checkpoint on a local folder and on S3 (table-driven), fencing, and saves that never wait for
storage."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from pnet_dist.checkpoint import CheckpointStore, Fenced, step_dir_name
from pnet_dist.engine_checkpoint import EngineCheckpointer, client_state_name
from pnet_dist.storage import RetryPolicy, open_storage

pytestmark = pytest.mark.unit


@pytest.fixture
def pnet_logs(caplog):
    """pnet_dist's logger does not propagate to the root logger caplog listens on."""
    logger = logging.getLogger("pnet_dist")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


class Box:
    """A Stateful holding one picklable value."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        self.value = state


def build_engine(stage: int = 1):
    import deepspeed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def build_moe_engine():
    import deepspeed
    from pnet_dist import moe_deepspeed
    from pnet_dist.models import create_model
    torch.manual_seed(0)
    model = create_model("pnet_llama_debug_up_e4")
    groups = moe_deepspeed.moe_param_groups([{"params": list(model.parameters()), "name": "all"}])
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=3e-3), config=config)
    return engine


def train(engine, first_step: int, num_steps: int) -> list[float]:
    losses = []
    for step in range(first_step, first_step + num_steps):
        generator = torch.Generator().manual_seed(step)
        if isinstance(engine.module, nn.Sequential):
            loss = engine(torch.randn(4, 8, generator=generator)).pow(2).mean()
        else:
            ids = torch.randint(0, 512, (2, 9), generator=generator)
            logits, aux = engine(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights, Adam moments, buffers and the lr of an engine."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()  # a loaded ZeRO-1/2 links them at its next step
    out = {}
    for name, param in engine.module.named_parameters():
        out[name] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).clone()
    out.update({f"buffer/{name}": b.clone() for name, b in engine.module.named_buffers()})
    if engine.lr_scheduler is not None:
        out["lr"] = torch.tensor(engine.lr_scheduler.get_last_lr())
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def checkpointer(engine, root: str, *, model_name: str = "mlp", **store_args) -> EngineCheckpointer:
    return EngineCheckpointer(engine, CheckpointStore(root, **store_args), model_name=model_name)


def fast_retry(ckpt: EngineCheckpointer, attempts: int = 5) -> None:
    ckpt.store.storage.retry = RetryPolicy(max_attempts=attempts, base_delay_s=0.01, max_delay_s=0.05, timeout_s=30)


def warnings_of(logs) -> list[str]:
    return [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("async_upload", [True, False])
def test_save_then_restore_brings_back_engine_buffers_and_every_stateful(process_group, tmp_path, async_upload):
    engine = build_engine()
    ckpt = checkpointer(engine, str(tmp_path / "run"), async_upload=async_upload)
    assert ckpt.start({"loader": Box(), "rng": Box()}) is None and ckpt.store.generation == 1
    train(engine, 0, 3)
    saved = snapshot(engine)
    rng = torch.get_rng_state()
    assert ckpt.save(3, {"loader": Box({"pos": 12}), "rng": Box(rng)}, wait_for_previous=False)
    ckpt.wait()
    reference_losses = train(engine, 3, 2)

    engine = build_engine()
    ckpt = checkpointer(engine, str(tmp_path / "run"))
    loader, rng_box = Box(), Box()
    assert ckpt.start({"loader": loader, "rng": rng_box}) == 3 and ckpt.store.generation == 2
    assert_same(snapshot(engine), saved)
    assert any(name.endswith("num_batches_tracked") and b.item() == 3 for name, b in engine.module.named_buffers())
    assert engine.global_steps == 3 and loader.value == {"pos": 12} and torch.equal(rng_box.value, rng)
    assert train(engine, 3, 2) == reference_losses

    step_dir = tmp_path / "run" / "ckpt" / step_dir_name(3)
    manifest = json.loads((step_dir / "MANIFEST.json").read_text())
    assert (manifest["world_size"], manifest["zero_stage"], manifest["format"], manifest["generation"]) == \
        (1, 1, "deepspeed", 1)
    assert manifest["model"] == {"name": "mlp", "kwargs": {}} and client_state_name(0) in manifest["files"]
    for rel, meta in manifest["files"].items():
        assert hashlib.sha256((step_dir / rel).read_bytes()).hexdigest() == meta["sha256"]
    assert not any((tmp_path / "run" / ".staging").rglob("*.pt")), "staging folder was not emptied"


def test_async_save_hashes_its_files_as_it_writes_them(process_group, tmp_path, monkeypatch):
    """The background write takes each file's sha256 from the bytes torch.save produces: the
    publish reads no file back for its checksum, and the manifest's digests are the files'."""
    from pnet_dist import storage as storage_module
    engine = build_engine(stage=2)
    ckpt = checkpointer(engine, str(tmp_path / "run"), async_upload=True)
    ckpt.start({})
    train(engine, 0, 1)

    def read_back(path):
        raise AssertionError(f"{path} was read back for its checksum")
    monkeypatch.setattr(storage_module, "sha256_file", read_back)
    assert ckpt.save(1, {"loader": Box({"pos": 4})}, wait_for_previous=True)
    ckpt.wait()
    step_dir = tmp_path / "run" / "ckpt" / step_dir_name(1)
    files = json.loads((step_dir / "MANIFEST.json").read_text())["files"]
    assert client_state_name(0) in files and any("optim_states" in rel for rel in files)
    for rel, meta in files.items():
        assert hashlib.sha256((step_dir / rel).read_bytes()).hexdigest() == meta["sha256"], rel


def test_async_save_holds_the_state_of_its_step_while_training_goes_on(process_group, tmp_path):
    engine = build_engine(stage=2)
    ckpt = checkpointer(engine, str(tmp_path), keep_last=1)
    ckpt.start({})
    train(engine, 0, 2)
    saved = snapshot(engine)
    release = threading.Event()
    run_job = ckpt.store._run_in_background
    ckpt.store._run_in_background = lambda job: (release.wait(), run_job(job))  # hold the background thread
    ckpt.save(2, {}, wait_for_previous=False)
    assert ckpt.store.busy() and not (tmp_path / "ckpt").exists()
    train(engine, 2, 3)  # changes every live tensor DeepSpeed handed to the checkpoint engine
    # While it uploads, a periodic checkpoint is skipped (training never waits for storage) ...
    assert not ckpt.save(5, {}, wait_for_previous=False)
    release.set()
    ckpt.wait()
    assert ckpt.reload({}) == 2  # into the engine that went on (as a reload after non-finite losses does)
    assert_same(snapshot(engine), saved)
    # ... and the final one waits for it.
    release.clear()
    ckpt.save(6, {}, wait_for_previous=False)
    threading.Timer(0.5, release.set).start()
    assert ckpt.save(7, {}, wait_for_previous=True)
    ckpt.wait()
    assert ckpt.store.latest_complete() == 7


def test_keep_last_k_and_stale_partial_saves_removed(process_group, tmp_path):
    engine = build_engine()
    ckpt = checkpointer(engine, str(tmp_path), keep_last=2)
    ckpt.start({})
    # what a crash mid-save leaves: a step folder without marker, older and at a step we save again
    for stale in (1, 4):
        folder = tmp_path / "ckpt" / step_dir_name(stale)
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
        (folder / "leftover_of_another_world_size.pt").write_bytes(b"x")
    for step in (2, 3, 4, 5):
        train(engine, step, 1)
        ckpt.save(step, {}, wait_for_previous=True)
    ckpt.wait()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [step_dir_name(4), step_dir_name(5)]
    assert not (tmp_path / "ckpt" / step_dir_name(4) / "leftover_of_another_world_size.pt").exists()
    manifest = json.loads((tmp_path / "ckpt" / step_dir_name(4) / "MANIFEST.json").read_text())
    assert manifest["files"]["mp_rank_00_model_states.pt"]["size"] > len(b"half-written")
    assert ckpt.store.latest_complete() == 5


def test_saving_a_step_that_is_already_complete_keeps_it(process_group, tmp_path):
    engine = build_engine()
    ckpt = checkpointer(engine, str(tmp_path), async_upload=False)
    ckpt.start({})
    train(engine, 0, 1)
    ckpt.save(1, {}, wait_for_previous=True)
    before = (tmp_path / "ckpt" / step_dir_name(1) / "MANIFEST.json").read_bytes()
    train(engine, 1, 1)
    ckpt.save(1, {}, wait_for_previous=True)
    assert (tmp_path / "ckpt" / step_dir_name(1) / "MANIFEST.json").read_bytes() == before


def test_s3_save_and_restore(process_group, s3_bucket):
    engine = build_engine(stage=2)
    root = f"{s3_bucket}/runs/r1"
    ckpt = EngineCheckpointer(engine, CheckpointStore(root, keep_last=2), model_name="mlp", model_kwargs={"width": 16})
    ckpt.start({"extra": Box()})
    train(engine, 0, 2)
    saved = snapshot(engine)
    ckpt.save(2, {"extra": Box(2)}, wait_for_previous=True)
    ckpt.wait()
    keys = ckpt.store.storage.list("ckpt/")
    assert f"ckpt/{step_dir_name(2)}/COMPLETE" in keys and "fence/generation_00000001.json" in ckpt.store.storage.list()
    manifest = json.loads(ckpt.store.storage.get_bytes(f"ckpt/{step_dir_name(2)}/MANIFEST.json"))
    assert manifest["model"] == {"name": "mlp", "kwargs": {"width": 16}}

    engine = build_engine(stage=2)
    extra = Box()
    assert checkpointer(engine, root).start({"extra": extra}) == 2 and extra.value == 2
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

    def upload_fileobj(self, *args, **kwargs):
        self._maybe_fail()
        return self._client.upload_fileobj(*args, **kwargs)

    def put_object(self, *args, **kwargs):
        self._maybe_fail()
        return self._client.put_object(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_transient_s3_failures_are_retried(process_group, s3_bucket, pnet_logs):
    engine = build_engine()
    ckpt = checkpointer(engine, f"{s3_bucket}/flaky")
    ckpt.start({})
    fast_retry(ckpt)
    flaky = FlakyS3Client(ckpt.store.storage.client, failures=3)
    ckpt.store.storage._client = flaky
    train(engine, 0, 1)
    ckpt.save(1, {}, wait_for_previous=True)
    ckpt.wait()
    assert flaky.failed == 3 and flaky.failures_left == 0
    assert ckpt.store.latest_complete(verify="sha256") == 1
    assert sum("injected failure" in r.getMessage() for r in pnet_logs.records) == 3


def test_failed_upload_surfaces_at_the_next_save_and_leaves_no_marker(process_group, s3_bucket):
    engine = build_engine()
    ckpt = checkpointer(engine, f"{s3_bucket}/down")
    ckpt.start({})
    fast_retry(ckpt, attempts=2)
    ckpt.store.storage._client = FlakyS3Client(ckpt.store.storage.client, failures=10**6)
    train(engine, 0, 1)
    ckpt.save(1, {}, wait_for_previous=False)
    while ckpt.store.busy():
        train(engine, 1, 1)
    with pytest.raises(RuntimeError, match="checkpoint upload failed"):
        ckpt.save(2, {}, wait_for_previous=False)
    ckpt.wait()  # the error is reported once
    ckpt.store.storage._client = None
    assert ckpt.store.latest_complete() is None
    assert not ckpt.store.storage.exists(f"ckpt/{step_dir_name(1)}/COMPLETE")


def test_another_zero_stage_or_model_is_a_value_error_and_writes_nothing(process_group, tmp_path):
    engine = build_engine(stage=1)
    ckpt = checkpointer(engine, str(tmp_path), async_upload=False)
    ckpt.start({})
    train(engine, 0, 1)
    ckpt.save(1, {}, wait_for_previous=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="saved by model 'mlp', but this job trains model.name='other'"):
        checkpointer(build_engine(stage=1), str(tmp_path), model_name="other").start({})
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # not even a fence claim
    with pytest.raises(ValueError, match="saved with ZeRO stage 1, the job runs stage 2"):
        checkpointer(build_engine(stage=2), str(tmp_path)).start({})


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointStore(str(tmp_path), keep_last=0)
    with pytest.raises(ValueError, match="upload_timeout_s"):
        CheckpointStore(str(tmp_path), upload_timeout_s=0)
    with pytest.raises(ValueError, match="verify"):
        CheckpointStore(str(tmp_path)).latest_complete(verify="md5")


def test_the_commit_protocol_knows_no_engine():
    """pnet_dist.checkpoint imports neither torch nor DeepSpeed; the format side imports DeepSpeed
    only where an engine already exists."""
    code = ("import sys, pnet_dist.checkpoint; first = sorted(m for m in ('torch', 'deepspeed') if m in sys.modules); "
            "import pnet_dist.engine_checkpoint; print(first, 'deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"


def test_staging_left_by_a_dead_process_is_removed(tmp_path):
    dead = tmp_path / ".staging" / f"{socket.gethostname()}-{2**22 + 12345}-abcd1234"
    (dead / "save").mkdir(parents=True)
    alive = tmp_path / ".staging" / f"{socket.gethostname()}-{os.getpid()}-abcd1234"
    alive.mkdir()
    CheckpointStore(str(tmp_path))
    assert not dead.exists() and alive.exists()


def test_a_newer_generation_fences_out_the_older_writer(process_group, tmp_path, pnet_logs):
    engine = build_engine()
    old = checkpointer(engine, str(tmp_path), async_upload=False)
    old.start({})
    train(engine, 0, 1)
    old.save(1, {}, wait_for_previous=True)
    new = checkpointer(build_engine(), str(tmp_path))
    assert new.start({}) == 1 and new.store.generation == 2
    before = sorted(str(p) for p in (tmp_path / "ckpt").rglob("*"))
    train(engine, 1, 1)
    with pytest.raises(Fenced, match="claimed by writer generation 2 by host .* pid"):
        old.save(2, {}, wait_for_previous=True)
    assert sorted(str(p) for p in (tmp_path / "ckpt").rglob("*")) == before
    with pytest.raises(Fenced):  # every later write too, without asking storage again
        old.store.mark_damaged(1, "test")
    claims = sorted(p.name for p in (tmp_path / "fence").iterdir())
    assert claims == ["generation_00000001.json", "generation_00000002.json"]


def test_an_older_writer_that_finds_its_step_saved_by_the_newer_generation_stops_too(process_group, tmp_path):
    """The orphan that lags behind the new run never writes (each of its steps is complete already);
    it must still stop, not train on unseen."""
    engine = build_engine()
    old = checkpointer(engine, str(tmp_path), async_upload=False)
    old.start({})
    new_engine = build_engine()
    new = checkpointer(new_engine, str(tmp_path), async_upload=False)
    assert new.start({}) is None and new.store.generation == 2
    train(new_engine, 0, 1)
    new.save(1, {}, wait_for_previous=True)
    train(engine, 0, 1)
    with pytest.raises(Fenced, match="claimed by writer generation 2"):
        old.save(1, {}, wait_for_previous=True)


@pytest.mark.parametrize("mode", ["refuse", "stall"])
def test_a_storage_outage_neither_blocks_training_nor_loses_the_checkpoint(process_group, s3_server, s3_bucket,
                                                                            mode, pnet_logs):
    """S3 goes away (connections reset, or black-holed) right as a checkpoint starts uploading:
    the loop keeps stepping, periodic saves are skipped, and the checkpoint completes after."""
    import boto3
    from botocore.config import Config
    from pnet_dist.faults import OutageProxy
    proxy = OutageProxy(int(s3_server.rsplit(":", 1)[1]))
    outage_over = threading.Timer(120, proxy.set_mode, args=("pass",))  # ends the outage should the loop block
    try:
        engine = build_engine()
        ckpt = checkpointer(engine, f"{s3_bucket}/outage")
        ckpt.store.storage._client = boto3.client("s3", endpoint_url=proxy.endpoint, config=Config(
            connect_timeout=2, read_timeout=2, retries={"max_attempts": 2, "mode": "standard"}))
        ckpt.store.storage.retry = RetryPolicy(max_attempts=10_000, base_delay_s=0.1, max_delay_s=1.0, timeout_s=300)
        ckpt.start({})
        train(engine, 0, 1)
        ckpt.save(1, {}, wait_for_previous=True)
        ckpt.wait()
        proxy.set_mode(mode)
        outage_over.start()
        assert ckpt.save(2, {}, wait_for_previous=False)
        skipped = 0
        for step in range(2, 32):  # 30 steps with the checkpoint prefix unreachable
            train(engine, step, 1)
            if step % 5 == 0:
                skipped += not ckpt.save(step, {}, wait_for_previous=False)
        assert proxy.mode == mode and ckpt.store.busy(), "the checkpoint must still be waiting for storage"
        assert skipped == 6 and any("checkpoint step 30 skipped" in m for m in warnings_of(pnet_logs))
        proxy.set_mode("pass")
        ckpt.wait()
        assert ckpt.store.latest_complete(verify="sha256") == 2
    finally:
        outage_over.cancel()
        proxy.close()


# -- damaged checkpoints: one table, a local folder and S3 ----------------------------------
def _rewrite_manifest(storage, prefix: str, data: bytes) -> None:
    storage.put_bytes(data, f"{prefix}/MANIFEST.json")
    storage.put_bytes(hashlib.sha256(data).hexdigest().encode(), f"{prefix}/COMPLETE")


def _flip_last_bytes(storage, key: str) -> None:
    data = bytearray(storage.get_bytes(key))
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])
    storage.put_bytes(bytes(data), key)


def _killed_upload(storage, prefix: str) -> None:
    """What a rank killed in the middle of its upload leaves: part of a file, no receipt, no marker."""
    for rel in ("COMPLETE", "MANIFEST.json", "rank_00000.done"):
        storage.delete(f"{prefix}/{rel}")
    key = f"{prefix}/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    storage.put_bytes(storage.get_bytes(key)[:1000], key)


def _drop_expert(storage, prefix: str) -> None:
    """An MoE checkpoint whose manifest is consistent but lacks one expert's file."""
    manifest = json.loads(storage.get_bytes(f"{prefix}/MANIFEST.json"))
    del manifest["files"]["expert_001.pt"]
    storage.delete(f"{prefix}/expert_001.pt")
    _rewrite_manifest(storage, prefix, json.dumps(manifest).encode())


P = "ckpt/step_00000002"
DAMAGE = {  # kind: (model, damage(storage), words the reason must contain)
    "no marker": ("mlp", lambda s: s.delete(f"{P}/COMPLETE"), "no COMPLETE marker"),
    "truncated shard": ("mlp", lambda s: s.put_bytes(s.get_bytes(f"{P}/mp_rank_00_model_states.pt")[:-100],
                                                     f"{P}/mp_rank_00_model_states.pt"), "truncated"),
    "same-size corrupted shard": ("mlp", lambda s: _flip_last_bytes(s, f"{P}/mp_rank_00_model_states.pt"),
                                  "does not match its sha256"),
    "missing listed file": ("mlp", lambda s: s.delete(f"{P}/{client_state_name(0)}"), "is missing"),
    "invalid manifest": ("mlp", lambda s: _rewrite_manifest(s, P, b'{"files": {'), "not valid JSON"),
    "manifest without its fields": ("mlp", lambda s: _rewrite_manifest(
        s, P, json.dumps({"step": 2, "world_size": 1, "format": "deepspeed"}).encode()), "lacks its 'files' field"),
    "killed upload": ("mlp", lambda s: _killed_upload(s, P), "no COMPLETE marker"),
    "missing expert file": ("moe", lambda s: _drop_expert(s, P), "expert_001.pt"),
}


@pytest.fixture(scope="module")
def saved_runs(process_group, tmp_path_factory):
    """Per model: a run folder with complete checkpoints at steps 1 and 2, and the engine state of
    step 1; each case damages a copy of it."""
    runs = {}
    for model, build in (("mlp", build_engine), ("moe", build_moe_engine)):
        root = tmp_path_factory.mktemp(f"pristine_{model}")
        engine = build()
        ckpt = checkpointer(engine, str(root), model_name=model, async_upload=False)
        ckpt.start({"extra": Box()})
        train(engine, 0, 1)
        ckpt.save(1, {"extra": Box(1)}, wait_for_previous=True)
        at_step1 = snapshot(engine)
        train(engine, 1, 1)
        ckpt.save(2, {"extra": Box(2)}, wait_for_previous=True)
        runs[model] = (root, engine, at_step1)
    return runs


@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_reported_once_marked_and_the_run_resumes_from_the_older_one(
        saved_runs, kind, backend, tmp_path, request, pnet_logs):
    model, damage, reason_words = DAMAGE[kind]
    pristine, engine, at_step1 = saved_runs[model]
    root = str(tmp_path / "run") if backend == "local" else f"{request.getfixturevalue('s3_bucket')}/run"
    storage = open_storage(root)
    for path in sorted(p for p in pristine.rglob("*") if p.is_file() and ".staging" not in p.parts):
        storage.put_file(path, path.relative_to(pristine).as_posix())
    damage(storage)

    extra = Box()
    ckpt = checkpointer(engine, root, model_name=model)
    assert ckpt.start({"extra": extra}) == 1 and extra.value == 1
    assert_same(snapshot(engine), at_step1)
    reason = json.loads(storage.get_bytes(f"{P}/DAMAGED"))["reason"]
    assert reason_words in reason, reason
    reports = [m for m in warnings_of(pnet_logs) if step_dir_name(2) in m and "Marked DAMAGED" in m]
    assert len(reports) == 1 and reason in reports[0]
    print(f"DAMAGE-TABLE | {kind} | {backend} | resumed from step 1; step 2 marked DAMAGED: {reason}")

    # The next restart neither loads it nor reports it again; the damaged files are all still there.
    pnet_logs.clear()
    again = checkpointer(engine, root, model_name=model)
    assert again.start({"extra": Box()}) == 1 and again.store.latest_complete() == 1
    assert not [m for m in warnings_of(pnet_logs) if step_dir_name(2) in m]
    assert storage.exists(f"{P}/DAMAGED") and len(storage.list(P)) > 2


def test_a_later_save_of_a_damaged_step_replaces_it_and_pruning_keeps_damaged_ones(saved_runs, tmp_path, pnet_logs):
    pristine, engine, _ = saved_runs["mlp"]
    shutil.copytree(pristine, tmp_path / "run", ignore=shutil.ignore_patterns(".staging"))
    _flip_last_bytes(open_storage(str(tmp_path / "run")), f"{P}/mp_rank_00_model_states.pt")
    ckpt = checkpointer(engine, str(tmp_path / "run"), model_name="mlp", keep_last=1, async_upload=False)
    assert ckpt.start({}) == 1
    ckpt.save(2, {}, wait_for_previous=True)
    assert any("replacing damaged checkpoint" in m and step_dir_name(2) in m for m in warnings_of(pnet_logs))
    assert not (tmp_path / "run" / P / "DAMAGED").exists() and ckpt.store.latest_complete(verify="sha256") == 2
    assert not (tmp_path / "run" / "ckpt" / step_dir_name(1)).exists()  # pruned: keep_last=1

    (tmp_path / "run" / "ckpt" / step_dir_name(2) / "COMPLETE").unlink()
    ckpt = checkpointer(engine, str(tmp_path / "run"), model_name="mlp", keep_last=1, async_upload=False)
    assert ckpt.start({}) is None  # nothing usable: a fresh start, the damaged checkpoint kept
    ckpt.save(3, {}, wait_for_previous=True)
    assert (tmp_path / "run" / P / "DAMAGED").exists() and ckpt.store.latest_complete() == 3
