"""End to end through a real local Ray head and a real S3 endpoint, both on 127.0.0.1.

One Ray head (`ray start --head`) serves every test in this module. It is started the way the
README's "On this machine" block starts it -- the block is read from README.md: its `export`s and
the variables in front of `ray start` (token auth, RAY_JOB_STOP_WAIT_TIME_S) -- in a copy of the
repo's layout (jobs/ with the quickstart YAML shortened, data/quickstart/ made by
tools/make_quickstart_data.py), so a job's relative paths mean that folder as they mean the repo
for a user. The auth token is the test's own (RAY_AUTH_TOKEN), never this machine's
~/.ray/auth_token. Before each test the head must answer and run no job (a job left running by a
failed test is stopped), so one failure names itself only; waits end on a stall of progress (no
new step, checkpoint or file for minutes), not on a fixed wall clock.

The head is started with the S3 endpoint variables pointing at a dead local port, and each S3
job's driver alone gets the real endpoint (in its entrypoint): the workers reach S3 only if
launch.py forwards the driver's endpoint settings to them, and nothing can fall back to real AWS.

Scenarios (quickstart_vision on the quickstart digits, 2 workers, DeepSpeed stage 0):
- README commands, as written but for the address: submit --no-wait, follow the logs, `ray job
  stop` mid-run (a checkpoint of the stop step appears, the job ends STOPPED), submit again (it
  resumes from that step) -> the final loss equals the uninterrupted run's bit for bit.
- A misspelt model.name through the README's submit command: one clear line, no traceback, no
  worker group started, nothing written.
- baseline (data, checkpoints, Ray's storage and TensorBoard in S3): uninterrupted; then the same
  YAML again -> resumes at the end instead of restarting.
- interrupted: one training worker SIGKILLed after the first checkpoint (Ray restarts the worker
  group, which resumes from the newest complete checkpoint), later the job's driver SIGKILLed
  (the whole job dies), then the same YAML submitted again -> it finishes from the object store
  with the baseline's final loss, bit for bit.
- chaos: seeded SIGKILLs and SIGTERMs to a random training worker at a random moment of each
  worker group (set-up, resume, steps, a checkpoint being uploaded); Ray Train restarts the group
  each time (scaling.max_failures) -> the job succeeds with the baseline's final weights, bit for
  bit. Its SIGTERM during training also checks what a SIGTERM to a worker must do: every rank
  finishes the step and checkpoints it, and the next group resumes from exactly that step.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, free_port
from pnet_dist.launch import RESULT_PREFIX
from pnet_dist.metrics import read_scalars
from pnet_dist.storage import open_storage

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).parent / "ray")
MAX_STEPS = 200
EVERY_STEPS = 20
STALL_S = 300.0          # a wait fails when nothing moved for this long
# Unroutable on purpose: a worker that did not get the driver's endpoint fails here, locally.
DEAD_ENDPOINT = "127.0.0.1:9"
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "S3_ENDPOINT", "S3_USE_HTTPS",
                 "S3_VERIFY_SSL")
README_MARKER = "<!-- e2e: local head -->"
README_ADDRESS = "http://127.0.0.1:8265"
AUTH_TOKEN = secrets.token_hex(32)


# -- the README's commands ----------------------------------------------------------------------
def readme_local_head() -> dict:
    """The README's "On this machine" block: {"env": exports, "start_env": variables in front of
    `ray start`, "submit_nowait", "logs", "stop", "resubmit": argv lists}."""
    text = (REPO / "README.md").read_text()
    assert README_MARKER in text, f"README.md lost its {README_MARKER} block"
    block = text.split(README_MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    commands = [argv for argv in commands if argv]
    found: dict = {"env": {}, "start_env": {}, "submits": []}
    for argv in commands:
        if argv[0] == "export":
            found["env"].update(item.split("=", 1) for item in argv[1:])
        elif "ray" in argv and argv[argv.index("ray") + 1] == "start":
            found["start_env"] = dict(item.split("=", 1) for item in argv[:argv.index("ray")])
            assert "--head" in argv
        elif argv[:3] == ["ray", "job", "submit"]:
            found["submits"].append(argv)
        elif argv[:3] == ["ray", "job", "logs"]:
            found["logs"] = argv
        elif argv[:3] == ["ray", "job", "stop"]:
            found["stop"] = argv
    assert len(found["submits"]) == 2 and "--no-wait" in found["submits"][0] and "--no-wait" not in found["submits"][1]
    found["submit_nowait"], found["resubmit"] = found.pop("submits")
    assert found["env"].get("RAY_AUTH_MODE") == "token" and int(found["start_env"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    return found


def at_address(argv: list[str], address: str) -> list[str]:
    """A README command with the test head's address, run by this environment's `ray`."""
    assert argv[argv.index("--address") + 1] == README_ADDRESS
    return [RAY if arg == "ray" and i == 0 else address if argv[i - 1] == "--address" else arg
            for i, arg in enumerate(argv)]


README = readme_local_head()


def cli_env() -> dict[str, str]:
    """The environment of the README's shell: its exports, and the test's auth token."""
    return {**os.environ, **README["env"], "RAY_AUTH_TOKEN": AUTH_TOKEN}


# -- the cluster -------------------------------------------------------------------------------
class RayHead:
    """`ray start --head --block` on 127.0.0.1 in its own temp dir; every process it spawns carries
    a marker variable, so teardown ends exactly those (never `ray stop`, which ends every Ray on
    the machine). cwd is where jobs without a working_dir run; extra_env goes to `ray start`."""

    def __init__(self, cwd: str | os.PathLike | None = None, extra_env: dict[str, str] | None = None):
        self.marker = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="ray_e2e_", dir="/tmp")   # short: Ray's socket paths
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{free_port()}"
        self.extra_env = dict(extra_env or {})
        # PATH keeps its order (the venv's bin first, as `source .venv/bin/activate` puts it): the
        # workers' DeepSpeed JIT builds must find the same `ninja` as the other tests'.
        env = {k: v for k, v in os.environ.items() if k not in ENDPOINT_VARS}
        env.update(AWS_ENDPOINT_URL_S3=f"http://{DEAD_ENDPOINT}", S3_ENDPOINT_URL=f"http://{DEAD_ENDPOINT}",
                   S3_ENDPOINT=DEAD_ENDPOINT, S3_USE_HTTPS="0", PNET_E2E_CLUSTER=self.marker,
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        env.update(self.extra_env)
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
            cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def env(self) -> dict[str, str]:
        """The environment for ray CLI calls to this head."""
        return {**os.environ, **{k: v for k, v in self.extra_env.items() if k.startswith("RAY_AUTH")}}

    def api(self, path: str, method: str = "GET") -> dict | list:
        request = urllib.request.Request(f"{self.address}{path}", method=method)
        if self.extra_env.get("RAY_AUTH_TOKEN"):
            request.add_header("Authorization", f"Bearer {self.extra_env['RAY_AUTH_TOKEN']}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: "
                                   f"{Path(self.log.name).read_text()[-3000:]}")
            try:
                self.api("/api/version")
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
            proc = subprocess.run([RAY, "job", "submit", "--address", self.address, "--", "true"],
                                  capture_output=True, text=True, timeout=60, env=self.env())
            if proc.returncode == 0:
                return
            if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"cannot submit a job to {self.address}:\n{proc.stdout}{proc.stderr}")
            time.sleep(1)

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def stop_leftover_jobs(self, timeout_s: float = 120.0) -> list[str]:
        """Stop every job still pending or running (a failed test's); returns their ids."""
        leftovers = [job["submission_id"] for job in self.api("/api/jobs/")
                     if job["status"] in ("PENDING", "RUNNING") and job.get("submission_id")]
        for submission_id in leftovers:
            self.api(f"/api/jobs/{submission_id}/stop", method="POST")
        deadline = time.monotonic() + timeout_s
        while any(self.job_status(i) in ("PENDING", "RUNNING") for i in leftovers):
            assert time.monotonic() < deadline, f"jobs {leftovers} did not stop in {timeout_s:.0f}s"
            time.sleep(1)
        return leftovers

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


# -- a copy of the repo's layout, and the data ----------------------------------------------------
def shorten(job: dict) -> dict:
    """A quickstart job that runs MAX_STEPS steps and checkpoints often (same schedule for every run)."""
    job["train"].update(max_steps=MAX_STEPS, log_every_steps=EVERY_STEPS // 2, eval_every_steps=0)
    job["optim"]["warmup_steps"] = 5
    job["checkpoint"].update(every_steps=EVERY_STEPS, keep_last=3)
    job["metrics"].update(log_every_steps=EVERY_STEPS, sync_every_s=1.0)
    return job


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """jobs/quickstart_vision.yaml (shortened; still executable with its first line) and
    data/quickstart/ made by the README's tool, in a folder laid out like the repo."""
    root = tmp_path_factory.mktemp("repo")
    source = (REPO / "jobs" / "quickstart_vision.yaml").read_text()
    shebang = source.splitlines()[0]
    (root / "jobs").mkdir()
    job_file = root / "jobs" / "quickstart_vision.yaml"
    job_file.write_text(shebang + "\n" + yaml.safe_dump(shorten(yaml.safe_load(source)), sort_keys=False))
    job_file.chmod(0o755)
    subprocess.run([sys.executable, str(REPO / "tools" / "make_quickstart_data.py"), "--out", "data/quickstart"],
                   cwd=root, check=True, capture_output=True, timeout=900)
    return root


@pytest.fixture(scope="module")
def ray_head(s3_server, repo_copy):
    head = RayHead(cwd=repo_copy, extra_env={**README["env"], **README["start_env"], "RAY_AUTH_TOKEN": AUTH_TOKEN})
    try:
        head.wait_ready()
        head.wait_for_job_agent()
        yield head
    finally:
        head.stop()


@pytest.fixture(autouse=True)
def healthy_head(request):
    """Before each test that uses the head: it answers and runs no job of an earlier test."""
    if "ray_head" not in request.fixturenames:
        yield
        return
    head = request.getfixturevalue("ray_head")
    assert head.proc.poll() is None, f"the Ray head died: {Path(head.log.name).read_text()[-3000:]}"
    head.api("/api/version")
    stopped = head.stop_leftover_jobs()
    if stopped:
        print(f"stopped jobs left running by an earlier test: {stopped}")
    yield


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3
    name = f"e2e-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def quickstart_data(bucket, repo_copy):
    """The same digit shards in S3 (a copy of the local ones, so every run trains on the same bytes)."""
    out = f"{bucket}/quickstart"
    local = repo_copy / "data" / "quickstart" / "images"
    target = open_storage(f"{out}/images")
    for path in local.rglob("*"):
        if path.is_file():
            target.put_file(path, str(path.relative_to(local)))
    return out


@pytest.fixture(scope="module")
def job_yaml(tmp_path_factory, quickstart_data, bucket):
    """quickstart_vision with its data and run folder in S3, shortened as in the repo copy."""
    job = shorten(yaml.safe_load((REPO / "jobs" / "quickstart_vision.yaml").read_text()))
    job["data"].update(train_uri=f"{quickstart_data}/images/train", eval_uri=f"{quickstart_data}/images/val",
                       cache_dir=str(tmp_path_factory.mktemp("streaming_cache")))
    job["checkpoint"]["uri"] = f"{bucket}/runs"
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


def run_until_done(argv: list[str], cwd, env, what: str) -> subprocess.CompletedProcess:
    """Run a blocking command; fail if its output stalls for STALL_S (it prints as training goes)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = LineReader(proc)
    reader.wait_until(lambda: proc.poll() is not None, what)
    reader.join()
    return subprocess.CompletedProcess(argv, proc.returncode, reader.text(), "")


def submit(head: RayHead, job_yaml: Path, run_name: str) -> tuple[dict, str]:
    """Submit and wait; returns (the driver's result line, the job's output)."""
    proc = run_until_done(submit_command(head, job_yaml, run_name, f"{run_name}-{uuid.uuid4().hex[:6]}"),
                          REPO, head.env(), f"job {run_name}")
    assert proc.returncode == 0, f"job failed:\n{proc.stdout[-6000:]}"
    return parse_result(proc.stdout), proc.stdout


def parse_result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, f"expected one result line:\n{output[-6000:]}"
    return json.loads(lines[0][len(RESULT_PREFIX):])


class LineReader:
    """Collects a process's output in a thread, so tests can wait on what it prints."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self.changed_at = time.monotonic()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.changed_at = time.monotonic()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition, what: str, progress=None) -> None:
        """Until condition() holds; fails when neither the output nor progress() changed for STALL_S."""
        last = progress() if progress else None
        moved_at = time.monotonic()
        while not condition():
            now = progress() if progress else None
            if now != last:
                last, moved_at = now, time.monotonic()
            if time.monotonic() - max(moved_at, self.changed_at) > STALL_S:
                raise AssertionError(f"{what}: no progress for {STALL_S:.0f}s:\n{self.text()[-6000:]}")
            time.sleep(0.2)

    def join(self) -> None:
        self._thread.join(timeout=30)


def complete_steps(run_uri: str) -> list[int]:
    keys = open_storage(run_uri).list("ckpt")
    return sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"ckpt/step_(\d+)/COMPLETE", k)))


def run_folder_progress(run_uri: str) -> tuple:
    """Changes whenever the run writes anything (checkpoint parts, TensorBoard events)."""
    sizes = open_storage(run_uri).list_sizes()
    return len(sizes), sum(sizes.values())


def wait_for_checkpoint(run_uri: str, at_least: int, job: subprocess.Popen, reader: LineReader) -> int:
    found: list[int] = []

    def reached() -> bool:
        found[:] = complete_steps(run_uri)
        assert job.poll() is None, f"the job ended before checkpoint {at_least}:\n{reader.text()[-6000:]}"
        return bool(found) and found[-1] >= at_least
    reader.wait_until(reached, f"waiting for checkpoint {at_least} under {run_uri}",
                      progress=lambda: run_folder_progress(run_uri))
    return found[-1]


def start_job(head: RayHead, job_yaml: Path, run_name: str) -> tuple[subprocess.Popen, LineReader]:
    """`ray job submit` in the background, its output collected."""
    proc = subprocess.Popen(submit_command(head, job_yaml, run_name, f"{run_name}-{uuid.uuid4().hex[:6]}"),
                            cwd=REPO, env=head.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, LineReader(proc)


def training_workers_after_first_checkpoint(head: RayHead, run_uri: str, job, reader) -> list[psutil.Process]:
    wait_for_checkpoint(run_uri, EVERY_STEPS, job, reader)
    workers = head.processes(name="ray::RayTrainWorker")
    assert len(workers) == 2, [w.cmdline() for w in workers]
    return workers


def logged_steps(text: str) -> list[int]:
    return [int(step) for step in re.findall(rf"step (\d+)/{MAX_STEPS} loss", text)]


@pytest.fixture(scope="module")
def baseline(ray_head, job_yaml, bucket):
    """The uninterrupted run: (result, run folder URI)."""
    result, _ = submit(ray_head, job_yaml, "baseline")
    return result, f"{bucket}/runs/baseline"


# -- the README's commands -------------------------------------------------------------------------
def test_readme_submit_of_a_misspelt_model_fails_at_once_with_one_line(ray_head, repo_copy):
    """The README's submit command with model.name misspelt: the driver's pre-flight refuses it
    before any worker group starts, in one line, and writes nothing."""
    submit_argv = [arg for arg in at_address(README["resubmit"], ray_head.address)]
    submit_argv[submit_argv.index("--submission-id") + 1] = f"typo-{uuid.uuid4().hex[:6]}"
    before = sorted(str(p.relative_to(repo_copy)) for p in repo_copy.rglob("*"))
    started = time.monotonic()
    proc = run_until_done(submit_argv + ["model.name=parameternet_60m"], repo_copy, cli_env(), "the typo job")
    elapsed = time.monotonic() - started
    output = proc.stdout
    assert proc.returncode != 0, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("pnet_dist.launch: error:")]
    assert errors and all(line == errors[0] for line in errors), output[-4000:]   # Ray repeats the log tail
    assert "model.name: unknown model 'parameternet_60m'; registered models: " in errors[0]
    assert "Traceback" not in output, output[-4000:]
    assert "worker group" not in output.lower() and not ray_head.processes(name="ray::RayTrainWorker")
    assert sorted(str(p.relative_to(repo_copy)) for p in repo_copy.rglob("*")) == before, "nothing may be written"
    print(f"misspelt model.name: job failed {elapsed:.1f}s after `ray job submit` started, with: {errors[0]}")


def test_readme_commands_submit_follow_stop_and_resume_bit_exactly(ray_head, repo_copy, baseline):
    env = cli_env()
    run_dir = repo_copy / "runs" / "quickstart_vision"
    submission_id = README["submit_nowait"][README["submit_nowait"].index("--submission-id") + 1]

    # 1. Submit without waiting, and follow the logs as the README says.
    proc = subprocess.run(at_address(README["submit_nowait"], ray_head.address), cwd=repo_copy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = subprocess.Popen(at_address(README["logs"], ray_head.address), cwd=repo_copy, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = LineReader(logs)
    try:
        # 2. Mid-run (past the first periodic checkpoint), `ray job stop`.
        reader.wait_until(lambda: max(logged_steps(reader.text()) or [0]) >= EVERY_STEPS + EVERY_STEPS // 2,
                          "waiting for training steps in `ray job logs --follow`",
                          progress=lambda: logged_steps(reader.text()))
        assert logs.poll() is None, reader.text()[-6000:]
        stop = subprocess.run(at_address(README["stop"], ray_head.address), cwd=repo_copy, env=env,
                              capture_output=True, text=True, timeout=600)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        reader.wait_until(lambda: logs.poll() is not None, "`ray job logs --follow` after the stop")
        reader.join()
    finally:
        if logs.poll() is None:
            logs.kill()
    followed = reader.text()
    assert ray_head.job_status(submission_id) == "STOPPED", followed[-6000:]
    stopped = [int(step) for step in re.findall(r"stop requested \(SIGTERM to the job's driver \(ray job stop\)\): "
                                                r"checkpointed step (\d+)", followed)]
    assert stopped and len(set(stopped)) == 1, followed[-6000:]   # logged by each rank whose watcher was first
    stop_step = stopped[0]
    assert EVERY_STEPS < stop_step < MAX_STEPS, f"stopped at {stop_step}: lengthen the run"
    assert (run_dir / "ckpt" / f"step_{stop_step:08d}" / "COMPLETE").is_file(), \
        f"no checkpoint of the stop step {stop_step} in the repo's runs/: {sorted(os.listdir(run_dir / 'ckpt'))}"
    assert "stopped by SIGTERM at step" in followed and "RETRY" not in followed, followed[-6000:]

    # 3. The README's second submit resumes from the stop step and ends where the baseline did.
    proc = run_until_done(at_address(README["resubmit"], ray_head.address), repo_copy, env, "the resubmitted job")
    assert proc.returncode == 0, proc.stdout[-6000:]
    result = parse_result(proc.stdout)
    assert result["resumed_from"] == stop_step and result["step"] == MAX_STEPS
    assert result["loss"] == baseline[0]["loss"], "stopped and resumed training must reproduce the uninterrupted loss"
    assert result["eval"] == baseline[0]["eval"]
    print(f"README commands: `ray job stop` at step {stop_step} wrote {run_dir}/ckpt/step_{stop_step:08d}; "
          f"the second submit resumed from it and ended with loss {result['loss']!r} "
          f"(uninterrupted: {baseline[0]['loss']!r})")


def test_cluster_form_runs_the_job_file_and_refuses_relative_paths_in_the_working_dir_copy(ray_head):
    """The README's cluster command form (`--runtime-env jobs/runtime_env.yaml jobs/X.yaml`, the
    repo uploaded as working_dir) runs the executable job file; the quickstart's relative paths
    would then point into Ray's temporary copy, which the driver refuses in one line."""
    argv = [RAY, "job", "submit", "--address", ray_head.address, "--submission-id", f"wd-{uuid.uuid4().hex[:6]}",
            "--runtime-env", "jobs/runtime_env.yaml", "jobs/quickstart_vision.yaml"]
    proc = run_until_done(argv, REPO, cli_env(), "the working_dir job")
    errors = [line for line in proc.stdout.splitlines() if line.startswith("pnet_dist.launch: error: ")]
    assert proc.returncode != 0 and errors, proc.stdout[-4000:]
    assert re.search(r"jobs/quickstart_vision.yaml: data.train_uri=data/quickstart/images/train is a relative local "
                     r"path, but this job runs in Ray's temporary copy of its working_dir \(.*_ray_pkg_", errors[0])
    assert "Traceback" not in proc.stdout


def test_a_data_error_in_the_workers_ends_the_job_without_restarts(ray_head, repo_copy):
    """A shard damaged after conversion passes the pre-flight (its dataset.json and index are fine)
    and fails in the workers with a ValueError: the job ends at once with that error, although the
    job allows scaling.max_failures restarts."""
    broken = repo_copy / "data" / "broken"
    shutil.copytree(repo_copy / "data" / "quickstart" / "images" / "train", broken)
    for shard in broken.rglob("shard.*.mds"):
        shard.write_bytes(shard.read_bytes()[:1000])
    argv = at_address(README["resubmit"], ray_head.address)
    argv[argv.index("--submission-id") + 1] = f"broken-{uuid.uuid4().hex[:6]}"
    proc = run_until_done(argv + ["run_name=broken", "data.train_uri=data/broken", "scaling.max_failures=3"],
                          repo_copy, cli_env(), "the job on a damaged shard")
    output = proc.stdout
    assert proc.returncode != 0, output[-6000:]
    errors = [line for line in output.splitlines() if line.startswith("pnet_dist.launch: error: ")]
    assert errors and "run broken: rank " in errors[0] and "not retried" in errors[0], output[-6000:]
    assert "truncated or damaged" in errors[0] or "shard" in errors[0], errors[0]
    assert "RETRY" not in output, f"a data error must not restart the worker group:\n{output[-6000:]}"
    print(f"damaged shard: {errors[0][:300]}")


# -- failures Ray Train recovers from ------------------------------------------------------------
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
    job, reader = start_job(ray_head, job_yaml, "interrupted")
    try:
        # 1. A worker dies: Ray Train restarts the worker group inside the same job.
        workers = training_workers_after_first_checkpoint(ray_head, run_uri, job, reader)
        workers[0].send_signal(signal.SIGKILL)
        killed_time = time.monotonic()
        killed_at = complete_steps(run_uri)[-1]
        assert killed_at < MAX_STEPS - EVERY_STEPS, "the run got too far before the kill; lengthen it"

        # 2. The restarted group checkpoints further; then the whole job dies with its driver.
        reached = wait_for_checkpoint(run_uri, killed_at + 2 * EVERY_STEPS, job, reader)
        restart_s = time.monotonic() - killed_time
        assert reached < MAX_STEPS, "the run finished before the driver was killed; lengthen it"
        drivers = ray_head.processes("pnet_dist.launch", "run_name=interrupted", program=sys.executable)
        assert len(drivers) == 1, [d.cmdline() for d in drivers]
        drivers[0].send_signal(signal.SIGKILL)
        reader.wait_until(lambda: job.poll() is not None, "`ray job submit` after the driver was killed")
        reader.join()
    finally:
        if job.poll() is None:
            job.kill()
    output = reader.text()
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


def test_a_request_the_cluster_cannot_hold_fails_with_the_fix(ray_head):
    job = str(REPO / "jobs" / "quickstart_vision.yaml")
    code = ("import ray\nfrom pnet_dist import launch\nfrom pnet_dist.config import load_config\n"
            f"assert not launch.connect_ray({ray_head.gcs_address!r}), 'an address means connect, never start'\n"
            f"assert ray.get_runtime_context().gcs_address == {ray_head.gcs_address!r}\n"
            f"launch.check_local_capacity(load_config({job!r}))\n"
            f"launch.check_local_capacity(load_config({job!r}, ['scaling.num_workers=3']))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"ValueError: scaling: 3 workers x 1 CPU = 3 CPU.*has 2.*scaling.num_workers", proc.stderr), \
        proc.stderr[-3000:]


# -- random kills under Ray: seeded SIGKILL / SIGTERM at random moments of each worker group ------
CHAOS_SEED = 12     # steps SIGTERM, resume SIGKILL, save SIGKILL, set-up SIGTERM


def chaos_plan(seed: int) -> list[dict]:
    """One kill per worker group, drawn from the seed: the moment (the resume never first: the
    first group has nothing to resume), which of the two workers, SIGKILL or SIGTERM (two each),
    and how far into the moment."""
    import random
    rng = random.Random(seed)
    kinds = rng.sample(["set-up", "steps", "save"], 3)
    kinds.insert(rng.randint(1, 3), "resume")
    signals = rng.sample(["SIGKILL", "SIGKILL", "SIGTERM", "SIGTERM"], 4)
    return [{"moment": kind, "worker": rng.randrange(2), "signal": sig,
             "delay_s": round(rng.uniform(0.5, 4.0), 2)}
            for kind, sig in zip(kinds, signals)]


def chaos_moment(kill: dict, reader: LineReader, offset: int, run_uri: str, started: float):
    """A condition for the kill's moment in the group whose output starts at `offset`: set-up
    (delay_s after its workers appeared), resume (it loaded a checkpoint, or, with none complete,
    logged its first step), steps (delay_s after its first logged step), save (a new checkpoint
    folder appeared in the object store: being uploaded or committed)."""
    def new_output() -> str:
        return reader.text()[offset:]
    if kill["moment"] == "set-up":
        return lambda: time.monotonic() - started >= kill["delay_s"]
    if kill["moment"] == "resume":
        return lambda: re.search(rf"resumed from checkpoint step|step \d+/{MAX_STEPS} loss", new_output())
    if kill["moment"] == "steps":
        first_step: list[float] = []

        def after_steps() -> bool:
            if not first_step and re.search(rf"step \d+/{MAX_STEPS} loss", new_output()):
                first_step.append(time.monotonic())
            return bool(first_step) and time.monotonic() - first_step[0] >= kill["delay_s"]
        return after_steps

    def folders() -> set[str]:
        return {key.split("/")[1] for key in open_storage(run_uri).list("ckpt/")}
    before = folders()
    return lambda: bool(folders() - before)


def test_random_kills_under_ray_end_bit_equal_to_the_uninterrupted_run(ray_head, job_yaml, bucket, baseline):
    """Seeded SIGKILLs and SIGTERMs to random training workers at random moments (set-up, resume,
    steps, checkpoint uploads): Ray Train restarts the group each time (scaling.max_failures),
    and the job ends with the uninterrupted run's final weights, bit for bit."""
    from pnet_dist.export import consolidated_state_dict
    plan = chaos_plan(CHAOS_SEED)
    run_uri = f"{bucket}/runs/chaos"
    argv = submit_command(ray_head, job_yaml, "chaos", f"chaos-{uuid.uuid4().hex[:6]}") + [
        f"scaling.max_failures={len(plan)}", f"train.log_every_steps={EVERY_STEPS // 4}"]
    started_test = time.monotonic()
    job = subprocess.Popen(argv, cwd=REPO, env=ray_head.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    reader = LineReader(job)
    seen: set[int] = set()
    kills = []
    try:
        for group, kill in enumerate(plan):
            workers: list[psutil.Process] = []

            def new_group(workers=workers) -> bool:
                workers[:] = [w for w in ray_head.processes(name="ray::RayTrainWorker") if w.pid not in seen]
                return len(workers) == 2 or job.poll() is not None
            reader.wait_until(new_group, f"chaos: worker group {group}", progress=lambda: run_folder_progress(run_uri))
            if job.poll() is not None:
                break
            started, offset = time.monotonic(), len(reader.text())
            moment_reached = chaos_moment(kill, reader, offset, run_uri, started)
            reader.wait_until(lambda reached=moment_reached: reached() or job.poll() is not None,
                              f"chaos: {kill['moment']} of group {group}", progress=lambda: run_folder_progress(run_uri))
            if job.poll() is not None:
                break
            seen.update(w.pid for w in workers)
            before = complete_steps(run_uri)
            try:
                sorted(workers, key=lambda w: w.pid)[kill["worker"]].send_signal(getattr(signal, kill["signal"]))
            except psutil.NoSuchProcess:
                break
            kills.append({**kill, "group": group, "after_s": round(time.monotonic() - started, 1),
                          "newest_complete_before": before[-1] if before else None})
        reader.wait_until(lambda: job.poll() is not None, "chaos: the job after the last kill",
                          progress=lambda: run_folder_progress(run_uri))
        reader.join()
    finally:
        if job.poll() is None:
            job.kill()
    output = reader.text()
    assert job.returncode == 0, f"job failed:\n{output[-6000:]}"
    result = parse_result(output)
    resumes = [int(step) for step in re.findall(r"resumed from checkpoint step (\d+)", output)]
    stops = [int(step) for step in re.findall(r"stop requested \(SIGTERM\): checkpointed step (\d+)", output)]
    weights, _ = consolidated_state_dict(run_uri)
    reference, _ = consolidated_state_dict(baseline[1])
    different = [name for name in reference if not torch_equal(reference[name], weights[name])]
    for kill in kills:
        print(f"group {kill['group']}: {kill['signal']} to worker {kill['worker']} during {kill['moment']}, "
              f"{kill['after_s']}s after the group's workers appeared (newest complete checkpoint then: "
              f"{kill['newest_complete_before']})")
    print(f"SIGTERM stops that checkpointed their step: {stops}; resumes (both ranks): {resumes}")
    print(f"chaos job: {len(kills)} kills, final step {result['step']}, loss {result['loss']!r} (uninterrupted "
          f"{baseline[0]['loss']!r}); {len(reference)} weight tensors, {len(different)} differ bit-wise; eval "
          f"equal: {result['eval'] == baseline[0]['eval']}; {time.monotonic() - started_test:.0f}s")
    assert len(kills) == len(plan), f"the job finished after {len(kills)} kills; lengthen it"
    for kill in kills:  # SIGTERM while training: every rank finished the step, checkpointed it, and
        if kill["signal"] == "SIGTERM" and kill["moment"] == "steps":  # the next group resumed there
            after = [step for step in stops if step > (kill["newest_complete_before"] or 0)]
            assert after and after[0] in resumes and after[0] < MAX_STEPS, (kill, stops, resumes)
    assert result["step"] == MAX_STEPS and not result["preempted"]
    assert set(weights) == set(reference) and not different, different
    assert result["loss"] == baseline[0]["loss"] and result["eval"] == baseline[0]["eval"]


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)
