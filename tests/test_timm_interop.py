"""timm's model interface: the vision models in timm's registry (fresh interpreters, either import
order), pretrained_cfg, list_models patterns, pretrained=, set_grad_checkpointing (same loss,
gradients and BatchNorm statistics as without it, for both families, and from the job YAML) and
no_weight_decay (honoured by the optimizer's groups)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pnet_dist.models import create_model, get_pretrained_cfg, list_models

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
VISION = ["ghostnet_300m", "ghostnet_600m", "ghostnet_debug", "parameternet_300m", "parameternet_600m",
          "parameternet_debug"]

PROBE = """
import json, sys
{imports}
from timm.data import resolve_data_config
out = {{"listed": timm.list_models("parameternet*"), "ghostnets": timm.list_models("ghostnet_*0m")}}
model = timm.create_model({name!r}, num_classes=10, in_chans=1)
out["classes"], out["in_channels"] = model.num_classes, model.conv_stem.conv.in_channels
out["data_config"] = resolve_data_config({{}}, model=model)
try:
    timm.create_model("parameternet_debug", pretrained=True)
except ValueError as exc:
    out["pretrained_error"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.parametrize("imports,name", [("import pnet_dist.models\nimport timm", "parameternet_600m"),
                                          ("import timm\nimport pnet_dist.models", "parameternet_debug")])
def test_timm_creates_the_models_in_a_fresh_interpreter(imports, name):
    probe = PROBE.format(imports=imports, name=name)
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["listed"] == ["parameternet_300m", "parameternet_600m", "parameternet_debug"]
    assert out["ghostnets"] == ["ghostnet_300m", "ghostnet_600m"]
    assert out["classes"] == 10 and out["in_channels"] == 1
    size = 224 if name == "parameternet_600m" else 32
    assert out["data_config"] == {"input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": 0.875,
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_mode": "center"}
    assert "no pretrained weights" in out["pretrained_error"]


def test_list_models_takes_fnmatch_patterns():
    assert list_models("parameternet*") == ["parameternet_300m", "parameternet_600m", "parameternet_debug"]
    assert list_models(["ghostnet_*", "llama_*"]) == ["ghostnet_300m", "ghostnet_600m", "ghostnet_debug",
                                                       "llama_1b", "llama_debug"]
    assert list_models("*_debug_up_e?") == ["pnet_llama_debug_up_e4", "pnet_llama_debug_up_e8"]
    assert list_models("resnet*") == [] and len(list_models()) == len(list_models("*"))


def test_pretrained_cfg_describes_the_eval_input():
    from pnet_dist.data.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
    for name in VISION:
        model = create_model(name, device="meta", num_classes=5)
        cfg = model.pretrained_cfg
        assert cfg == get_pretrained_cfg(name) and cfg["num_classes"] == (10 if "debug" in name else 1000)
        assert (cfg["mean"], cfg["std"], cfg["crop_pct"]) == (IMAGENET_MEAN, IMAGENET_STD, EvalTransform(224).crop_pct)
        assert tuple(cfg["input_size"]) == model.input_size
        if name.startswith("parameternet"):  # the static twins have the same shapes
            features = model.forward_features(torch.zeros(1, *cfg["input_size"], device="meta"))
            assert tuple(features.shape[2:]) == cfg["pool_size"]
        assert model.get_submodule(cfg["first_conv"]).in_channels == 3
        assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert get_pretrained_cfg("llama_debug") is None and not hasattr(create_model("llama_debug"), "pretrained_cfg")


def test_pretrained_flag_and_bad_num_classes_give_clear_errors():
    assert create_model("parameternet_debug", pretrained=False).num_classes == 10
    with pytest.raises(ValueError, match="no pretrained weights are published for 'parameternet_600m'"):
        create_model("parameternet_600m", pretrained=True)
    with pytest.raises(ValueError, match="num_classes must be an integer.*.10."):
        create_model("parameternet_debug", num_classes="10")
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        create_model("parameternet_debug").reset_classifier(2.5)


def loss_grads_and_buffers(model: torch.nn.Module, loss_of, seed: int = 0):
    """Loss, gradients and buffers after one training forward/backward with the RNG at `seed`."""
    torch.manual_seed(seed)
    loss = loss_of(model)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


def image_loss(model):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return F.cross_entropy(model(images), torch.arange(4))


def text_loss(model):
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, aux = model(ids)
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux


@pytest.mark.parametrize("name,kwargs,loss_of", [
    ("parameternet_debug", {"drop_path_rate": 0.3, "drop_rate": 0.2}, image_loss),
    ("pnet_llama_debug_up_e4", {}, text_loss)])
def test_grad_checkpointing_keeps_loss_gradients_and_batchnorm_statistics(name, kwargs, loss_of):
    plain = create_model(name, **kwargs).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    loss, grads, buffers = loss_grads_and_buffers(plain, loss_of)
    loss_ckpt, grads_ckpt, buffers_ckpt = loss_grads_and_buffers(checkpointed, loss_of)
    # Same random drop-path/dropout masks, the same arithmetic: equal to the bit.
    assert torch.equal(loss_ckpt, loss)
    for param_name, grad in grads.items():
        assert torch.equal(grads_ckpt[param_name], grad), param_name
    for buffer_name, value in buffers.items():  # running statistics counted once, not twice
        assert torch.equal(buffers_ckpt[buffer_name], value), buffer_name
    if "parameternet" in name:
        assert buffers["conv_stem.bn.num_batches_tracked"] == 1
        assert any(b.running_mean.abs().sum() > 0 for b in plain.modules() if isinstance(b, torch.nn.BatchNorm2d))
        # The trap guarded against: torch's checkpoint alone counts a batch twice.
        from torch.utils.checkpoint import checkpoint
        stage = copy.deepcopy(plain.blocks[1])
        x = torch.randn(2, stage[0].ghost1.primary_conv.conv.in_channels, 16, 16)
        checkpoint(stage, x, use_reentrant=False).sum().backward()
        assert stage[0].ghost1.primary_conv.bn.num_batches_tracked == 1 + 2


def test_job_yaml_switches_grad_checkpointing_on_for_both_families():
    from pnet_dist.config import config_from_dict
    from pnet_dist.tasks import build_task
    for model_name, data in (("parameternet_debug", {"kind": "image", "image_size": 32}),
                             ("pnet_llama_debug_up_e4", {"kind": "text", "seq_len": 16})):
        for enabled in (False, True):
            cfg = config_from_dict({"run_name": "gc", "model": {"name": model_name},
                                    "data": {"train_uri": "synthetic:", **data},
                                    "train": {"grad_checkpointing": enabled}}, source="unit")
            assert build_task(cfg).build_model().grad_checkpointing is enabled


def test_no_weight_decay_names_are_honoured_by_the_parameter_groups():
    from pnet_dist.optim import build_param_groups
    for name in ("parameternet_debug", "llama_debug"):
        assert create_model(name).no_weight_decay() == set()
    model = create_model("parameternet_debug")
    model.no_weight_decay = lambda: {"classifier.weight"}
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.classifier.weight) in no_decay and id(model.conv_head.weight) not in no_decay
