"""Ray orchestration: one job YAML becomes a Ray Train run whose workers execute train_worker.

    ray job submit --address http://127.0.0.1:8265 jobs/X.yaml [key=value ...]   # every job YAML is executable
    python -m pnet_dist.launch jobs/X.yaml [key=value ...]                        # the same, from a shell

Owns the Ray side of a run and nothing else: connecting to (or starting) Ray, the pre-flight steps
that need the cluster, the TorchTrainer built from the job's `scaling` section, what reaches the
workers' environment, a graceful stop of the whole job, and the summary printed at the end. Ray
is imported here and nowhere else in pnet_dist; the checks that need no cluster are
pnet_dist.preflight's.

Ray's role is the worker group and its restarts. The engine owns its checkpoints: it writes them
to <checkpoint.uri>/<run_name>/ckpt and, on start, resumes from the newest complete one by itself.
So one mechanism serves both levels of failure -- a dead worker (Ray Train restarts the group, up
to scaling.max_failures times, -1 = without limit) and a dead job (the same YAML submitted again)
-- and Ray's checkpoint API is not used. Ray's own run storage sits beside the engine's, at
<checkpoint.uri>/<run_name>/ray.

Things that are easy to get wrong, and why the code below looks the way it does:
- Where relative paths point. `ray job submit` runs the entrypoint in a shell whose working
  directory is the folder `ray start` ran in (a head started in the repo: the repo), or, with a
  working_dir, Ray's temporary copy of it; Ray records nothing about where the user typed the
  command. So relative local paths are made absolute against the driver's working directory (Ray
  Train chdirs every worker into a temp folder), and a relative path under a working_dir copy is
  refused by the pre-flight (it would read and write inside the copy, lost with the Ray session).
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
- SIGTERM to a worker (a node shutting down) or a spot notice: the training function runs in a
  thread of the worker actor, where Python cannot install a signal handler, and Ray's own SIGTERM
  handler (on the actor's main thread) exits the process. So each worker asks its own actor to
  run `_install_sigterm_handler` on the actor's main thread (a task of the actor,
  RayTrainWorker.execute): SIGTERM then requests a stop, the loop finishes its step on every rank,
  checkpoints and returns; Ray's handler is put back when the loop ends. A run the engine stopped
  early for that reason (result "preempted") is turned into a worker error, so that Ray Train
  starts a new group that resumes from the checkpoint just written.
- `ray job stop` (and Ctrl-C of `python -m pnet_dist.launch`) signals the driver only; Ray then
  SIGKILLs the job after RAY_JOB_STOP_WAIT_TIME_S (default 3 s: set it on the head, README). The
  driver's handler asks every worker to take the same stop path through a `_StopChannel` actor:
  one per job, pinned to the driver's node, its handle in the workers' loop config. A Ray actor
  rather than a stop marker polled in the run folder or a signal: actor calls cross node
  boundaries, the handle reaches every worker group Ray Train starts (a group that starts after
  the stop is told at once), it lives on the driver's (on-demand) node, and nothing is polled in
  object storage. Workers stopped this way return normally, so the run ends -- not retried -- with
  the checkpoint of the stop step, and the job ends STOPPED; the same command resumes from it.
- Errors no restart can fix. The pre-flight catches most before any worker starts. A worker that
  still fails with one (ValueError, TypeError, ImportError: bad config or data) ends the run at
  once: `_EndOnDeterministicError`, a Ray Train UserCallback, raises in the controller when it sees
  such a worker error, and Ray Train's failure policy does not retry controller errors. Everything
  else (a dead node, a collective that timed out, a preemption) is retried up to max_failures.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pnet_dist import cli  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pnet_dist.launch", description=__doc__.split("\n")[0],
                                     epilog=cli.DEBUG_HELP)
    parser.add_argument("job", help="job YAML (see jobs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=100 optim.lr=3e-4")
    return parser


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    _parser().print_help()  # before Ray is imported: --help answers at once
    sys.exit(0)

import pyarrow.fs  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from pnet_dist import preflight, storage  # noqa: E402
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

RESULT_PREFIX = "pnet_dist result: "
# Worker errors that a restart cannot fix (the project's error for bad input is ValueError; a wrong
# model kwarg is a TypeError; a package missing on the nodes an ImportError): the run ends at once.
DETERMINISTIC_ERRORS = (ValueError, TypeError, ImportError)
# What `ray job stop` leaves a job before SIGKILL, unless RAY_JOB_STOP_WAIT_TIME_S says otherwise.
RAY_DEFAULT_STOP_WAIT_S = 3
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"


# -- pure helpers (no Ray calls) ----------------------------------------------------------------
def absolute_local_paths(cfg: JobConfig, base_dir: str | os.PathLike) -> JobConfig:
    """A copy of cfg whose relative local paths are absolute against base_dir; URIs are untouched."""
    sections = {}
    for section_name, field_name in preflight.LOCAL_PATH_FIELDS:
        section = sections.get(section_name, getattr(cfg, section_name))
        value = getattr(section, field_name)
        if not preflight.is_local_path(value) or os.path.isabs(value):
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
def build_trainer(cfg: JobConfig, stop_channel=None) -> TorchTrainer:
    """The TorchTrainer for a job: workers, restarts, Ray's storage, the workers' environment, the
    stop channel (see _StopChannel) and the end of the run on a deterministic worker error."""
    storage_path, filesystem = run_storage(cfg)
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker=worker_resources(cfg))
    run_config = ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        worker_runtime_env={"env_vars": worker_env_vars()},
        callbacks=[_EndOnDeterministicError()],
    )
    return TorchTrainer(run_worker, train_loop_config={"cfg": cfg, "stop_channel": stop_channel},
                        scaling_config=scaling, run_config=run_config)


class DeterministicWorkerError(RuntimeError):
    """A worker failed in a way no restart can fix; raised in the Ray Train controller."""


class _EndOnDeterministicError(ray.train.UserCallback):
    """Runs in the Ray Train controller after a worker error: an error of DETERMINISTIC_ERRORS ends
    the run at once (a callback's error is a controller error, which Ray Train does not retry)."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            if isinstance(error, DETERMINISTIC_ERRORS):
                message = cli.one_line(error)
                if not message.startswith(f"{type(error).__name__}:"):   # a re-raised traceback names it already
                    message = f"{type(error).__name__}: {message}"
                raise DeterministicWorkerError(f"rank {rank} failed with {message} -- not retried: restarting "
                                               "cannot fix a config or data error")


@ray.remote(num_cpus=0)
class _StopChannel:
    """How the driver tells every worker, on any node and in any worker group, to stop (see the
    module docstring). An async actor: each worker keeps one `wait` call open, nothing polls."""

    def __init__(self):
        self._event = asyncio.Event()
        self._reason: str | None = None

    async def request(self, reason: str) -> None:
        self._reason = reason
        self._event.set()

    async def wait(self) -> str:
        await self._event.wait()
        return self._reason

    async def reason(self) -> str | None:
        return self._reason


def create_stop_channel():
    """The job's _StopChannel, on the driver's node (an on-demand head outlives the spot workers)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return _StopChannel.options(scheduling_strategy=here).remote()


class _StopWatcher:
    """In each worker: waits on the stop channel and turns a stop into the loop's stop request."""

    def __init__(self, channel):
        self._channel = channel
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pnet-stop-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from pnet_dist.train import request_stop
        pending = self._channel.wait.remote()
        while not self._done.is_set():
            ready, _ = ray.wait([pending], timeout=1.0)
            if not ready:
                continue
            try:
                reason = ray.get(pending)
            except ray.exceptions.RayError:
                return  # the driver is gone, and the job with it
            request_stop(reason)
            return

    def stopped_by_driver(self) -> bool:
        """True if the driver asked for the stop this rank served (asked the channel itself: another
        rank's watcher may have been first, and the step's collective stopped this rank)."""
        try:
            return ray.get(self._channel.reason.remote(), timeout=60) is not None
        except ray.exceptions.RayError:
            return False

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


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
    and the driver's stop turned into the loop's stop request (finish the step, checkpoint, return)."""
    # Imported here so the driver never loads deepspeed.
    from pnet_dist.train import train_worker
    channel = loop_config.get("stop_channel")
    watcher = _StopWatcher(channel) if channel is not None else None
    handler_installed = _on_actor_main_thread(_install_sigterm_handler)
    try:
        result = train_worker(loop_config["cfg"])
    finally:
        if handler_installed:
            _on_actor_main_thread(_restore_sigterm_handler)
        if watcher is not None:
            watcher.close()
    if result.get("preempted") and not (watcher is not None and watcher.stopped_by_driver()):
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


def runs_on_this_machine(cfg: JobConfig) -> bool:
    """True when the job's workers can only run on the driver's machine: the cluster is this one
    node and it holds every worker. A cluster that has or must add other nodes is not."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) != 1 or nodes[0]["NodeID"] != ray.get_runtime_context().get_node_id():
        return False
    total = nodes[0].get("Resources", {})
    return all(per_worker * cfg.scaling.num_workers <= total.get(name, 0.0)
               for name, per_worker in worker_resources(cfg).items())


def ray_working_dir_copy() -> str | None:
    """The folder of Ray's temporary copy of the job's working_dir when this driver runs in one
    (`ray job submit --working-dir` or a runtime env with a working_dir), else None."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return os.getcwd() if (job_config.get("runtime_env") or {}).get("working_dir") else None


def under_ray_job() -> bool:
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


class DriverStop:
    """SIGTERM (`ray job stop`, a node shutting down) and SIGINT (Ctrl-C) on the driver.

    Before the workers exist the driver just exits. Once they run, the first signal asks every
    worker, through the stop channel, to finish its step, checkpoint it and return; the driver
    waits for that up to `wait_s` (a bound below RAY_JOB_STOP_WAIT_TIME_S, after which Ray kills
    the job anyway) and then exits. A second signal exits at once.

    The handlers only set a flag; a thread does the Ray call and the waiting (a signal handler
    runs on the main thread, which is inside trainer.fit()).
    """

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.signal_name: str | None = None
        self.channel = None
        self._signalled = threading.Event()
        self._finished = threading.Event()
        self._previous: dict = {}
        self.install()
        self._thread = threading.Thread(target=self._serve, name="pnet-driver-stop", daemon=True)
        self._thread.start()

    def install(self) -> None:
        """(Re)install the handlers: ray.init() puts Ray's own SIGTERM handler (a stack dump, then
        death) in place, so this runs again once Ray is connected. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._signalled.is_set() or self.channel is None:
            log.warning("%s: stopping the driver now%s", name,
                        "" if self.channel is None else " (the workers may not have checkpointed)")
            raise SystemExit(128 + signum)
        self.signal_name = name
        self._signalled.set()

    def _serve(self) -> None:
        self._signalled.wait()
        reason = f"{self.signal_name} to the job's driver ({'ray job stop' if under_ray_job() else 'stop'})"
        log.warning("%s: asking every worker to finish its step, checkpoint it and stop (waiting up to %.0f s)",
                    reason, self.wait_s)
        try:
            ray.get(self.channel.request.remote(reason), timeout=30)
        except ray.exceptions.RayError as exc:
            log.error("could not reach the workers' stop channel (%s); stopping without a checkpoint", exc)
            os._exit(1)
        if self._finished.wait(self.wait_s):
            return
        log.error("the workers did not stop within %.0f s; exiting without waiting for them", self.wait_s)
        os._exit(1)

    def close(self) -> None:
        self._finished.set()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def stop_wait_s() -> float:
    """How long the driver gives the workers to stop: under `ray job`, what Ray grants before its
    SIGKILL less a margin for the driver's own exit; from a shell, 10 minutes."""
    if not under_ray_job():
        return 600.0
    granted = float(os.environ.get(STOP_WAIT_ENV, RAY_DEFAULT_STOP_WAIT_S))
    if granted < 60:
        log.warning("%s is %g s: `ray job stop` will kill this job before its workers can checkpoint. Start the "
                    "Ray head (and every node) with %s=300 in its environment (README, 'Running on a cluster')",
                    STOP_WAIT_ENV, granted, STOP_WAIT_ENV)
    return max(granted - 10.0, 1.0)


def launch(cfg: JobConfig, source: str = "<config>") -> dict:
    """Pre-flight, then the job on Ray; returns rank 0's result of the last (successful) worker group."""
    driver_stop = DriverStop(stop_wait_s())
    try:
        preflight.check_job(cfg, source)
        started_local = connect_ray(cfg.scaling.ray_address)
        driver_stop.install()
        preflight.check_paths(cfg, source, single_machine=started_local or runs_on_this_machine(cfg))
        if started_local:
            check_local_capacity(cfg)
        retries = "without limit" if cfg.scaling.max_failures == -1 else f"up to {cfg.scaling.max_failures}"
        log.info("run %s: %d workers (%s each), restarts %s; run folder %s", cfg.run_name,
                 cfg.scaling.num_workers, worker_resources(cfg), retries, cfg.run_uri)
        driver_stop.channel = create_stop_channel()
        try:
            result = build_trainer(cfg, driver_stop.channel).fit()
        except ray.train.ControllerError as exc:
            failure = getattr(exc, "controller_failure", None)
            if isinstance(failure, DeterministicWorkerError):
                raise ValueError(f"run {cfg.run_name}: {failure}") from None
            raise
    finally:
        driver_stop.close()
    if result.return_value is None:
        raise RuntimeError(f"run {cfg.run_name}: Ray Train finished without a result from rank 0 "
                           f"(error: {result.error})")
    return {**result.return_value, "stopped_by": driver_stop.signal_name}


def summary_lines(cfg: JobConfig, result: dict) -> list[str]:
    """What the user needs at the end of a run: where it stopped and where its outputs are."""
    resumed = result.get("resumed_from")
    start = f"resumed from step {resumed}" if resumed is not None else "started from scratch"
    if result.get("stopped_by"):
        lines = [f"run {cfg.run_name}: stopped by {result['stopped_by']} at step {result['step']} of "
                 f"{cfg.train.max_steps} ({start}), checkpoint of step {result['step']} written; run the same "
                 f"command again to continue from it"]
    elif resumed is not None and resumed >= result["step"]:
        lines = [f"run {cfg.run_name}: already at step {resumed} of {cfg.train.max_steps}, nothing left to train "
                 f"(raise train.max_steps to continue)"]
    else:
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
    args = _parser().parse_args(argv)
    cfg = load_config(args.job, args.overrides)
    preflight.check_relative_paths(cfg, args.job, ray_working_dir_copy())
    cfg = absolute_local_paths(cfg, Path.cwd())
    result = launch(cfg, source=args.job)
    for line in summary_lines(cfg, result):
        print(f"pnet_dist: {line}", flush=True)
    print(RESULT_PREFIX + json.dumps({k: result.get(k) for k in ("step", "loss", "eval", "resumed_from", "preempted",
                                                                 "stopped_by")}, default=str), flush=True)
    return 128 + signal.Signals[result["stopped_by"]].value if result.get("stopped_by") else 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="pnet_dist.launch"))
