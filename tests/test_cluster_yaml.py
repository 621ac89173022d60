"""Every cluster-launcher YAML in cluster/ passes Ray's own schema and keeps the promised shape."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.unit

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
CLUSTER_YAMLS = sorted(CLUSTER_DIR.glob("*.yaml"))


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def test_cluster_dir_has_aws_and_local():
    assert {p.name for p in CLUSTER_YAMLS} >= {"aws.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_ray_schema(path):
    # prepare_config is what `ray up` runs before validating: it merges the provider defaults.
    validate_config(prepare_config(load(path)))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_setup_installs_the_package(path):
    config = load(path)
    commands = " ; ".join(config["setup_commands"])
    assert re.search(r"pip install (--python \S+ )?-e ~/pnet_dist", commands)
    assert config["file_mounts"]["~/pnet_dist"] == "."


def test_aws_head_on_demand_and_gpu_workers_on_spot():
    config = load(CLUSTER_DIR / "aws.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for node_type in workers.values():
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]


def test_local_cluster_stays_on_loopback():
    config = load(CLUSTER_DIR / "local.yaml")
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    start = " ".join(config["head_start_ray_commands"])
    assert "--node-ip-address=127.0.0.1" in start and "--dashboard-host=127.0.0.1" in start


def test_schema_rejects_a_misspelled_key():
    config = copy.deepcopy(load(CLUSTER_DIR / "aws.yaml"))
    config["available_node_types"]["gpu_spot"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


# -- cluster/aws.yaml as Ray would start it, offline -------------------------------------------------
# What the image is (its name, region, glibc, CUDA), as recorded when it was chosen (not checked
# against AWS from here: README says to confirm the id with `aws ssm get-parameter`); a new ImageId in
# aws.yaml needs its line here, so the checks below follow the image.
AMI_FACTS = {
    "ami-028357be7d5b15c53": dict(name="Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) 20261006",
                                  region="us-east-1", glibc=(2, 39), cuda=(13, 2), python="3.11"),
}


def test_aws_nodes_share_the_setup_auth_stop_time_and_a_node_local_build_cache():
    config = load(CLUSTER_DIR / "aws.yaml")
    assert not config["head_setup_commands"] and not config["worker_setup_commands"], \
        "every node installs the same packages: setup_commands only"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for start in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        env = dict(re.findall(r"(RAY_AUTH_MODE|RAY_JOB_STOP_WAIT_TIME_S|TORCH_EXTENSIONS_DIR)=(\S+)", start))
        assert env["RAY_AUTH_MODE"] == "token"
        assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 120
        assert env["TORCH_EXTENSIONS_DIR"].startswith("/tmp/"), "each node builds DeepSpeed's ops on its own disk"
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]


def test_aws_bootstrap_gives_every_node_an_instance_profile_and_the_image(tmp_path, monkeypatch):
    """Ray's own AWS bootstrap (what `ray up` runs) against moto's EC2/IAM, offline."""
    from moto import mock_aws
    from ray.autoscaler._private.aws.config import bootstrap_aws

    monkeypatch.setenv("HOME", str(tmp_path))   # the bootstrap writes the SSH key it creates to ~/.ssh
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    config = prepare_config(load(CLUSTER_DIR / "aws.yaml"))
    validate_config(config)
    with mock_aws():
        booted = bootstrap_aws(config)
    types = booted["available_node_types"]
    head, worker = types[booted["head_node_type"]]["node_config"], types["gpu_spot"]["node_config"]
    print("gpu_spot node_config after bootstrap_aws:\n" + json.dumps(worker, indent=1, default=str))
    assert head["IamInstanceProfile"] == {"Name": "pnet-dist-head"}
    assert worker["IamInstanceProfile"] == {"Name": "pnet-dist-worker"}, "spot workers need S3 credentials too"
    assert worker["InstanceMarketOptions"]["MarketType"] == "spot" and "InstanceMarketOptions" not in head
    assert head["ImageId"] == worker["ImageId"] and worker["ImageId"] in AMI_FACTS
    assert AMI_FACTS[worker["ImageId"]]["region"] == booted["provider"]["region"]
    for node_config in (head, worker):
        assert node_config["SubnetIds"] and node_config["SecurityGroupIds"] and node_config["KeyName"]


def test_pinned_requirements_resolve_for_the_aws_image(tmp_path):
    """`pip install --dry-run` of setup.cfg's requirements for the image's platform: CPython 3.11
    on the image's glibc, binary wheels only, from this machine's package registry. DeepSpeed is
    published as source only (a pure-Python build on each node), so its own requirements stand in
    for it and its source release must exist."""
    import configparser
    import importlib.metadata

    from packaging.requirements import Requirement

    facts = AMI_FACTS[load(CLUSTER_DIR / "aws.yaml")["available_node_types"]["gpu_spot"]["node_config"]["ImageId"]]
    setup = configparser.ConfigParser()
    setup.read(CLUSTER_DIR.parent / "setup.cfg")
    requirements = [line.strip() for line in setup["options"]["install_requires"].splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    deepspeed = next(r for r in requirements if Requirement(r).name == "deepspeed")
    pip = [sys.executable, "-m", "pip"]
    source = subprocess.run([*pip, "download", "--no-deps", "--no-binary", ":all:", "--dest", str(tmp_path / "src"),
                             deepspeed], capture_output=True, text=True, timeout=600)
    if source.returncode and re.search(r"(?i)connection|network|timed out|unreachable|resolve", source.stdout +
                                       source.stderr):
        pytest.skip(f"the package registry is unreachable from here: {source.stderr.strip()[-300:]}")
    assert source.returncode == 0, source.stdout + source.stderr
    ds_requirements = [str(r) for r in map(Requirement, importlib.metadata.requires("deepspeed") or [])
                       if r.marker is None]
    major, minor = facts["glibc"]
    platforms = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)] + \
        ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [*pip, "install", "--dry-run", "--ignore-installed", "--target", str(tmp_path / "never"),
         "--only-binary=:all:", *(arg for p in platforms for arg in ("--platform", p)),
         "--python-version", facts["python"], "--implementation", "cp", "--quiet", "--report", str(report),
         *(r for r in requirements if r != deepspeed), *ds_requirements],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = {item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]}
    torch_wheel = installed["torch"]["download_info"]["url"].rsplit("/", 1)[-1]
    assert installed["torch"]["metadata"]["version"] == "2.14.1" and "cp311" in torch_wheel
    wheel_glibc = tuple(int(n) for n in re.search(r"manylinux_(\d+)_(\d+)_x86_64", torch_wheel).groups())
    assert wheel_glibc <= facts["glibc"], f"{torch_wheel} needs glibc {wheel_glibc}, the image has {facts['glibc']}"
    cuda_runtime = next(item for name, item in installed.items() if name.startswith("nvidia-cuda-runtime"))
    cuda = tuple(int(n) for n in cuda_runtime["metadata"]["version"].split(".")[:2])
    assert cuda[0] == facts["cuda"][0] and cuda <= facts["cuda"], \
        f"torch's CUDA runtime {cuda} does not fit the image's driver (CUDA {facts['cuda']})"
    print(f"resolved {len(installed)} packages for {facts['name']}: {torch_wheel}, "
          f"{cuda_runtime['metadata']['name']} {cuda_runtime['metadata']['version']}")
