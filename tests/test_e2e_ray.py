"""End to end through a real local Ray cluster and a real S3 endpoint, both on 127.0.0.1.

One Ray head (`ray start --head`) serves every test in this module; jobs go in through
`ray job submit` with the runtime env of jobs/runtime_env.yaml, exactly as on a cluster. Data,
checkpoints, Ray's run storage and TensorBoard logs all live in the moto S3 server.

The head is started with the S3 endpoint variables pointing at a dead local port, and each job's
driver alone gets the real endpoint (in its entrypoint): the workers reach S3 only if launch.py
forwards the driver's endpoint settings to them, and nothing can fall back to real AWS.

Runs (quickstart_vision on the quickstart digits, 2 workers, ZeRO-2):
- baseline: uninterrupted; then the same YAML again -> resumes at the end instead of restarting.
- interrupted: one training worker SIGKILLed after the first checkpoint (Ray restarts the worker
  group, which resumes from the newest complete checkpoint), later the job's driver SIGKILLed
  (the whole job dies), then the same YAML submitted again -> it finishes from the object store
  with the baseline's final loss, bit for bit.
- sigterm: one training worker gets SIGTERM -> the step is finished and checkpointed, Ray restarts
  the group from that checkpoint, the job succeeds with the baseline's final loss.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, free_port
from pnet_dist import launch
from pnet_dist.config import load_config
from pnet_dist.launch import RESULT_PREFIX
from pnet_dist.metrics import read_scalars
from pnet_dist.storage import open_storage

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).parent / "ray")
MAX_STEPS = 80
EVERY_STEPS = 10
# Unroutable on purpose: a worker that did not get the driver's endpoint fails here, locally.
DEAD_ENDPOINT = "127.0.0.1:9"
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "S3_ENDPOINT", "S3_USE_HTTPS",
                 "S3_VERIFY_SSL")


# -- the cluster -------------------------------------------------------------------------------
class RayHead:
    """`ray start --head --block` on 127.0.0.1 in its own temp dir; every process it spawns carries
    a marker variable, so teardown ends exactly those (never `ray stop`, which ends every Ray on
    the machine)."""

    def __init__(self):
        self.marker = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="ray_e2e_", dir="/tmp")   # short: Ray's socket paths
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{free_port()}"
        # PATH stays as it is: the workers' DeepSpeed JIT builds must find the same `ninja` as the
        # other tests' (a different ninja version rewrites .ninja_log and rebuilds every op).
        env = {k: v for k, v in os.environ.items() if k not in ENDPOINT_VARS and k != "TORCH_EXTENSIONS_DIR"}
        env.update(AWS_ENDPOINT_URL_S3=f"http://{DEAD_ENDPOINT}", S3_ENDPOINT_URL=f"http://{DEAD_ENDPOINT}",
                   S3_ENDPOINT=DEAD_ENDPOINT, S3_USE_HTTPS="0", PNET_E2E_CLUSTER=self.marker,
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", self.gcs_address.rpartition(":")[2],
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             # Ray's fixed default ports (agent 52365, client 10001, ...) may be held by another Ray
             # on the machine; a job agent that cannot bind leaves "No available agent" behind.
             *(arg for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                  "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")
               for arg in (option, str(free_port()))),
             "--temp-dir", self.temp_dir, "--num-cpus", "2", "--object-store-memory", str(300 << 20),
             "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: "
                                   f"{Path(self.log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray dashboard at {self.address} did not come up in {timeout_s:.0f}s")

    def wait_for_job_agent(self, timeout_s: float = 120.0) -> None:
        """The dashboard answers before the node's job agent registers ("No available agent to
        submit job"); a no-op job goes through once it has."""
        deadline = time.monotonic() + timeout_s
        while True:
            proc = subprocess.run([RAY, "job", "submit", "--address", self.address, "--no-wait", "--", "true"],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                return
            if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"cannot submit a job to {self.address}:\n{proc.stdout}{proc.stderr}")
            time.sleep(1)

    def processes(self, *name_parts: str, program: str | None = None, name: str | None = None
                  ) -> list[psutil.Process]:
        """Live processes of this cluster whose command line contains every one of name_parts, and
        that run `program` / carry the process name `name` if given (a loader process forked from
        a Ray worker keeps the worker's command line, not its name)."""
        found = []
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                argv = proc.info["cmdline"] or []
                if program is not None and (not argv or argv[0] != program):
                    continue
                if name is not None and proc.info["name"] != name:
                    continue
                if all(part in " ".join(argv) for part in name_parts) and \
                        proc.environ().get("PNET_E2E_CLUSTER") == self.marker:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)   # --block then shuts its processes down
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        leftovers = self.processes()
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=15)   # before removing the folder they write logs into
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(s3_server):
    head = RayHead()
    try:
        head.wait_ready()
        head.wait_for_job_agent()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3
    name = f"e2e-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def quickstart_data(bucket):
    out = f"{bucket}/quickstart"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_quickstart_data.py"), "--out", out],
                   check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def job_yaml(tmp_path_factory, quickstart_data, bucket):
    """quickstart_vision with its data and run folder in S3 and a short step budget."""
    with open(REPO / "jobs" / "quickstart_vision.yaml") as f:
        job = yaml.safe_load(f)
    job["data"].update(train_uri=f"{quickstart_data}/images/train", eval_uri=f"{quickstart_data}/images/val",
                       cache_dir=str(tmp_path_factory.mktemp("streaming_cache")))
    job["train"].update(max_steps=MAX_STEPS, log_every_steps=EVERY_STEPS, eval_every_steps=0)
    job["optim"]["warmup_steps"] = 5
    job["checkpoint"].update(uri=f"{bucket}/runs", every_steps=EVERY_STEPS, keep_last=3)
    job["metrics"].update(log_every_steps=EVERY_STEPS, sync_every_s=1.0)
    path = tmp_path_factory.mktemp("jobs") / "e2e_vision.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


# -- submitting jobs ---------------------------------------------------------------------------
def submit_command(head: RayHead, job_yaml: Path, run_name: str, submission_id: str) -> list[str]:
    """`ray job submit` with jobs/runtime_env.yaml; the S3 endpoint goes to the driver only."""
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]  # reuse the JIT builds
    driver_env = [f"{name}={os.environ[name]}" for name in ENDPOINT_VARS if name in os.environ]
    return [RAY, "job", "submit", "--address", head.address, "--submission-id", submission_id,
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "env", *driver_env, sys.executable, "-m", "pnet_dist.launch", str(job_yaml), f"run_name={run_name}"]


def submit(head: RayHead, job_yaml: Path, run_name: str, timeout_s: float = 420) -> tuple[dict, str]:
    """Submit and wait; returns (the driver's result line, the job's output)."""
    proc = subprocess.run(submit_command(head, job_yaml, run_name, f"{run_name}-{uuid.uuid4().hex[:6]}"),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"job failed:\n{output[-6000:]}"
    return parse_result(output), output


def parse_result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, f"expected one result line:\n{output[-6000:]}"
    return json.loads(lines[0][len(RESULT_PREFIX):])


def complete_steps(run_uri: str) -> list[int]:
    keys = open_storage(run_uri).list("ckpt")
    return sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"ckpt/step_(\d+)/COMPLETE", k)))


def wait_for_checkpoint(run_uri: str, at_least: int, job: subprocess.Popen, timeout_s: float = 180) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = complete_steps(run_uri)
        if steps and steps[-1] >= at_least:
            return steps[-1]
        assert job.poll() is None, f"the job ended before checkpoint {at_least}:\n{job.communicate()[0][-6000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no complete checkpoint >= {at_least} under {run_uri} after {timeout_s:.0f}s")


def start_job(head: RayHead, job_yaml: Path, run_name: str) -> subprocess.Popen:
    """`ray job submit` in the background; its output is read with communicate()."""
    return subprocess.Popen(submit_command(head, job_yaml, run_name, f"{run_name}-{uuid.uuid4().hex[:6]}"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def training_workers_after_first_checkpoint(head: RayHead, run_uri: str, job: subprocess.Popen
                                            ) -> list[psutil.Process]:
    wait_for_checkpoint(run_uri, EVERY_STEPS, job)
    workers = head.processes(name="ray::RayTrainWorker")
    assert len(workers) == 2, [w.cmdline() for w in workers]
    return workers


@pytest.fixture(scope="module")
def baseline(ray_head, job_yaml, bucket):
    """The uninterrupted run: (result, run folder URI)."""
    result, _ = submit(ray_head, job_yaml, "baseline")
    return result, f"{bucket}/runs/baseline"


# -- tests ---------------------------------------------------------------------------------------
def test_uninterrupted_run_trains_and_logs_to_the_object_store(baseline):
    result, run_uri = baseline
    assert result["step"] == MAX_STEPS and result["resumed_from"] is None and not result["preempted"]
    assert complete_steps(run_uri)[-1] == MAX_STEPS
    scalars = read_scalars(f"{run_uri}/tb")
    assert [step for step, _ in scalars["train/loss"]] == list(range(EVERY_STEPS, MAX_STEPS + 1, EVERY_STEPS))
    assert scalars["eval/top1"][-1] == (MAX_STEPS, pytest.approx(result["eval"]["model"]["top1"]))
    assert open_storage(f"{run_uri}/ray").list(), "Ray's run storage sits beside the checkpoints"


def test_same_yaml_after_the_end_resumes_instead_of_restarting(ray_head, job_yaml, baseline):
    first, run_uri = baseline
    before = open_storage(run_uri).list("ckpt")
    result, _ = submit(ray_head, job_yaml, "baseline")
    assert result["resumed_from"] == MAX_STEPS and result["step"] == MAX_STEPS
    assert open_storage(run_uri).list("ckpt") == before, "a finished run must not train or checkpoint again"
    assert result["eval"]["model"]["top1"] == pytest.approx(first["eval"]["model"]["top1"])


def test_killed_worker_and_killed_job_resume_to_the_uninterrupted_loss(ray_head, job_yaml, bucket, baseline):
    run_uri = f"{bucket}/runs/interrupted"
    job = start_job(ray_head, job_yaml, "interrupted")
    try:
        # 1. A worker dies: Ray Train restarts the worker group inside the same job.
        workers = training_workers_after_first_checkpoint(ray_head, run_uri, job)
        workers[0].send_signal(signal.SIGKILL)
        killed_time = time.monotonic()
        killed_at = complete_steps(run_uri)[-1]
        assert killed_at < MAX_STEPS - EVERY_STEPS, "the run got too far before the kill; lengthen it"

        # 2. The restarted group checkpoints further; then the whole job dies with its driver.
        reached = wait_for_checkpoint(run_uri, killed_at + 2 * EVERY_STEPS, job)
        restart_s = time.monotonic() - killed_time
        assert reached < MAX_STEPS, "the run finished before the driver was killed; lengthen it"
        drivers = ray_head.processes("pnet_dist.launch", "run_name=interrupted", program=sys.executable)
        assert len(drivers) == 1, [d.cmdline() for d in drivers]
        drivers[0].send_signal(signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, "the job whose driver was killed must not report success"
    assert "FailurePolicy" in output and "RETRY" in output, output[-6000:]
    # The engine's log line: the restarted group continued from a checkpoint, not from step 0.
    resumed_in_job = [int(step) for step in re.findall(r"resumed from checkpoint step (\d+)", output)]
    assert resumed_in_job and resumed_in_job[0] >= killed_at, output[-6000:]
    assert RESULT_PREFIX not in output

    # 3. The same YAML again: it continues from the object store and ends where the baseline did.
    result, _ = submit(ray_head, job_yaml, "interrupted")
    assert result["resumed_from"] is not None and reached <= result["resumed_from"] < MAX_STEPS
    assert result["step"] == MAX_STEPS
    assert result["loss"] == baseline[0]["loss"], "resumed training must reproduce the uninterrupted loss"
    assert result["eval"] == baseline[0]["eval"]
    print(f"worker SIGKILLed after checkpoint {killed_at}; restarted group reached checkpoint {reached} "
          f"{restart_s:.0f}s later; driver SIGKILLed; resubmission resumed from {result['resumed_from']} and "
          f"ended with loss {result['loss']!r} (uninterrupted: {baseline[0]['loss']!r})")


def test_sigterm_to_a_worker_checkpoints_that_step_and_the_job_finishes(ray_head, job_yaml, bucket, baseline):
    """SIGTERM (what a node going down sends) to one training worker: every rank finishes the step,
    the checkpoint of that step is written, Ray restarts the group, which resumes from exactly that
    step, and the job succeeds with the uninterrupted loss."""
    run_uri = f"{bucket}/runs/sigterm"
    job = start_job(ray_head, job_yaml, "sigterm")
    try:
        workers = training_workers_after_first_checkpoint(ray_head, run_uri, job)
        workers[1].send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=420)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, f"job failed:\n{output[-6000:]}"
    stopped = [int(step) for step in re.findall(r"stop requested \(SIGTERM\): checkpointed step (\d+)", output)]
    assert len(stopped) == 1, output[-6000:]
    assert EVERY_STEPS <= stopped[0] < MAX_STEPS
    resumed = {int(step) for step in re.findall(r"resumed from checkpoint step (\d+)", output)}
    assert resumed == {stopped[0]}, f"the restarted group must start at the SIGTERM's step:\n{output[-6000:]}"
    result = parse_result(output)
    assert result["step"] == MAX_STEPS and not result["preempted"]
    assert result["loss"] == baseline[0]["loss"], "the stopped and resumed run must reproduce the uninterrupted loss"
    print(f"worker SIGTERMed: checkpointed step {stopped[0]}, Ray restarted the group from it, final loss "
          f"{result['loss']!r} (uninterrupted: {baseline[0]['loss']!r})")


def test_a_request_the_cluster_cannot_hold_fails_with_the_fix(ray_head):
    import ray
    cfg = load_config(REPO / "jobs" / "quickstart_vision.yaml", ["scaling.num_workers=3"])
    assert not launch.connect_ray(ray_head.gcs_address), "an address means connect, never start"
    try:
        assert ray.get_runtime_context().gcs_address == ray_head.gcs_address
        with pytest.raises(ValueError, match=r"3 workers x 1 CPU = 3 CPU.*has 2.*scaling.num_workers"):
            launch.check_local_capacity(cfg)
        launch.check_local_capacity(load_config(REPO / "jobs" / "quickstart_vision.yaml"))
    finally:
        ray.shutdown()
