"""Export a training checkpoint to plain PyTorch, and LLaMA variants to a Hugging Face-style folder.

Owns the consolidation of a checkpoint (any world size, ZeRO stage 0-3 or the MoE format) into one
fp32 state dict that `create_model(name, **kwargs).load_state_dict(...)` takes without DeepSpeed,
and the writing of the export folder:

    model_fp32.pt        the state dict (torch.save of {name: tensor})
    export.json          model name + kwargs, source checkpoint URI and step
    hf/                  (LLaMA variants, on request) a Hugging Face folder with weights, config,
                         tokenizer, generation config and, for the MoE variants, the model code
                         (pnet_dist.hf). The tokenizer is that of the text dataset the run trained
                         on: data.train_uri of the run's config.yaml, or the dataset given.

ZeRO shards are consolidated by DeepSpeed's zero_to_fp32 in a subprocess (DeepSpeed stays inside
the engine module); MoE-format checkpoints already hold full fp32 tensors per parameter, and a
stage-0 checkpoint the whole module in its model-states file.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

from pnet_dist.checkpoint import CKPT_DIR, CheckpointStore, step_dir_name
from pnet_dist.engine_checkpoint import FORMAT_MOE, client_state_name
from pnet_dist.hf import check_hf_supported, read_tokenizer, write_hf_folder
from pnet_dist.log import get_logger
from pnet_dist.models import create_model
from pnet_dist.storage import is_s3, open_storage

log = get_logger(__name__)

STATE_DICT_FILE = "model_fp32.pt"
EXPORT_INFO_FILE = "export.json"
HF_DIR = "hf"

def consolidated_state_dict(root_uri: str, step: int | None = None, *, ema_key: str | None = None,
                            strip_prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict, manifest) of checkpoint `step` (default: the newest complete one).

    ema_key: take the state dict stored under this key of rank 0's client_state (EMA weights)
    instead of the trained weights. strip_prefix: drop this prefix from every name (when the
    engine wrapped the model, e.g. "model.").
    """
    manager = CheckpointStore(root_uri)
    step = _resolve_step(manager, step)
    with tempfile.TemporaryDirectory(prefix="pnet_export_") as tmp:
        # The EMA weights are in rank 0's client_state alone: no need for the shards.
        wanted = (lambda rel: rel == client_state_name(0)) if ema_key is not None else (lambda rel: True)
        step_dir, manifest = manager.fetch(step, tmp, wanted)
        if ema_key is not None:
            client_state = torch.load(step_dir / client_state_name(0), map_location="cpu", weights_only=False)
            if ema_key not in client_state:
                raise ValueError(f"{manager.storage.uri(CKPT_DIR)}/{step_dir_name(step)}: rank 0's client_state has "
                                 f"no key {ema_key!r} (keys: {sorted(client_state)})")
            state_dict = dict(client_state[ema_key])
        elif manifest["format"] == FORMAT_MOE:
            state_dict = _moe_state_dict(step_dir)
        elif manifest["zero_stage"] == 0:
            state_dict = _unpartitioned_state_dict(step_dir)
        else:
            state_dict = _zero_to_fp32(step_dir, Path(tmp) / "fp32")
    if strip_prefix:
        missing = [name for name in state_dict if not name.startswith(strip_prefix)]
        if missing:
            raise ValueError(f"strip_prefix={strip_prefix!r}: {len(missing)} names do not start with it, "
                             f"e.g. {missing[:3]}")
        state_dict = {name[len(strip_prefix):]: t for name, t in state_dict.items()}
    state_dict = {name: t.float() if t.is_floating_point() else t for name, t in state_dict.items()}
    return state_dict, manifest


def _resolve_step(manager: CheckpointStore, step: int | None) -> int:
    if step is None:
        step = manager.latest_complete()
        if step is None:
            raise ValueError(f"no complete checkpoint under {manager.storage.uri(CKPT_DIR)}")
    return step


def _zero_to_fp32(step_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    cmd = [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(step_dir.parent), str(out_dir),
           "--tag", step_dir.name, "--max_shard_size", "100000GB"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"zero_to_fp32 failed on {step_dir} (exit {result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-4000:]}")
    files = sorted(out_dir.glob("*.bin"))
    assert len(files) == 1, f"zero_to_fp32 wrote {files}, expected one file"
    return torch.load(files[0], map_location="cpu", weights_only=True)


def _unpartitioned_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The module of a deepspeed.zero_stage 0 checkpoint: DeepSpeed's model-states file holds it
    whole, in the fp32 the stage trains in (pnet_dist.engine refuses stage 0 with bf16 weights)."""
    files = sorted(step_dir.glob("*model_states.pt"))
    assert len(files) == 1, f"{step_dir}: expected one model-states file, found {files}"
    return dict(torch.load(files[0], map_location="cpu", weights_only=False)["module"])


def _moe_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full weights of an MoE-format checkpoint: dense.pt plus every expert_EEE.pt."""
    from_files = [step_dir / "dense.pt", *sorted(step_dir.glob("expert_*.pt"))]
    state_dict: dict[str, torch.Tensor] = {}
    for path in from_files:
        state_dict.update(torch.load(path, map_location="cpu", weights_only=False)["params"])
    return state_dict


def build_and_check(model_name: str, model_kwargs: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """create_model(model_name, **model_kwargs) with state_dict loaded strictly; ValueError if it does not fit."""
    model = create_model(model_name, **model_kwargs)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit create_model({model_name!r}, **{model_kwargs}): "
                         f"{len(missing)} names missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}); pass the right model, or strip_prefix if the engine "
                         "wrapped the model")
    model.load_state_dict(state_dict, strict=True)
    return model


def export_checkpoint(root_uri: str, out_dir: str, step: int | None = None, *, model_name: str | None = None,
                      model_kwargs: dict | None = None, ema_key: str | None = None, strip_prefix: str = "",
                      hf: bool = False, dataset_uri: str | None = None) -> str:
    """Write model_fp32.pt + export.json (+ hf/ for LLaMA variants) into out_dir (local or s3://).

    The model defaults to the one recorded in the checkpoint's manifest; the hf/ tokenizer comes
    from dataset_uri, by default the run's data.train_uri. Returns out_dir.
    """
    manager = CheckpointStore(root_uri)
    step = _resolve_step(manager, step)
    recorded = manager.manifest(step).get("model") or {}
    model_name = model_name or recorded.get("name")
    if model_name is None:
        raise ValueError(f"checkpoint under {root_uri} records no model; pass model_name (--model NAME)")
    model_kwargs = recorded.get("kwargs", {}) if model_kwargs is None else model_kwargs
    if hf:  # checked before the (long) consolidation
        meta_model = create_model(model_name, device="meta", **model_kwargs)
        check_hf_supported(meta_model, model_name)
        tokenizer = read_tokenizer(dataset_uri or _train_uri_of_run(root_uri), meta_model.cfg.vocab_size)
    state_dict, manifest = consolidated_state_dict(root_uri, step, ema_key=ema_key, strip_prefix=strip_prefix)
    model = build_and_check(model_name, model_kwargs, state_dict)
    info = {"model": {"name": model_name, "kwargs": model_kwargs}, "source": root_uri,
            "step": manifest["step"], "ema_key": ema_key}
    with tempfile.TemporaryDirectory(prefix="pnet_export_out_") as tmp:
        local = Path(out_dir) if not is_s3(out_dir) else Path(tmp)
        local.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict, local / STATE_DICT_FILE)
        (local / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        if hf:
            write_hf_folder(model, model_name, local / HF_DIR, tokenizer)
        if is_s3(out_dir):
            storage = open_storage(out_dir)
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                storage.put_file(path, path.relative_to(local).as_posix())
    log.info("exported %s step %d (%s, %d tensors) to %s", root_uri, manifest["step"], model_name,
             len(state_dict), out_dir)
    return out_dir


def load_exported_state_dict(export_uri: str) -> dict[str, torch.Tensor]:
    """The state dict of an export folder (local or s3://), e.g. for train.init_from."""
    storage = open_storage(export_uri)
    with tempfile.TemporaryDirectory(prefix="pnet_init_from_") as tmp:
        try:
            storage.get_file(STATE_DICT_FILE, Path(tmp) / STATE_DICT_FILE)
        except FileNotFoundError:
            raise ValueError(f"{export_uri} has no {STATE_DICT_FILE}; make one with tools/export_checkpoint.py") from None
        return torch.load(Path(tmp) / STATE_DICT_FILE, map_location="cpu", weights_only=True)


def _train_uri_of_run(root_uri: str) -> str:
    """data.train_uri from the run's resolved config.yaml: the dataset whose tokenizer the model learned."""
    storage = open_storage(root_uri)
    try:
        train_uri = yaml.safe_load(storage.get_bytes("config.yaml"))["data"]["train_uri"]
    except FileNotFoundError:
        raise ValueError(f"{storage.uri('config.yaml')} not found, so the training dataset (and its tokenizer) is "
                         "unknown; pass the text dataset the model was trained on (--dataset)") from None
    if train_uri.startswith("synthetic:"):
        raise ValueError(f"{storage.uri('config.yaml')}: the run trained on synthetic tokens, which have no "
                         "tokenizer; pass a text dataset whose tokenizer fits the model (--dataset)")
    return train_uri
