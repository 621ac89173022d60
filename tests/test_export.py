"""Export tool round trip: checkpoints of real DeepSpeed engines (ZeRO-2/3, MoE format, local and
S3) -> tools/export_checkpoint.py -> create_model(...) loads the fp32 state dict without DeepSpeed;
the hf/ folders of a dense LLaMA (tokenizer from --dataset) and of an MoE LLaMA (tokenizer from the
run's config.yaml) load in transformers with the same logits (tests/test_hf_interop.py covers
every variant, generation and the tokenizer)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pnet_dist.checkpoint import CheckpointStore
from pnet_dist.engine_checkpoint import EngineCheckpointer
from pnet_dist.export import STATE_DICT_FILE, export_checkpoint, load_exported_state_dict
from pnet_dist.models import create_model
from pnet_dist.storage import open_storage

pytestmark = pytest.mark.dist  # DeepSpeed engines + zero_to_fp32 subprocesses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import export_checkpoint as export_tool  # noqa: E402


def train_and_save(model_name: str, stage: int, root: str, loss_fn, num_steps: int = 2):
    """Train a registered model a few steps with DeepSpeed, checkpoint it; returns its full state."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    model = create_model(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for step in range(num_steps):
        engine.backward(loss_fn(engine, torch.Generator().manual_seed(step)))
        engine.step()
    ckpt = EngineCheckpointer(engine, CheckpointStore(root, keep_last=1), model_name=model_name)
    ckpt.start({})
    ema = {name: t.detach() * 0.5 if t.is_floating_point() else t for name, t in engine.module.state_dict().items()}
    ckpt.save(num_steps, {"step": Saved(num_steps), "ema": Saved(ema)}, wait_for_previous=True)
    ckpt.wait()
    expected = {name: (safe_get_full_fp32_param(p) if stage > 0 else p.detach()).clone()
                for name, p in engine.module.named_parameters()}
    expected.update({name: b.clone() for name, b in engine.module.named_buffers()})
    return expected


class Saved:
    """A Stateful holding one value."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        self.value = state


def image_loss(engine, gen):
    images = torch.randn(2, 3, 32, 32, generator=gen)
    return torch.nn.functional.cross_entropy(engine(images), torch.randint(0, 10, (2,), generator=gen))


def text_loss(engine, gen):
    ids = torch.randint(0, 512, (2, 9), generator=gen)
    logits, aux = engine(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux


def assert_loads_as(out_dir: Path, model_name: str, expected: dict) -> torch.nn.Module:
    state_dict = torch.load(out_dir / STATE_DICT_FILE, weights_only=True)
    model = create_model(model_name)
    model.load_state_dict(state_dict, strict=True)
    full = dict(model.state_dict())
    assert full.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(full[name], value.to(full[name].dtype)), name
    return model


@pytest.mark.parametrize("stage", [0, 2])
def test_vision_checkpoint_exports_weights_batchnorm_buffers_and_ema(process_group, tmp_path, stage):
    expected = train_and_save("parameternet_debug", stage, str(tmp_path / "run"), image_loss)
    assert any("running_mean" in name for name in expected)
    export_tool.main([str(tmp_path / "run"), str(tmp_path / "out")])
    assert_loads_as(tmp_path / "out", "parameternet_debug", expected)
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["model"] == {"name": "parameternet_debug", "kwargs": {}} and info["step"] == 2
    with pytest.raises(ValueError, match="LLaMA variants only"):
        export_tool.main([str(tmp_path / "run"), str(tmp_path / "out2"), "--hf"])

    export_tool.main([str(tmp_path / "run"), str(tmp_path / "ema"), "--ema-key", "ema"])
    halved = {name: t * 0.5 if t.is_floating_point() else t for name, t in expected.items()}
    assert_loads_as(tmp_path / "ema", "parameternet_debug", halved)


def assert_transformers_logits(hf_folder: Path, ours: torch.nn.Module, trust_remote_code: bool = False) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), trust_remote_code=trust_remote_code)
    assert transformers.AutoTokenizer.from_pretrained(str(hf_folder)).eos_token_id == theirs.config.eos_token_id == 0
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.eval()(ids)[0], rtol=1e-5, atol=1e-5)


def test_zero3_llama_from_s3_exports_a_transformers_folder(process_group, tmp_path, s3_bucket, kjv_text_dataset):
    expected = train_and_save("llama_debug", 3, f"{s3_bucket}/llama", text_loss)
    export_checkpoint(f"{s3_bucket}/llama", f"{s3_bucket}/export", hf=True, dataset_uri=kjv_text_dataset)
    storage = open_storage(f"{s3_bucket}/export")
    for key in storage.list():
        storage.get_file(key, tmp_path / "out" / key)
    assert load_exported_state_dict(f"{s3_bucket}/export").keys() == expected.keys()
    ours = assert_loads_as(tmp_path / "out", "llama_debug", expected)
    assert_transformers_logits(tmp_path / "out" / "hf", ours)


def test_moe_checkpoint_exports_every_expert_and_the_runs_tokenizer(process_group, tmp_path, kjv_text_dataset):
    from pnet_dist.config import config_from_dict, save_resolved
    expected = train_and_save("pnet_llama_debug_up_e4", 1, str(tmp_path / "run"), text_loss)
    manifest = json.loads((tmp_path / "run" / "ckpt" / "step_00000002" / "MANIFEST.json").read_text())
    assert manifest["format"] == "moe"
    # The run's resolved config names its training dataset: the export takes the tokenizer from there.
    save_resolved(config_from_dict({"run_name": "run", "checkpoint": {"uri": str(tmp_path)},
                                    "model": {"name": "pnet_llama_debug_up_e4"},
                                    "data": {"kind": "text", "train_uri": kjv_text_dataset}}))
    export_tool.main([str(tmp_path / "run"), str(tmp_path / "out"), "--hf"])
    ours = assert_loads_as(tmp_path / "out", "pnet_llama_debug_up_e4", expected)
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert config["model_type"] == "pnet_llama" and config["num_experts"] == 4
    assert_transformers_logits(tmp_path / "out" / "hf", ours, trust_remote_code=True)


def test_export_with_the_wrong_model_or_no_tokenizer_names_the_cause(process_group, tmp_path):
    train_and_save("llama_debug", 1, str(tmp_path / "run"), text_loss, num_steps=1)
    with pytest.raises(ValueError, match="does not fit create_model"):
        export_tool.main([str(tmp_path / "run"), str(tmp_path / "out"), "--model", "parameternet_debug"])
    with pytest.raises(ValueError, match="no complete checkpoint"):
        export_tool.main([str(tmp_path / "empty"), str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"config.yaml not found.*--dataset"):
        export_tool.main([str(tmp_path / "run"), str(tmp_path / "out"), "--hf"])
    (tmp_path / "run" / "config.yaml").write_text("data:\n  train_uri: 'synthetic:'\n")
    with pytest.raises(ValueError, match="synthetic tokens.*--dataset"):
        export_tool.main([str(tmp_path / "run"), str(tmp_path / "out"), "--hf"])
    assert not (tmp_path / "out").exists()  # refused before anything was written
