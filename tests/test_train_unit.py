"""Single-process pieces of the training engine: tasks, synthetic data, stop requests, the spot
watcher (against a fake metadata server on 127.0.0.1), init_from, the ds_config, module layering."""
from __future__ import annotations

import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from pnet_dist.config import config_from_dict
from pnet_dist.tasks import SyntheticEvalSet, SyntheticLoader, build_model_kwargs, build_task, soft_target_cross_entropy

pytestmark = pytest.mark.unit


def make_cfg(kind: str = "image", **sections) -> object:
    raw = {"run_name": "unit", "checkpoint": {"uri": "/nonexistent"}}
    if kind == "image":
        raw |= {"model": {"name": "parameternet_debug"},
                "data": {"kind": "image", "train_uri": "synthetic:", "image_size": 32, "batch_size": 4}}
    else:
        raw |= {"model": {"name": "pnet_llama_debug_up_e4"},
                "data": {"kind": "text", "train_uri": "synthetic:", "seq_len": 16, "batch_size": 2}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw, source="unit")


def test_soft_target_cross_entropy_matches_torch():
    logits = torch.randn(6, 5)
    labels = torch.randint(5, (6,))
    one_hot = F.one_hot(labels, 5).float()
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    smoothed = one_hot * 0.9 + 0.1 / 5
    assert torch.allclose(soft_target_cross_entropy(logits, smoothed),
                          F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_image_task_builds_model_counts_flops_and_mixes_by_seed():
    task = build_task(make_cfg("image", model={"kwargs": {"num_classes": 7}}))
    model = task.build_model()
    assert task.num_classes == model.num_classes == 7 and task.model_kwargs == {"num_classes": 7}
    from pnet_dist.models.counting import count_macs, image_input
    assert task.flops_per_sample == 6 * sum(count_macs(model, image_input(model, device="cpu", size=32)).values())
    train_loader, eval_loader = task.build_loaders()
    assert eval_loader is None
    batch = next(iter(train_loader))
    model.eval()  # dropout draws from the global RNG, which the loop seeds per micro-batch
    loss_a, _ = task.train_loss(model, batch, seed=1)
    loss_b, _ = task.train_loss(model, batch, seed=1)
    loss_c, _ = task.train_loss(model, batch, seed=2)
    assert loss_a.item() == loss_b.item() != loss_c.item()    # mixup/cutmix draw from the seed only
    sums = task.eval_sums(model, batch)
    assert sums[3] == 4 and 0 <= sums[1] <= sums[2] <= 4
    summary = task.eval_summary(dict(zip(task.eval_keys, sums)))
    assert summary["loss"] == pytest.approx(sums[0] / 4) and summary["top5"] >= summary["top1"]


def test_lm_task_passes_the_aux_coefficient_and_counts_active_params():
    task = build_task(make_cfg("text", train={"moe_aux_coef": 0.05}))
    model = task.build_model()
    assert model.cfg.aux_loss_coef == 0.05 and task.vocab_size == model.cfg.vocab_size
    assert task.model_kwargs == {"aux_loss_coef": 0.05}    # what the checkpoint manifest records
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert model.num_active_params() == total - embedding - expert_params * 3 // 4   # top-1 of 4 experts
    assert task.flops_per_sample == 6 * model.num_active_params() * 16
    batch = next(iter(task.build_loaders()[0]))
    loss, extras = task.train_loss(model, batch, seed=0)
    assert torch.allclose(loss, extras["lm_loss"] + extras["aux_loss"]) and extras["aux_loss"] > 0
    assert task.count(batch) == (2, 32)
    assert task.eval_summary({"loss_sum": 2.0 * 32, "count": 32})["perplexity"] == pytest.approx(math.exp(2.0))


def test_dataset_sizes_fill_the_model_kwargs_and_contradictions_fail(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"kind": "text", "vocab_size": 300, "num_classes": 12}))
    text_cfg = make_cfg("text", data={"train_uri": str(tmp_path), "seq_len": 16})
    assert build_model_kwargs(text_cfg, {"vocab_size": 300}) == {"vocab_size": 300,
                                                                 "aux_loss_coef": text_cfg.train.moe_aux_coef}
    image = build_task(make_cfg("image", data={"train_uri": str(tmp_path)}))
    assert image.build_model().num_classes == 12 and image.model_kwargs == {"num_classes": 12}
    padded = build_task(make_cfg("text", data={"train_uri": str(tmp_path), "seq_len": 16},
                                 model={"kwargs": {"vocab_size": 320}}))
    assert padded.build_model().cfg.vocab_size == 320           # a padded vocabulary is fine
    for kind, kwargs, message in (("text", {"vocab_size": 256}, "model.kwargs.vocab_size=256 but the dataset"),
                                  ("image", {"num_classes": 10}, "model.kwargs.num_classes=10 but the dataset")):
        with pytest.raises(ValueError, match=message):
            build_task(make_cfg(kind, data={"train_uri": str(tmp_path)}, model={"kwargs": kwargs})).build_model()


def test_lm_task_rejects_a_sequence_longer_than_the_model():
    with pytest.raises(ValueError, match="data.seq_len=4096 exceeds the model's max_seq_len"):
        build_task(make_cfg("text", data={"seq_len": 4096})).build_model()


def test_synthetic_loader_resumes_exactly_and_eval_sets_repeat():
    sample = lambda g: (torch.randn(3, generator=g), torch.randint(10, (), generator=g))  # noqa: E731
    loader = SyntheticLoader(sample, 4, seed=1)
    stream = iter(loader)
    first = [next(stream) for _ in range(3)]
    state = loader.state_dict()
    upcoming = next(stream)
    resumed = SyntheticLoader(sample, 4, seed=1)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert state == {"samples_consumed": 12}
    assert torch.equal(again[0], upcoming[0]) and torch.equal(again[1], upcoming[1])
    assert not torch.equal(first[0][0], first[1][0])
    evaluation = SyntheticEvalSet(sample, 4, seed=2, num_samples=10)
    passes = [[b[0] for b in evaluation.batches([0, 1, 2], 10)] for _ in range(2)]
    assert [len(b) for b in passes[0]] == [4, 4, 2] and all(torch.equal(a, b) for a, b in zip(*passes))
    assert torch.equal(next(evaluation.batches([1], 10))[0], passes[0][1])  # a batch is found by its index


def test_synthetic_eval_needs_a_size():
    task = build_task(make_cfg("image", data={"eval_uri": "synthetic:"}))
    task.build_model()
    with pytest.raises(ValueError, match="train.eval_max_samples"):
        task.build_loaders()


def test_micro_batch_seed_depends_on_the_place_in_the_global_batch():
    from pnet_dist.train import micro_batch_seed
    # Two ranks x 1 micro-batch and one rank x 2 micro-batches: position = micro * world + rank.
    two_ranks = {micro_batch_seed(3, 10, 0 * 2 + rank) for rank in (0, 1)}
    one_rank = {micro_batch_seed(3, 10, micro * 1 + 0) for micro in (0, 1)}
    assert two_ranks == one_rank and len(two_ranks) == 2
    assert micro_batch_seed(3, 10, 0) != micro_batch_seed(3, 11, 0) != micro_batch_seed(4, 10, 0)


def test_batch_stream_crosses_epochs():
    from pnet_dist.train import BatchStream
    stream = BatchStream([1, 2, 3])
    waits, batches = zip(*(stream.next(2) for _ in range(3)))
    assert [b for pair in batches for b in pair] == [1, 2, 3, 1, 2, 3] and all(w >= 0 for w in waits)


def test_evaluate_sums_over_batches():
    from pnet_dist.train import evaluate
    task = build_task(make_cfg("image"))
    model = task.build_model()
    eval_set = SyntheticEvalSet(lambda g: (torch.randn(3, 32, 32, generator=g), torch.randint(10, (), generator=g)),
                                4, seed=0, num_samples=12)
    out = evaluate(task, model, eval_set, max_samples=None)
    assert out["samples"] == 12 and 0 <= out["top1"] <= out["top5"] <= 100 and model.training
    assert evaluate(task, model, eval_set, max_samples=5)["samples"] == 5  # a short last batch


def test_sigterm_requests_a_stop_and_the_handler_is_restored():
    from pnet_dist.train import _STOP, StopSignals, stop_requested
    previous = signal.getsignal(signal.SIGTERM)
    _STOP.clear()
    signals = StopSignals(watch_spot=False)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop_requested() and _STOP.reason == "SIGTERM"
    finally:
        signals.close()
        _STOP.clear()
    assert signal.getsignal(signal.SIGTERM) is previous


class FakeMetadata(http.server.BaseHTTPRequestHandler):
    """IMDSv2 on 127.0.0.1: a token, then 404 for instance-action until `notice` is set."""
    notice: str | None = None
    requests: list[str] = []

    def do_PUT(self):
        self.requests.append(f"PUT {self.path} {self.headers.get('X-aws-ec2-metadata-token-ttl-seconds')}")
        self._reply(200, b"token-1")

    def do_GET(self):
        self.requests.append(f"GET {self.path} {self.headers.get('X-aws-ec2-metadata-token')}")
        if self.notice is None:
            self._reply(404, b"")
        else:
            self._reply(200, self.notice.encode())

    def _reply(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_spot_watcher_turns_a_notice_into_a_stop_request():
    from pnet_dist.train import _STOP, SpotWatcher, stop_requested
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    _STOP.clear()
    watcher = SpotWatcher(endpoint=endpoint, interval_s=0.05)
    try:
        assert watcher.notice() is None
        time.sleep(0.2)
        assert not stop_requested()
        FakeMetadata.notice = json.dumps({"action": "terminate", "time": "2026-11-27T12:00:00Z"})
        deadline = time.monotonic() + 5
        while not stop_requested() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stop_requested() and "terminate" in _STOP.reason
        assert "PUT /latest/api/token 300" in FakeMetadata.requests
        assert "GET /latest/meta-data/spot/instance-action token-1" in FakeMetadata.requests
    finally:
        watcher.close()
        server.shutdown()
        _STOP.clear()
        FakeMetadata.notice = None


def test_init_from_loads_an_export_and_keeps_a_resized_head(tmp_path):
    from pnet_dist.export import STATE_DICT_FILE
    from pnet_dist.models import create_model
    from pnet_dist.train import load_init_weights
    source = create_model("parameternet_debug", num_classes=21)
    torch.save(source.state_dict(), tmp_path / STATE_DICT_FILE)
    torch.manual_seed(1)
    target = create_model("parameternet_debug", num_classes=10)
    fresh_head = target.classifier.weight.clone()
    load_init_weights(target, str(tmp_path))
    assert torch.equal(target.conv_stem.conv.weight, source.conv_stem.conv.weight)
    assert torch.equal(target.classifier.weight, fresh_head)
    with pytest.raises(ValueError, match="the export does not fit the model"):
        load_init_weights(create_model("llama_debug"), str(tmp_path))


def test_ds_config_from_the_job():
    from pnet_dist.engine import build_ds_config
    from pnet_dist.models import create_model
    cfg = make_cfg("image", deepspeed={"zero_stage": 3, "precision": "bf16", "grad_accum_steps": 2,
                                       "raw": {"zero_optimization": {"overlap_comm": True}}},
                   optim={"grad_clip": 0.5})
    config = build_ds_config(cfg, world_size=4, model=create_model("parameternet_debug"))
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 2, 32)
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert config["gradient_clipping"] == 0.5
    # BatchNorm model: bf16 through torch autocast; a model without BatchNorm: DeepSpeed bf16.
    assert config["torch_autocast"]["enabled"] and not config["bf16"]["enabled"]
    lm = build_ds_config(make_cfg("text", deepspeed={"offload_optimizer": True}), 1, create_model("llama_debug"))
    assert lm["bf16"]["enabled"] and not lm["torch_autocast"]["enabled"]
    assert lm["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_lower_modules_do_not_import_deepspeed_or_ray():
    code = ("import sys, pnet_dist.config, pnet_dist.dist, pnet_dist.optim, pnet_dist.tasks, pnet_dist.metrics; "
            "print(sorted(m for m in ('deepspeed', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_log_lines_carry_the_rank_set_after_the_logger_was_made(monkeypatch):
    """Ray Train sets RANK in a worker after pnet_dist is imported; the label must follow it."""
    import logging

    from pnet_dist.log import get_logger
    get_logger("pnet_dist.test_log")
    handler = logging.getLogger("pnet_dist").handlers[0]
    monkeypatch.setenv("RANK", "3")
    record = logging.LogRecord("pnet_dist.test_log", logging.INFO, __file__, 1, "hello", None, None)
    assert handler.filter(record)
    assert "[rank3] pnet_dist.test_log: hello" in handler.format(record)


def test_torchrun_restarts_without_a_store_per_round_are_refused_with_the_command():
    from pnet_dist.dist import check_torchrun_restarts
    shared = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    with pytest.raises(ValueError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=N"):
        check_torchrun_restarts(shared)
    check_torchrun_restarts({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"})  # a store per round
    check_torchrun_restarts({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"})        # never restarted
    check_torchrun_restarts({})                                                  # not under torchrun

