"""Ray orchestration: one job YAML becomes a Ray Train run whose workers execute train_worker.

    python -m pnet_dist.launch jobs/X.yaml [key=value ...]
    ray job submit --working-dir . -- python -m pnet_dist.launch jobs/X.yaml [key=value ...]

Owns the Ray side of a run and nothing else: connecting to (or starting) Ray, the TorchTrainer
built from the job's `scaling` section, what reaches the workers' environment, and the summary
printed at the end. Ray is imported here and nowhere else in pnet_dist.

Ray's role is the worker group and its restarts. The engine owns its checkpoints: it writes them
to <checkpoint.uri>/<run_name>/ckpt and, on start, resumes from the newest complete one by itself.
So one mechanism serves both levels of failure -- a dead worker (Ray Train restarts the group, up
to scaling.max_failures times) and a dead job (the same YAML submitted again) -- and Ray's
checkpoint API is not used. Ray's own run storage sits beside the engine's, at
<checkpoint.uri>/<run_name>/ray.

Things that are easy to get wrong, and why the code below looks the way it does:
- Ray Train (V2, the default in 2.60) chdirs every worker into a Ray temp folder, so relative
  local paths in the config are made absolute here, against the driver's working directory. Under
  `ray job submit` that directory is Ray's copy of --working-dir: give local paths there as
  absolute paths (or use s3://).
- Workers are started by the raylet, not by the driver, so the driver's environment does not reach
  them. The S3 endpoint settings, TORCH_EXTENSIONS_DIR, OMP_NUM_THREADS and PNET_* are forwarded
  through the workers' runtime_env. Credentials are not: a runtime_env is visible in the
  dashboard. Workers take credentials from their node (instance profile, ~/.aws, or the
  environment `ray start` ran in).
- An S3 endpoint other than AWS's needs an explicit pyarrow S3FileSystem for Ray's storage, and
  then a storage path without "s3://" (ArrowInvalid otherwise).
- Ray resolves 127.0.0.1 to the host's external address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  is set before ray is imported; a local instance started here must stay on loopback. The setting
  does not affect connecting to a cluster (the driver finds its raylet by host, not by address).
- The training function runs in a thread of the worker actor, where Python cannot install a
  signal handler, and Ray's own SIGTERM handler (on the actor's main thread) exits the process.
  So each worker asks its own actor to run `_install_sigterm_handler` on the actor's main thread
  (a task of the actor, RayTrainWorker.execute): SIGTERM then requests a stop, the loop finishes
  its step on every rank, checkpoints and returns; Ray's handler is put back when the loop ends.
  Spot notices reach the engine through its own watcher (train.watch_spot_interruption). A run
  the engine stopped early (result "preempted") is turned into a worker error, so that Ray Train
  starts a new group that resumes from the checkpoint just written instead of ending the run
  short of max_steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow.fs  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from pnet_dist import storage  # noqa: E402
from pnet_dist.config import JobConfig, load_config  # noqa: E402
from pnet_dist.log import get_logger  # noqa: E402

log = get_logger(__name__)

# Set in the driver, needed on the workers; never credentials (see the module docstring).
FORWARDED_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
    "S3_ENDPOINT_URL", "S3_ENDPOINT", "S3_USE_HTTPS", "S3_VERIFY_SSL",
    "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS",
)
FORWARDED_ENV_PREFIXES = ("PNET_",)

# Config fields that may hold a local path (others may be s3:// or another scheme).
LOCAL_PATH_FIELDS = (
    ("data", "train_uri"), ("data", "eval_uri"), ("data", "cache_dir"),
    ("checkpoint", "uri"), ("metrics", "logdir"), ("train", "init_from"),
)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
RESULT_PREFIX = "pnet_dist result: "


# -- pure helpers (no Ray calls) ----------------------------------------------------------------
def absolute_local_paths(cfg: JobConfig, base_dir: str | os.PathLike) -> JobConfig:
    """A copy of cfg whose relative local paths are absolute against base_dir; URIs are untouched."""
    sections = {}
    for section_name, field_name in LOCAL_PATH_FIELDS:
        section = sections.get(section_name, getattr(cfg, section_name))
        value = getattr(section, field_name)
        if value is None or _URI_SCHEME.match(value) or os.path.isabs(value):
            continue
        absolute = os.path.normpath(os.path.join(os.fspath(base_dir), os.path.expanduser(value)))
        sections[section_name] = dataclasses.replace(section, **{field_name: absolute})
    return dataclasses.replace(cfg, **sections)


def run_storage(cfg: JobConfig, environ: dict[str, str] | None = None
                ) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: <checkpoint.uri>/<run_name>/ray.

    For s3:// with a custom endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, as for boto3) the
    filesystem is an explicit S3FileSystem and the path loses its scheme, as Ray requires.
    """
    environ = os.environ if environ is None else environ
    path = storage.join(cfg.checkpoint.uri, cfg.run_name, "ray")
    if not storage.is_s3(path):
        return path, None
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return path, None
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"S3 endpoint {endpoint!r} (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) must look like "
                         "http://host:port or https://host")
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme,
                                         **({"region": region} if region else {}))
    return path[len("s3://"):], filesystem


def worker_env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's settings that the training workers need as well (see FORWARDED_ENV_VARS)."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in sorted(environ.items())
            if name in FORWARDED_ENV_VARS or name.startswith(FORWARDED_ENV_PREFIXES)}


def worker_resources(cfg: JobConfig) -> dict[str, float]:
    resources = {"CPU": float(cfg.scaling.cpus_per_worker)}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1.0
    return resources


# -- Ray -----------------------------------------------------------------------------------------
def build_trainer(cfg: JobConfig) -> TorchTrainer:
    """The TorchTrainer for a job: workers, restarts, Ray's storage, the workers' environment."""
    storage_path, filesystem = run_storage(cfg)
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker=worker_resources(cfg))
    run_config = ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        worker_runtime_env={"env_vars": worker_env_vars()},
    )
    return TorchTrainer(run_worker, train_loop_config={"cfg": cfg}, scaling_config=scaling,
                        run_config=run_config)


_ray_sigterm_handler = None  # Ray's handler, while ours is installed (worker processes only)


def _sigterm_requests_stop(signum, frame) -> None:
    from pnet_dist.train import request_stop, stop_requested
    if stop_requested() and callable(_ray_sigterm_handler):
        _ray_sigterm_handler(signum, frame)  # a second SIGTERM: exit now, as Ray's handler does
    request_stop("SIGTERM")


def _install_sigterm_handler() -> None:
    """Runs on the worker actor's main thread."""
    global _ray_sigterm_handler
    previous = signal.signal(signal.SIGTERM, _sigterm_requests_stop)
    if _ray_sigterm_handler is None:
        _ray_sigterm_handler = previous


def _restore_sigterm_handler() -> None:
    """Runs on the worker actor's main thread."""
    global _ray_sigterm_handler
    if _ray_sigterm_handler is not None:
        signal.signal(signal.SIGTERM, _ray_sigterm_handler)
        _ray_sigterm_handler = None


def _on_actor_main_thread(fn) -> bool:
    """Run `fn` as a task of this worker's own actor, i.e. on the actor's main thread (the
    training function's thread cannot set signal handlers). False, with a warning, if that fails."""
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(fn), timeout=60)
        return True
    except Exception as exc:  # noqa: BLE001 -- a missing handler must not stop training
        log.warning("could not run %s on the worker's main thread (%s: %s); SIGTERM will end this worker "
                    "without a checkpoint", fn.__name__, type(exc).__name__, exc)
        return False


def run_worker(loop_config: dict) -> dict:
    """Body of every Ray Train worker: the engine's training loop on the job's config, with SIGTERM
    turned into the loop's stop request (finish the step, checkpoint, return)."""
    # Imported here so the driver never loads deepspeed and the model code.
    from pnet_dist.train import train_worker
    handler_installed = _on_actor_main_thread(_install_sigterm_handler)
    try:
        result = train_worker(loop_config["cfg"])
    finally:
        if handler_installed:
            _on_actor_main_thread(_restore_sigterm_handler)
    if result.get("preempted"):
        # A clean return would end the Ray run short of max_steps. An error makes Ray Train start
        # a new worker group (on a replacement node), which resumes from the checkpoint just written.
        raise RuntimeError(f"preempted at step {result['step']} after writing a checkpoint; restarting from it")
    return result


def connect_ray(address: str | None) -> bool:
    """Connect to the Ray cluster for this job; returns True if a local instance was started.

    address (scaling.ray_address) wins, then RAY_ADDRESS (set by `ray job submit`), then a cluster
    started with `ray start` on this machine; without any of them a local instance is started on
    127.0.0.1.
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
        return False
    try:
        ray.init(address="auto")
        return False
    except ConnectionError:
        log.info("no running Ray cluster found; starting a local instance on 127.0.0.1")
    ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
    return True


def check_local_capacity(cfg: JobConfig) -> None:
    """A local instance cannot grow, so a request it cannot hold would wait forever: fail now."""
    available = ray.cluster_resources()
    for name, per_worker in worker_resources(cfg).items():
        needed = per_worker * cfg.scaling.num_workers
        if needed > available.get(name, 0.0):
            raise ValueError(
                f"scaling: {cfg.scaling.num_workers} workers x {per_worker:g} {name} = {needed:g} {name}, but the "
                f"local Ray instance has {available.get(name, 0.0):g}; lower scaling.num_workers or "
                f"scaling.cpus_per_worker (or use_gpu), or connect to a cluster (scaling.ray_address / RAY_ADDRESS)")


def launch(cfg: JobConfig) -> dict:
    """Run the job on Ray; returns rank 0's result of the last (successful) worker group."""
    cfg = absolute_local_paths(cfg, Path.cwd())
    started_local = connect_ray(cfg.scaling.ray_address)
    if started_local:
        check_local_capacity(cfg)
    log.info("run %s: %d workers (%s each), up to %d restarts; run folder %s", cfg.run_name,
             cfg.scaling.num_workers, worker_resources(cfg), cfg.scaling.max_failures, cfg.run_uri)
    result = build_trainer(cfg).fit()
    if result.return_value is None:
        raise RuntimeError(f"run {cfg.run_name}: Ray Train finished without a result from rank 0 "
                           f"(error: {result.error})")
    return result.return_value


def summary_lines(cfg: JobConfig, result: dict) -> list[str]:
    """What the user needs at the end of a run: where it stopped and where its outputs are."""
    resumed = result.get("resumed_from")
    if resumed is not None and resumed >= result["step"]:
        lines = [f"run {cfg.run_name}: already at step {resumed} of {cfg.train.max_steps}, nothing left to train "
                 f"(raise train.max_steps to continue)"]
    else:
        start = f"resumed from step {resumed}" if resumed is not None else "started from scratch"
        lines = [f"run {cfg.run_name}: reached step {result['step']} of {cfg.train.max_steps} ({start}); "
                 f"last train loss {result['loss']:.4f}"]
    # eval: {"model": {"top1": ..., "loss": ...}, "ema": {...}} as returned by train_worker
    for weights, metrics in sorted((result.get("eval") or {}).items()):
        shown = ", ".join(f"{key} {int(value) if float(value).is_integer() else f'{value:.4g}'}"
                          for key, value in sorted(metrics.items()))
        lines.append(f"held-out ({weights} weights): {shown}")
    lines.append(f"checkpoints: {storage.join(cfg.run_uri, 'ckpt')}")
    lines.append(f"TensorBoard logs: {cfg.metrics.logdir}")
    lines.append(f"open TensorBoard: tensorboard --logdir {cfg.metrics.logdir} --host 127.0.0.1 "
                 f"(then http://127.0.0.1:6006)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pnet_dist.launch", description=__doc__.split("\n")[0])
    parser.add_argument("job", help="job YAML (see jobs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=100 optim.lr=3e-4")
    args = parser.parse_args(argv)
    cfg = absolute_local_paths(load_config(args.job, args.overrides), Path.cwd())
    result = launch(cfg)
    for line in summary_lines(cfg, result):
        print(f"pnet_dist: {line}", flush=True)
    print(RESULT_PREFIX + json.dumps({k: result.get(k) for k in ("step", "loss", "eval", "resumed_from", "preempted")},
                                     default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
