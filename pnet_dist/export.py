"""Export a training checkpoint to plain PyTorch, and LLaMA variants to a Hugging Face-style folder.

Owns the consolidation of a checkpoint (any world size, ZeRO-1/2/3 or the MoE format) into one
fp32 state dict that `create_model(name, **kwargs).load_state_dict(...)` takes without DeepSpeed,
and the writing of the export folder:

    model_fp32.pt        the state dict (torch.save of {name: tensor})
    export.json          model name + kwargs, source checkpoint URI and step
    hf/                  (LLaMA variants, on request) config.json + model.safetensors. A dense
                         LLaMA uses Hugging Face LlamaForCausalLM names and config, so
                         transformers loads it; an MoE variant (no transformers class exists) keeps
                         pnet_dist names and records model_type "pnet_llama" with the pnet_dist
                         model name, to be rebuilt with create_model.

ZeRO shards are consolidated by DeepSpeed's zero_to_fp32 in a subprocess (DeepSpeed stays inside
the engine module); MoE-format checkpoints already hold full fp32 tensors per parameter.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from pnet_dist.checkpoint import CKPT_DIR, CheckpointStore, step_dir_name
from pnet_dist.engine_checkpoint import FORMAT_MOE, client_state_name
from pnet_dist.log import get_logger
from pnet_dist.models import create_model
from pnet_dist.storage import is_s3, open_storage

log = get_logger(__name__)

STATE_DICT_FILE = "model_fp32.pt"
EXPORT_INFO_FILE = "export.json"
HF_DIR = "hf"

# pnet_dist LLaMA parameter names -> Hugging Face LlamaForCausalLM names (per decoder block).
_HF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
_HF_TOP_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}


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
                      hf: bool = False) -> str:
    """Write model_fp32.pt + export.json (+ hf/ for LLaMA variants) into out_dir (local or s3://).

    The model defaults to the one recorded in the checkpoint's manifest. Returns out_dir.
    """
    manager = CheckpointStore(root_uri)
    step = _resolve_step(manager, step)
    recorded = manager.manifest(step).get("model") or {}
    model_name = model_name or recorded.get("name")
    if model_name is None:
        raise ValueError(f"checkpoint under {root_uri} records no model; pass model_name (--model NAME)")
    model_kwargs = recorded.get("kwargs", {}) if model_kwargs is None else model_kwargs
    if hf:
        _check_hf_supported(create_model(model_name, device="meta", **model_kwargs), model_name)
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
            write_hf_folder(model, model_name, model_kwargs, local / HF_DIR)
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


def write_hf_folder(model: nn.Module, model_name: str, model_kwargs: dict, out_dir: Path) -> None:
    """config.json + model.safetensors for a pnet_dist LLaMA variant (see the module docstring)."""
    from safetensors.torch import save_file

    _check_hf_supported(model, model_name)
    cfg = model.cfg
    state_dict = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    config = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "initializer_range": cfg.init_std, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    if cfg.moe_placement is None:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama")
        state_dict = {_hf_name(name): t for name, t in state_dict.items()}
    else:
        config.update(architectures=["PnetLlamaForCausalLM"], model_type="pnet_llama",
                      pnet_dist_model={"name": model_name, "kwargs": model_kwargs},
                      moe_placement=cfg.moe_placement, num_experts=cfg.num_experts,
                      expert_bias=cfg.expert_bias, aux_loss_coef=cfg.aux_loss_coef)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))


def _check_hf_supported(model: nn.Module, model_name: str) -> None:
    from pnet_dist.models.llama import LlamaForCausalLM
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"a Hugging Face folder is written for LLaMA variants only; {model_name!r} is a "
                         f"{type(model).__name__}")


def _hf_name(name: str) -> str:
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    _, index, rest = name.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{index}.{_HF_BLOCK_NAMES[rest]}"
