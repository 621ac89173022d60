"""Every cluster-launcher YAML in cluster/ passes Ray's own schema and keeps the promised shape."""
from __future__ import annotations

import copy
import re
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
