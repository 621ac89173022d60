"""Every YAML in jobs/ loads (job configs through load_config, the runtime env through Ray) and
the production jobs carry the paper's recipe (arXiv 2306.14525)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv

from pnet_dist.config import load_config
from pnet_dist.models.registry import list_models

pytestmark = pytest.mark.unit

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
RUNTIME_ENV = JOBS_DIR / "runtime_env.yaml"
JOB_YAMLS = sorted(p for p in JOBS_DIR.glob("*.yaml") if p != RUNTIME_ENV)

IN22K_IMAGES = 14_197_122
IN1K_IMAGES = 1_281_167


def global_batch(cfg) -> int:
    return cfg.data.batch_size * cfg.scaling.num_workers * cfg.deepspeed.grad_accum_steps


def test_the_promised_jobs_exist():
    assert {p.name for p in JOB_YAMLS} >= {"in22k_pretrain.yaml", "in1k_finetune.yaml", "llama1b_pnet_pretrain.yaml",
                                            "quickstart_vision.yaml", "quickstart_lm.yaml"}


@pytest.mark.parametrize("path", JOB_YAMLS, ids=lambda p: p.name)
def test_job_is_an_executable_that_runs_the_launcher(path):
    """`ray job submit ... jobs/X.yaml` runs the file as a program: its first line (a YAML comment)
    must start the launcher, git must keep it executable, and the comments must show that command."""
    text = path.read_text()
    assert text.splitlines()[0] == "#!/usr/bin/env -S python3 -m pnet_dist.launch"
    assert os.access(path, os.X_OK)
    mode = subprocess.run(["git", "ls-files", "-s", path.name], cwd=JOBS_DIR, capture_output=True, text=True).stdout
    assert mode.startswith("100755"), f"git must record {path.name} as executable: {mode!r}"
    assert "python -m pnet_dist.launch" not in text, "show the literal command, not the old entrypoint"


@pytest.mark.parametrize("path", JOB_YAMLS, ids=lambda p: p.name)
def test_job_loads_and_names_a_registered_model(path):
    cfg = load_config(path)
    assert cfg.model.name in list_models()


def test_in22k_pretrain_follows_the_paper():
    cfg = load_config(JOBS_DIR / "in22k_pretrain.yaml")
    assert cfg.model.name == "parameternet_600m" and cfg.model.kwargs["num_classes"] == 21841
    assert cfg.data.train_uri.startswith("s3://") and cfg.checkpoint.uri.startswith("s3://")
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.scaling.use_gpu) == (0, "bf16", True)
    assert global_batch(cfg) == 4096
    assert cfg.optim.lr == pytest.approx(1e-3 * global_batch(cfg) / 4096)
    assert cfg.optim.weight_decay == 0.05
    steps_per_epoch = IN22K_IMAGES // global_batch(cfg)
    assert cfg.train.max_steps == 90 * steps_per_epoch
    assert cfg.optim.warmup_steps == 5 * steps_per_epoch
    assert (cfg.data.randaugment_ops, cfg.data.mixup_alpha, cfg.data.cutmix_alpha, cfg.data.label_smoothing) == \
        (2, 0.8, 1.0, 0.1)
    assert cfg.scaling.max_failures == -1, "a days-long spot run restarts its worker group without limit"


def test_in1k_finetune_starts_from_the_22k_run():
    pretrain = load_config(JOBS_DIR / "in22k_pretrain.yaml")
    cfg = load_config(JOBS_DIR / "in1k_finetune.yaml")
    assert cfg.model.name == pretrain.model.name and cfg.model.kwargs["num_classes"] == 1000
    assert cfg.train.init_from and pretrain.run_name in cfg.train.init_from
    assert cfg.optim.layer_decay == 0.5
    assert cfg.optim.lr == pytest.approx(2e-5 * global_batch(cfg) / 512)
    assert cfg.optim.weight_decay == 1e-8
    steps_per_epoch = IN1K_IMAGES // global_batch(cfg)
    assert cfg.train.max_steps == 30 * steps_per_epoch
    assert cfg.optim.warmup_steps == 5 * steps_per_epoch
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.scaling.use_gpu) == (0, "bf16", True)


def test_llama_pretrain_is_expert_parallel_zero2():
    cfg = load_config(JOBS_DIR / "llama1b_pnet_pretrain.yaml")
    assert cfg.scaling.max_failures == -1
    assert cfg.model.name == "pnet_llama_1b_up_e8" and cfg.data.kind == "text"
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.ep_size > 1
    assert 8 % cfg.deepspeed.ep_size == 0 and cfg.scaling.num_workers % cfg.deepspeed.ep_size == 0
    tokens = cfg.train.max_steps * global_batch(cfg) * cfg.data.seq_len
    assert tokens == pytest.approx(90e9, rel=0.01)
    assert cfg.train.moe_aux_coef == 0.01


@pytest.mark.parametrize("name", ["quickstart_vision.yaml", "quickstart_lm.yaml"])
def test_quickstart_runs_here(name):
    cfg = load_config(JOBS_DIR / name)
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    assert cfg.scaling.num_workers * cfg.scaling.cpus_per_worker <= 2
    # vision at stage 0 like the ImageNet jobs; the MoE LM at ZeRO-2 like llama1b_pnet_pretrain
    assert cfg.deepspeed.zero_stage == (0 if cfg.data.kind == "image" else 2)
    assert cfg.deepspeed.precision in ("fp32", "bf16")
    assert "://" not in cfg.checkpoint.uri and "://" not in cfg.data.train_uri
    assert cfg.model.name.endswith(("_debug", "_e4", "_e8")) and "debug" in cfg.model.name
    assert cfg.data.eval_uri is not None, "the quickstart prints held-out accuracy"


def test_runtime_env_passes_ray_validation():
    runtime_env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))   # what `ray job submit --runtime-env` reads
    assert set(runtime_env) <= RuntimeEnv.known_fields, "a misspelled field would be taken for a plugin"
    validated = RuntimeEnv(**runtime_env)
    assert validated["working_dir"] == "."
    assert {"TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS"} <= set(validated["env_vars"])
    assert int(validated["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 120, "`ray job stop` must leave time to checkpoint"
    assert not any("SECRET" in key or "ACCESS_KEY" in key for key in validated["env_vars"])


def test_ray_validation_catches_a_bad_runtime_env():
    with pytest.raises(TypeError, match="env_vars"):
        RuntimeEnv(env_vars={"OMP_NUM_THREADS": 1})
