"""Job config: strict typed loading, overrides, cross-field rules, the resolved YAML."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pnet_dist.config import JobConfig, config_to_dict, load_config, save_resolved

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parent / "configs"

MINIMAL = """
run_name: r1
model: {name: parameternet_debug}
data: {train_uri: "synthetic:"}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_with(tmp_path: Path, extra: str = "", overrides: tuple[str, ...] = ()) -> JobConfig:
    return load_config(write(tmp_path, MINIMAL + extra), overrides)


def test_minimal_job_gets_defaults_and_derived_values(tmp_path):
    cfg = load_with(tmp_path)
    assert cfg.run_name == "r1" and cfg.model.name == "parameternet_debug" and cfg.model.kwargs == {}
    assert cfg.deepspeed.zero_stage == 2 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.data.eval_batch_size == cfg.data.batch_size
    assert cfg.metrics.logdir == "runs/r1/tb" and cfg.run_uri == "runs/r1"


def test_every_test_config_loads():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("missing,key", [("run_name", "run_name"), ("model", "model.name"), ("data", "data.train_uri")])
def test_required_keys(tmp_path, missing, key):
    raw = yaml.safe_load(MINIMAL)
    del raw[missing]
    path = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=rf"{path}: {key} is required"):
        load_config(path)


@pytest.mark.parametrize("extra,key", [
    ("colour: red\n", "'colour'"),
    ("optim: {lrr: 0.1}\n", "'optim.lrr'"),
    ("deepspeed: {zero: 2}\n", "'deepspeed.zero'"),
])
def test_unknown_keys_name_file_and_key(tmp_path, extra, key):
    with pytest.raises(ValueError, match=rf"job.yaml: unknown key {key}"):
        load_with(tmp_path, extra)


@pytest.mark.parametrize("extra,key", [
    ("train: {max_steps: '10'}\n", "train.max_steps: expected an integer"),
    ("train: {max_steps: true}\n", "train.max_steps: expected an integer"),
    ("train: {max_steps: 1.5}\n", "train.max_steps: expected an integer"),
    ("optim: {lr: fast}\n", "optim.lr: expected a number"),
    ("optim: {betas: [0.9]}\n", r"optim.betas: expected a list of 2"),
    ("deepspeed: {zero_stage: 4}\n", "deepspeed.zero_stage: must be one of 0, 1, 2, 3"),
    ("deepspeed: {precision: fp8}\n", "deepspeed.precision: must be one of"),
    ("checkpoint: {async_upload: 1}\n", "checkpoint.async_upload: expected true or false"),
    ("model: {name: parameternet_debug, kwargs: [1]}\n", "model.kwargs: expected a mapping"),
    ("data: 3\n", "data: expected a mapping"),
])
def test_wrong_types_name_the_key(tmp_path, extra, key):
    with pytest.raises(ValueError, match=f"job.yaml: {key}"):
        load_with(tmp_path, extra)


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a learning rate written that way must still work.
    cfg = load_with(tmp_path, "optim: {lr: 1e-3, min_lr: 0}\n")
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.min_lr, float)


def test_overrides_are_typed_and_reach_free_form_dicts(tmp_path):
    cfg = load_with(tmp_path, overrides=("optim.lr=3e-4", "train.max_steps=20", "model.kwargs.num_classes=5",
                                         "deepspeed.raw.zero_optimization.overlap_comm=true",
                                         "data.eval_uri=synthetic:", "train.ema_decay=null"))
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 20 and cfg.model.kwargs == {"num_classes": 5}
    assert cfg.deepspeed.raw == {"zero_optimization": {"overlap_comm": True}}
    assert cfg.data.eval_uri == "synthetic:" and cfg.train.ema_decay is None


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("max_steps", "override 'max_steps' is not key=value"),
    ("run_name.x=1", "run_name is not a section"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_with(tmp_path, overrides=(override,))


@pytest.mark.parametrize("extra,key", [
    ("train: {eval_every_steps: 10}\n", "train.eval_every_steps: is set but data.eval_uri is not"),
    ("optim: {lr: 1.0e-3, min_lr: 1.0e-2}\n", "optim.min_lr"),
    ("optim: {warmup_steps: 1000}\n", "optim.warmup_steps"),
    ("train: {ema_decay: 0.999}\ndeepspeed: {zero_stage: 3}\n", "train.ema_decay: the EMA keeps full weights"),
    ("train: {ema_decay: 1.5}\n", "train.ema_decay: must be in"),
    ("deepspeed: {precision: fp16}\n", "deepspeed.precision: fp16 needs a GPU"),
    ("data: {train_uri: x, kind: text}\ndeepspeed: {ep_size: 2, zero_stage: 3}\n", "deepspeed.ep_size: expert parallelism does not combine"),
    ("deepspeed: {ep_size: 2}\n", "deepspeed.ep_size: expert parallelism is for MoE language models"),
    ("deepspeed: {zero_stage: 0, offload_optimizer: true}\n", "deepspeed.offload_optimizer: true needs ZeRO"),
    ("data: {train_uri: x, kind: text}\ndeepspeed: {zero_stage: 0, precision: bf16}\n",
     "deepspeed.zero_stage: 0 takes fp32 weights"),
    ("data: {train_uri: x, kind: text}\ndeepspeed: {zero_stage: 0, precision: fp32, ep_size: 2}\n",
     "deepspeed.zero_stage: 0 does not combine with expert parallelism"),
    ("data: {train_uri: x, kind: text}\nmodel: {name: m, kwargs: {num_experts: 4}}\ndeepspeed: {ep_size: 3}\n",
     r"deepspeed.ep_size: \(3\) must divide model.kwargs.num_experts"),
    ("deepspeed: {raw: {zero_optimization: {stage: 3}}}\n", "deepspeed.raw.zero_optimization.stage: is set by deepspeed.zero_stage"),
    ("deepspeed: {raw: {gradient_accumulation_steps: 4}}\n", "deepspeed.raw.gradient_accumulation_steps"),
    ("data: {train_uri: x, kind: text}\nmodel: {name: m, kwargs: {aux_loss_coef: 0.1}}\n", "model.kwargs.aux_loss_coef"),
    ("data: {train_uri: x, batch_size: 0}\n", "data.batch_size: must be > 0"),
    ("data: {train_uri: x, hflip: 2}\n", r"data.hflip: must be in \[0, 1\]"),
    ("run_name: a/b\n", "run_name: must be a non-empty name without '/'"),
])
def test_contradictions_are_errors_with_the_fix(tmp_path, extra, key):
    with pytest.raises(ValueError, match=f"job.yaml: {key}"):
        load_with(tmp_path, extra)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_with(tmp_path, "checkpoint: {uri: " + str(tmp_path / "runs") + "}\n",
                    overrides=("optim.betas=[0.9, 0.95]", "model.kwargs.drop_rate=0.1"))
    uri = save_resolved(cfg)
    assert uri == str(tmp_path / "runs" / "r1" / "config.yaml")
    again = load_config(uri)
    assert again == cfg and config_to_dict(again)["optim"]["betas"] == [0.9, 0.95]


def test_resolved_config_goes_to_s3(tmp_path, s3_bucket):
    from pnet_dist.storage import open_storage
    cfg = load_with(tmp_path, f"checkpoint: {{uri: {s3_bucket}/runs}}\n")
    assert cfg.metrics.logdir == f"{s3_bucket}/runs/r1/tb"
    save_resolved(cfg)
    text = open_storage(f"{s3_bucket}/runs/r1").get_bytes("config.yaml").decode()
    assert load_config(write(tmp_path, text, "back.yaml")) == cfg


def test_config_module_stays_light():
    import subprocess
    import sys
    code = "import sys, pnet_dist.config; print(sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("key", ["checkpoint.uri", "data.train_uri", "data.eval_uri", "metrics.logdir",
                                 "train.init_from"])
def test_uri_with_credentials_is_refused_without_echoing_them(tmp_path, key):
    uri = f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/prefix"
    with pytest.raises(ValueError) as info:
        load_with(tmp_path, overrides=(f"{key}={uri}",))
    message = str(info.value)
    assert f"job.yaml: {key}: s3://***@bucket/prefix carries credentials" in message
    assert "AKIAIOSFODNN7EXAMPLE" not in message and SECRET not in message and "wJalr" not in message


@pytest.mark.parametrize("key", ["deepspeed.raw.aws_secret_access_key", "deepspeed.raw.wandb.api_key",
                                 "model.kwargs.hf_token", "model.kwargs.auth.password",
                                 "deepspeed.raw.comms.AWS_SESSION_TOKEN"])
def test_credential_keys_in_free_form_mappings_are_refused_by_name(tmp_path, key):
    with pytest.raises(ValueError) as info:
        load_with(tmp_path, overrides=(f"{key}={SECRET}",))
    assert f"job.yaml: {key}: looks like a credential" in str(info.value) and SECRET not in str(info.value)


def test_token_counts_are_not_credentials(tmp_path):
    cfg = load_with(tmp_path, overrides=("model.kwargs.pad_token_id=0", "model.kwargs.max_tokens=8",
                                         "deepspeed.raw.moe.drop_tokens=true"))
    assert cfg.model.kwargs == {"pad_token_id": 0, "max_tokens": 8}
