"""Hugging Face folders of the LLaMA variants: weights, config, tokenizer, generation config, model code.

`write_hf_folder(model, name, out_dir, read_tokenizer(dataset_uri, vocab_size))` writes a folder that transformers' AutoTokenizer,
AutoModelForCausalLM and pipeline("text-generation") load:

    config.json               LlamaConfig fields and the special-token ids. Dense: model_type
                              "llama" (transformers' own LlamaForCausalLM). MoE: model_type
                              "pnet_llama" with auto_map to the two code files below, loaded with
                              trust_remote_code=True
    model.safetensors         weights under transformers' LLaMA names (`hf_name`)
    configuration_pnet_llama.py, modeling_pnet_llama.py
                              (MoE only) copied from this package; they import torch and
                              transformers only, so the folder stands alone
    tokenizer.json, tokenizer_config.json
                              the tokenizer of the text dataset the model was trained on
                              (written beside the shards by pnet_dist.data.text)
    generation_config.json    bos / eos / pad = the dataset's EOS id

Special tokens: the converter tokenizes every document without special tokens and appends EOS,
so EOS is also the token right before each document. It is therefore the export's bos, eos and
pad token (the GPT-2 convention). pad_token_id stays out of config.json on purpose: LlamaModel
would make it the embedding's padding_idx, which freezes the EOS embedding when finetuning; the
tokenizer and the generation config carry it. A post-processor in the tokenizer JSON (one that
adds BOS, say) is dropped, so that `tokenizer(text)` gives the ids the model was trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pnet_dist.models.llama import LlamaForCausalLM

MODEL_CODE_FILES = ("configuration_pnet_llama.py", "modeling_pnet_llama.py")
AUTO_MAP = {"AutoConfig": "configuration_pnet_llama.PnetLlamaConfig",
            "AutoModelForCausalLM": "modeling_pnet_llama.PnetLlamaForCausalLM"}

# pnet_dist module names inside a decoder block -> transformers LlamaDecoderLayer names.
_HF_BLOCK_MODULES = {"attn_norm": "input_layernorm", "attn": "self_attn", "ffn_norm": "post_attention_layernorm",
                     "ffn": "mlp"}
_HF_TOP_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """transformers' name of a pnet_dist LLaMA parameter, e.g. layers.3.ffn.up_proj.experts.1.weight ->
    model.layers.3.mlp.up_proj.experts.1.weight."""
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    _, index, module, rest = name.split(".", 3)  # layers.<i>.<module>.<rest>
    return f"model.layers.{index}.{_HF_BLOCK_MODULES[module]}.{rest}"


def check_hf_supported(model: nn.Module, model_name: str) -> None:
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"a Hugging Face folder is written for LLaMA variants only; {model_name!r} is a "
                         f"{type(model).__name__}")


@dataclass(frozen=True)
class TrainingTokenizer:
    """The tokenizer of a text dataset (its tokenizers JSON, post-processor dropped) and its EOS token."""

    tokenizer_json: dict
    eos_id: int
    eos_token: str


def read_tokenizer(dataset_uri: str, vocab_size: int) -> TrainingTokenizer:
    """The tokenizer written beside the text dataset at dataset_uri; it must fit a vocabulary of vocab_size."""
    from tokenizers import Tokenizer

    from pnet_dist.data.shards import dataset_info
    from pnet_dist.storage import open_storage

    info = dataset_info(dataset_uri)
    if info.get("kind") != "text" or "tokenizer" not in info:
        raise ValueError(f"{dataset_uri} holds a {info.get('kind')!r} dataset, not a text dataset with a tokenizer; "
                         "pass the text dataset the model was trained on (--dataset)")
    if info["vocab_size"] > vocab_size:
        raise ValueError(f"the tokenizer of {dataset_uri} has {info['vocab_size']} tokens but the model only "
                         f"{vocab_size}; pass the text dataset the model was trained on (--dataset)")
    tokenizer_json = json.loads(open_storage(dataset_uri).get_bytes(info["tokenizer"]))
    tokenizer_json["post_processor"] = None
    eos_token = Tokenizer.from_str(json.dumps(tokenizer_json)).id_to_token(info["eos_id"])
    return TrainingTokenizer(tokenizer_json, info["eos_id"], eos_token)


def write_hf_folder(model: nn.Module, model_name: str, out_dir: Path, tokenizer: TrainingTokenizer) -> None:
    """The folder described in the module docstring, for `model` trained with `tokenizer`."""
    from safetensors.torch import save_file

    check_hf_supported(model, model_name)
    cfg, eos_id = model.cfg, tokenizer.eos_id
    config = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "initializer_range": cfg.init_std, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": eos_id, "eos_token_id": eos_id,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.moe_placement is None:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    else:
        config.update(architectures=["PnetLlamaForCausalLM"], model_type="pnet_llama", auto_map=AUTO_MAP,
                      moe_placement=cfg.moe_placement, num_experts=cfg.num_experts, expert_bias=cfg.expert_bias,
                      capacity_factor=cfg.capacity_factor)
        for name in MODEL_CODE_FILES:
            (out_dir / name).write_bytes((Path(__file__).parent / name).read_bytes())
    state_dict = {hf_name(name): t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=1, sort_keys=True))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer.tokenizer_json, ensure_ascii=False))
    eos = tokenizer.eos_token
    # model_input_names: without it the tokenizer also returns token_type_ids, which generate() refuses.
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
                        "pad_token": eos, "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False,
                        "model_input_names": ["input_ids", "attention_mask"]}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1, sort_keys=True))
