"""launch.py without a cluster: paths, Ray storage on S3 endpoints, worker env, trainer wiring."""
from __future__ import annotations

import subprocess
import sys

import pyarrow.fs
import pytest

from pnet_dist import launch
from pnet_dist.config import config_from_dict

pytestmark = pytest.mark.unit


def make_cfg(**sections):
    raw = {"run_name": "run1", "model": {"name": "parameternet_debug"}, "data": {"train_uri": "data/train"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw, source="test")


def test_relative_local_paths_become_absolute_and_uris_stay(tmp_path):
    cfg = make_cfg(data={"train_uri": "data/train", "eval_uri": "s3://bucket/val", "cache_dir": "~/cache"},
                   checkpoint={"uri": "./runs"}, train={"init_from": "synthetic:whatever"})
    out = launch.absolute_local_paths(cfg, tmp_path)
    assert out.data.train_uri == str(tmp_path / "data" / "train")
    assert out.data.eval_uri == "s3://bucket/val"
    assert out.data.cache_dir.startswith("/") and not out.data.cache_dir.startswith(str(tmp_path))
    assert out.checkpoint.uri == str(tmp_path / "runs")
    assert out.metrics.logdir == str(tmp_path / "runs" / "run1" / "tb")
    assert out.train.init_from == "synthetic:whatever"
    assert cfg.checkpoint.uri == "./runs", "the input config must not change"
    assert launch.absolute_local_paths(out, "/elsewhere") == out


def test_run_storage_sits_beside_the_engine_checkpoints_locally(tmp_path):
    cfg = make_cfg(checkpoint={"uri": str(tmp_path)})
    assert launch.run_storage(cfg, environ={}) == (f"{tmp_path}/run1/ray", None)


def test_run_storage_on_aws_s3_uses_pyarrow_default_resolution():
    cfg = make_cfg(checkpoint={"uri": "s3://bucket/prefix"})
    assert launch.run_storage(cfg, environ={}) == ("s3://bucket/prefix/run1/ray", None)


def test_run_storage_with_custom_endpoint_gets_explicit_filesystem():
    cfg = make_cfg(checkpoint={"uri": "s3://bucket/prefix/"})
    path, filesystem = launch.run_storage(cfg, environ={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
                                                        "AWS_DEFAULT_REGION": "eu-west-1"})
    assert path == "bucket/prefix/run1/ray"
    assert isinstance(filesystem, pyarrow.fs.S3FileSystem)
    assert filesystem.region == "eu-west-1"


def test_run_storage_rejects_an_endpoint_without_scheme():
    cfg = make_cfg(checkpoint={"uri": "s3://bucket"})
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL_S3.*http://host:port"):
        launch.run_storage(cfg, environ={"AWS_ENDPOINT_URL": "127.0.0.1:9000"})


def test_run_storage_filesystem_reaches_the_s3_server(s3_bucket):
    cfg = make_cfg(checkpoint={"uri": f"{s3_bucket}/ckpts"})
    path, filesystem = launch.run_storage(cfg)
    with filesystem.open_output_stream(f"{path}/probe.txt") as out:
        out.write(b"ok")
    from pnet_dist.storage import open_storage
    assert open_storage(f"{s3_bucket}/ckpts/run1/ray").get_bytes("probe.txt") == b"ok"


def test_worker_env_forwards_endpoints_and_build_settings_but_no_credentials():
    environ = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1", "S3_ENDPOINT_URL": "http://127.0.0.1:1",
               "S3_ENDPOINT": "127.0.0.1:1", "TORCH_EXTENSIONS_DIR": "/x", "OMP_NUM_THREADS": "1",
               "PNET_LOG_LEVEL": "DEBUG", "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret",
               "AWS_SESSION_TOKEN": "token", "HOME": "/root", "PATH": "/bin"}
    assert launch.worker_env_vars(environ) == {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1", "OMP_NUM_THREADS": "1", "PNET_LOG_LEVEL": "DEBUG",
        "S3_ENDPOINT": "127.0.0.1:1", "S3_ENDPOINT_URL": "http://127.0.0.1:1", "TORCH_EXTENSIONS_DIR": "/x"}


def test_trainer_follows_the_scaling_section(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/cache/ext")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    cfg = make_cfg(scaling={"num_workers": 4, "use_gpu": True, "cpus_per_worker": 6, "max_failures": 7},
                   checkpoint={"uri": str(tmp_path)})
    trainer = launch.build_trainer(cfg)
    assert trainer.scaling_config.num_workers == 4
    assert trainer.scaling_config.use_gpu
    assert trainer.scaling_config.resources_per_worker == {"CPU": 6.0, "GPU": 1.0}
    run = trainer.run_config
    assert (run.name, run.storage_path, run.storage_filesystem) == ("run1", f"{tmp_path}/run1/ray", None)
    assert run.failure_config.max_failures == 7
    assert run.worker_runtime_env["env_vars"]["TORCH_EXTENSIONS_DIR"] == "/cache/ext"
    assert trainer.train_loop_config["cfg"] is cfg
    assert trainer.train_loop_per_worker is launch.run_worker


def test_summary_says_where_outputs_are(tmp_path):
    cfg = launch.absolute_local_paths(make_cfg(checkpoint={"uri": "runs"}, train={"max_steps": 50}), tmp_path)
    lines = launch.summary_lines(cfg, {"step": 50, "loss": 1.25, "resumed_from": 20, "preempted": False,
                                       "eval": {"model": {"top1": 97.25, "loss": 0.125}}})
    text = "\n".join(lines)
    assert "reached step 50 of 50 (resumed from step 20)" in text
    assert "held-out (model weights): loss 0.125, top1 97.25" in text
    assert f"checkpoints: {tmp_path}/runs/run1/ckpt" in text
    assert f"tensorboard --logdir {tmp_path}/runs/run1/tb --host 127.0.0.1" in text
    finished = launch.summary_lines(cfg, {"step": 50, "loss": float("nan"), "resumed_from": 50, "eval": {}})
    assert "already at step 50 of 50, nothing left to train (raise train.max_steps" in finished[0]


def test_bad_job_file_fails_before_ray_starts_and_driver_stays_light(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("run_name: r\nmodel: {name: parameternet_debug}\ndata: {train_uri: x}\nscaling: {num_worker: 2}\n")
    # One fresh interpreter (importing ray costs seconds), as `python -m pnet_dist.launch` runs: the
    # error is one line from the driver, before Ray is contacted, and the driver never imports deepspeed.
    code = ("import atexit, sys, ray\nfrom pnet_dist import cli, launch\n"
            "atexit.register(lambda: print('ray initialized:', ray.is_initialized(), '| deepspeed imported:', "
            "'deepspeed' in sys.modules))\n"
            "sys.argv = ['pnet_dist.launch', sys.argv[1]]\nsys.exit(cli.run(launch.main, prog='pnet_dist.launch'))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"pnet_dist.launch: error: {job}: unknown key 'scaling.num_worker'; allowed "
                                        "in scaling: cpus_per_worker, max_failures, num_workers, ray_address, "
                                        "shared_filesystem, use_gpu"], proc.stderr
    assert "ray initialized: False | deepspeed imported: False" in proc.stdout


def test_summary_of_a_stopped_run_says_how_to_continue(tmp_path):
    cfg = launch.absolute_local_paths(make_cfg(checkpoint={"uri": "runs"}, train={"max_steps": 50}), tmp_path)
    lines = launch.summary_lines(cfg, {"step": 23, "loss": 1.5, "resumed_from": None, "preempted": True,
                                       "stopped_by": "SIGTERM", "eval": {}})
    assert lines[0] == ("run run1: stopped by SIGTERM at step 23 of 50 (started from scratch), checkpoint of step 23 "
                        "written; run the same command again to continue from it")


def test_deterministic_worker_errors_end_the_run_and_others_are_retried():
    callback = launch._EndOnDeterministicError()
    callback.after_exception(None, {0: RuntimeError("Connection reset by peer"), 1: OSError("node lost")})
    with pytest.raises(launch.DeterministicWorkerError, match=r"rank 1 failed with ValueError: bad shard \| in x "
                                                              r"-- not retried"):
        callback.after_exception(None, {0: RuntimeError("collective aborted"), 1: ValueError("bad shard\nin x")})
    with pytest.raises(launch.DeterministicWorkerError, match="ModuleNotFoundError"):
        callback.after_exception(None, {0: ModuleNotFoundError("No module named 'pnet_dist'")})


def test_trainer_carries_the_stop_channel_and_the_fail_fast_callback(tmp_path):
    cfg = make_cfg(checkpoint={"uri": str(tmp_path)}, scaling={"max_failures": -1})
    channel = object()
    trainer = launch.build_trainer(cfg, channel)
    assert trainer.train_loop_config["stop_channel"] is channel
    assert trainer.run_config.failure_config.max_failures == -1
    assert any(isinstance(c, launch._EndOnDeterministicError) for c in trainer.run_config.callbacks)


def test_working_dir_copy_and_stop_wait_come_from_the_ray_job_environment(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert launch.ray_working_dir_copy() is None and launch.stop_wait_s() == 600.0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {}}, "metadata": {}}')
    assert launch.ray_working_dir_copy() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}')
    assert launch.ray_working_dir_copy() == str(tmp_path)
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "300")
    assert launch.stop_wait_s() == 290.0
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S")
    import logging
    logging.getLogger("pnet_dist").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="pnet_dist.launch"):
            assert launch.stop_wait_s() == 1.0
    finally:
        logging.getLogger("pnet_dist").propagate = False
    assert "RAY_JOB_STOP_WAIT_TIME_S is 3 s" in caplog.text
