"""GhostNet / ParameterNet models: registry, structure (which convs are dynamic), options, meta
build + init_weights, the 22K -> 1K classifier reset, and the benchmark script's smoke run."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pnet_dist.models import DynamicConv2d, create_model, list_models
from pnet_dist.models.ghostnet import ARCH_DEBUG, GhostNet, build_ghostnet
from pnet_dist.models.layers import DropPath, StaticConvFactory

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
VISION_MODELS = ["parameternet_600m", "parameternet_300m", "ghostnet_600m", "ghostnet_300m",
                 "parameternet_debug", "ghostnet_debug"]


def test_registered_names():
    assert set(VISION_MODELS) <= set(list_models())


def expected_dynamic_positions(model: GhostNet) -> list[nn.Module]:
    """Every conv ParameterNet makes dynamic: stem, both convs of every Ghost module, both
    shortcut convs, the final 1x1 ConvBnAct."""
    convs = [model.conv_stem.conv]
    for stage in model.blocks[:-1]:
        for block in stage:
            for ghost in (block.ghost1, block.ghost2):
                convs += [ghost.primary_conv.conv, ghost.cheap_operation.conv]
            if isinstance(block.shortcut, nn.Sequential):
                convs += [block.shortcut[0], block.shortcut[2]]
    return convs + [model.blocks[-1].conv]


@pytest.mark.parametrize("dynamic_name,static_name", [("parameternet_600m", "ghostnet_600m"),
                                                      ("parameternet_300m", "ghostnet_300m")])
def test_dynamic_and_static_twins(dynamic_name, static_name):
    dynamic = create_model(dynamic_name, device="meta")
    static = create_model(static_name, device="meta")
    dynamic_convs = expected_dynamic_positions(dynamic)
    assert all(isinstance(conv, DynamicConv2d) for conv in dynamic_convs)
    assert sum(isinstance(m, DynamicConv2d) for m in dynamic.modules()) == len(dynamic_convs)
    assert not any(isinstance(m, DynamicConv2d) for m in static.modules())
    # Same network: each dynamic conv's expert kernel has the static twin's kernel shape.
    for dyn, stat in zip(dynamic_convs, expected_dynamic_positions(static), strict=True):
        assert type(stat) is nn.Conv2d and tuple(dyn.weight.shape[1:]) == tuple(stat.weight.shape)
        assert (dyn.stride, dyn.padding, dyn.groups) == (stat.stride, stat.padding, stat.groups)
    # The convs the released code keeps static stay static in ParameterNet.
    block = dynamic.blocks[1][0]  # stride 2
    assert type(block.conv_dw[0]) is nn.Conv2d and block.conv_dw[0].groups == block.conv_dw[0].in_channels
    se_block = dynamic.blocks[3][0]
    assert type(se_block.se.conv_reduce) is nn.Conv2d and type(dynamic.conv_head) is nn.Conv2d


def test_parameternet_600m_released_shapes():
    model = create_model("parameternet_600m", device="meta")
    assert model.conv_stem.conv.out_channels == 32  # make_divisible(16 * 1.9, 4)
    assert model.pool_channels == 1824 and model.num_features == 1280
    assert isinstance(model.act2, nn.Hardswish) and model.drop_rate == 0.2
    assert model.classifier.in_features == 1280 and model.classifier.out_features == 1000
    assert model.conv_head.bias is not None
    se = model.blocks[3][0].se  # 5x5, expansion 72 * 1.9 -> 136, SE reduce make_divisible(34, 4)
    assert (se.conv_reduce.in_channels, se.conv_reduce.out_channels) == (136, 36)
    assert isinstance(se.act, nn.Hardswish)
    assert all(m.num_experts == 4 and m.gate == "sigmoid" for m in model.modules() if isinstance(m, DynamicConv2d))
    assert sum(len(stage) for stage in model.blocks[:-1]) == 19


@pytest.mark.parametrize("name", ["parameternet_debug", "ghostnet_debug"])
@pytest.mark.parametrize("batch", [1, 3])
def test_debug_models_train_at_32px(name, batch):
    torch.manual_seed(0)
    model = create_model(name)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (batch, 10)


def test_options_reach_the_layers():
    model = create_model("parameternet_debug", num_classes=7, drop_rate=0.1, drop_path_rate=0.2,
                         num_experts=3, gate="softmax", router_layers=2)
    dynamic = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert all(m.num_experts == 3 and m.weight.shape[0] == 3 and m.gate == "softmax" for m in dynamic)
    assert all(isinstance(m.router, nn.Sequential) for m in dynamic)
    assert model.classifier.out_features == 7 and model.drop_rate == 0.1
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)  # one rate per stage, linear to the last one


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="only apply to parameternet"):
        create_model("ghostnet_debug", num_experts=4)
    with pytest.raises(ValueError, match="gate"):
        create_model("parameternet_debug", gate="tanh")
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("parameternet_debug", drop_path_rate=1.5)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("parameternet_9000m")


def test_meta_build_then_init_weights_equals_eager_build():
    torch.manual_seed(123)
    eager = create_model("parameternet_debug")
    meta = create_model("parameternet_debug", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta = meta.to_empty(device="cpu")
    torch.manual_seed(123)
    meta.init_weights()
    eager_state, meta_state = eager.state_dict(), meta.state_dict()
    assert eager_state.keys() == meta_state.keys()
    for key in eager_state:
        torch.testing.assert_close(meta_state[key], eager_state[key], rtol=0, atol=0, msg=key)


def test_reset_classifier_for_22k_to_1k_finetuning():
    model = create_model("parameternet_debug", num_classes=21841)
    model.reset_classifier(1000)
    assert model.classifier.in_features == model.num_features == 128
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    meta = create_model("parameternet_600m", device="meta", num_classes=21841)
    meta.reset_classifier(1000)
    assert meta.classifier.weight.is_meta and meta.classifier.weight.shape == (1000, 1280)


def test_conv_factory_is_the_only_seam():
    calls = []

    def recording_factory(*args, **kwargs):
        calls.append((args, kwargs))
        return StaticConvFactory()(*args, **kwargs)

    model = build_ghostnet(ARCH_DEBUG, 0.5, dynamic=True, conv_factory=recording_factory, num_classes=10,
                           num_features=128, input_size=(3, 32, 32))
    reference = create_model("parameternet_debug")
    assert len(calls) == sum(isinstance(m, DynamicConv2d) for m in reference.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_benchmark_script_smoke(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_dynamic_conv.py", "--variant", "debug", "--batch", "2", "--size", "32",
                                      "--repeats", "1", "--layer-repeats", "1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / "bench_dynamic_conv.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ratio parameternet / ghostnet" in out and "speed-up ours vs CondConv2d" in out
    for kind in ("1x1", "depthwise kxk", "stem"):
        assert kind in out
