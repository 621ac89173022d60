"""Hugging Face folders of every LLaMA variant (debug sizes): transformers' AutoTokenizer,
AutoModelForCausalLM (trust_remote_code for the MoE variants) and pipeline("text-generation")
load them; logits equal pnet_dist's model (fp32), cached generation equals pnet_dist's greedy
decoding, generation stops on the dataset's EOS, and the tokenizer is the dataset's."""
from __future__ import annotations

import json

import pytest
import torch

from pnet_dist.hf import read_tokenizer, write_hf_folder
from pnet_dist.models import create_model, list_models, moe_stats

pytestmark = pytest.mark.unit
transformers = pytest.importorskip("transformers")

LLAMA_VARIANTS = ["llama_debug"] + list_models("pnet_llama_debug_*")
PROMPT = "And God said, Let there be light"


def trained_looking(name: str, **kwargs) -> torch.nn.Module:
    """A debug model with non-zero expert biases and routers sharp enough to use every expert."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith((".bias", "router.weight")):
                param.normal_(0.0, 0.5)
    return model


def export(model: torch.nn.Module, name: str, dataset: str, out) -> str:
    write_hf_folder(model, name, out, read_tokenizer(dataset, model.cfg.vocab_size))
    return str(out)


def greedy(model: torch.nn.Module, ids: torch.Tensor, num_new: int) -> torch.Tensor:
    """pnet_dist's model decoding greedily without a KV cache (the whole sequence every step)."""
    with torch.no_grad():
        for _ in range(num_new):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name,kwargs", [(name, {}) for name in LLAMA_VARIANTS]
                         + [("pnet_llama_debug_down_e8", {"capacity_factor": 1.0})])
def test_transformers_loads_every_variant_with_the_same_logits(name, kwargs, kjv_text_dataset, tmp_path):
    ours = trained_looking(name, **kwargs)
    folder = export(ours, name, kjv_text_dataset, tmp_path / name)
    moe = name.startswith("pnet_")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=moe)
    assert type(theirs).__name__ == ("PnetLlamaForCausalLM" if moe else "LlamaForCausalLM")
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids)[0]
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    if moe:  # the comparison covered routing: every layer spread its tokens over experts
        stats = moe_stats(ours)
        assert len(stats["expert_load"]) == ours.cfg.num_layers
        for layer_load in stats["expert_load"]:
            assert sum(load > 0 for load in layer_load) >= 2
        if "capacity_factor" in kwargs:
            assert any(frac > 0 for frac in stats["dropped_frac"])


def test_moe_folder_runs_in_a_text_generation_pipeline_like_pnet_dist(kjv_text_dataset, tmp_path):
    name = "pnet_llama_debug_up_e4"
    ours = trained_looking(name)
    folder = export(ours, name, kjv_text_dataset, tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["model_type"] == "pnet_llama" and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    generator = transformers.pipeline("text-generation", model=folder, trust_remote_code=True)
    tokenizer, model = generator.tokenizer, generator.model
    inputs = tokenizer(PROMPT, return_tensors="pt")
    prompt_ids = inputs.input_ids
    # KV-cached generation in transformers = pnet_dist's full-sequence greedy decoding.
    expected = greedy(ours, prompt_ids, 12)
    assert torch.equal(model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False), expected)
    text = generator(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == PROMPT + tokenizer.decode(expected[0, prompt_ids.shape[1]:])


def test_tokenizer_and_special_tokens_are_the_datasets(kjv_text_dataset, tmp_path):
    from tokenizers import Tokenizer

    from pnet_dist.data import dataset_info
    from pnet_dist.storage import open_storage
    info = dataset_info(kjv_text_dataset)
    eos_id = info["eos_id"]
    assert eos_id == 0  # the converter's trained BPE puts its only special token first
    dense = trained_looking("llama_debug")
    with torch.no_grad():
        dense.norm.weight.zero_()  # every logit 0: greedy picks id 0, the EOS, at once
    folder = export(dense, "llama_debug", kjv_text_dataset, tmp_path / "dense")

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    source = Tokenizer.from_str(open_storage(kjv_text_dataset).get_bytes("tokenizer.json").decode())
    assert tokenizer(PROMPT).input_ids == source.encode(PROMPT, add_special_tokens=False).ids
    assert tokenizer.decode(tokenizer(PROMPT).input_ids) == PROMPT
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == eos_id
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.eos_token_id == model.config.bos_token_id == eos_id and model.config.pad_token_id is None
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == eos_id
    inputs = tokenizer(PROMPT, return_tensors="pt")
    prompt_ids = inputs.input_ids
    generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert generated[0, prompt_ids.shape[1]:].tolist() == [eos_id]  # stopped on the project's EOS


def test_bad_tokenizer_sources_are_named(kjv_text_dataset, tmp_path):
    with pytest.raises(ValueError, match="has 512 tokens but the model only 256"):
        read_tokenizer(kjv_text_dataset, 256)
    with pytest.raises(ValueError, match="not found"):
        read_tokenizer(str(tmp_path / "nothing"), 512)
    with pytest.raises(ValueError, match="LLaMA variants only"):
        write_hf_folder(create_model("parameternet_debug"), "parameternet_debug", tmp_path / "x",
                        read_tokenizer(kjv_text_dataset, 512))
