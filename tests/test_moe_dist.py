"""Expert parallelism on 2 gloo ranks: pure-torch EP, DeepSpeed ZeRO-1/2 EP=2 vs EP=1, checkpoints.

One spawn of two ranks runs every scenario (starting torch + DeepSpeed twice per scenario would
cost more than the scenarios); each rank writes its measurements to a file and the tests below
assert on them. Same global batch everywhere: rank r's micro-batch at step s is seeded by (s, r).
"""
from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

pytestmark = pytest.mark.dist

MODEL = "pnet_llama_debug_up_e4"
WORLD_SIZE = 2
NUM_STEPS = 3


def _batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 512, (2, 16), generator=generator)


def _lm_loss(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(),
                                             ids_BT[:, 1:].flatten())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _pure_torch_ep(rank: int, out: dict) -> None:
    """EP=2 sharded model vs the replicated model, no DeepSpeed: loss, grads, state-dict naming."""
    import torch.distributed as dist
    from pnet_dist.models import create_model
    from pnet_dist.models.moe import expert_state_dict, shard_experts

    group = dist.new_group([0, 1])
    for capacity_factor in (None, 0.5):
        full = create_model(MODEL, capacity_factor=capacity_factor)
        sharded = create_model(MODEL, capacity_factor=capacity_factor)
        shard_experts(sharded, group)
        ids = _batch(0, rank)
        losses = []
        for model in (full, sharded):
            logits, aux = model(ids)
            loss = _lm_loss(logits, ids) + aux
            loss.backward()
            losses.append(loss.item())
        # An expert's gradient gathers the tokens of every rank routed to it: sum the replicas'.
        reference = {name: param.grad.clone() for name, param in full.named_parameters()}
        for name, grad in reference.items():
            if ".experts." in name:
                dist.all_reduce(grad)
        worst_dense, worst_expert = 0.0, 0.0
        for name, param in sharded.named_parameters():
            err = _rel_err(param.grad, reference[name])
            if ".experts." in name:
                worst_expert = max(worst_expert, err)
            else:
                worst_dense = max(worst_dense, err)
        out[f"pure_cf{capacity_factor}"] = dict(losses=losses, dense_err=worst_dense,
                                                 expert_err=worst_expert)
    out["pure_expert_keys"] = sorted({k.split(".experts.")[1].split(".")[0]
                                      for k in expert_state_dict(sharded)})
    out["pure_allreduce_tags"] = sorted({(getattr(p, "allreduce", True), getattr(p, "group_name", ""))
                                         for n, p in sharded.named_parameters() if ".experts." in n})
    reloaded = create_model(MODEL)
    shard_experts(reloaded, group)
    reloaded.load_state_dict(full.state_dict(), strict=True)   # full (4-expert) dict into a shard
    out["pure_full_dict_loads"] = all(torch.equal(p, full.state_dict()[n])
                                      for n, p in reloaded.state_dict().items())


def _engine(ep_size: int, zero_stage: int, bf16: bool = False):
    import deepspeed
    from pnet_dist.models import create_model
    from pnet_dist.moe_deepspeed import moe_param_groups, setup_expert_parallel

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0,
              "steps_per_print": 10 ** 9, "bf16": {"enabled": bf16}}
    model = create_model(MODEL, device="meta")
    setup_expert_parallel(model, ep_size)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    groups = moe_param_groups([{"params": list(model.parameters()), "name": "all", "weight_decay": 0.1}])
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    # Warm-up then flat: the resumed steps must see the restored lr, not the initial one.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=config)
    return engine


def _train(engine, rank: int, steps: range, grads_out: dict | None = None) -> list[float]:
    from deepspeed.utils import safe_get_full_grad
    losses = []
    for step in steps:
        ids = _batch(step, rank)
        logits, aux = engine(ids)
        loss = _lm_loss(logits, ids) + aux
        engine.backward(loss)
        if grads_out is not None and step == steps[0]:
            for name, param in engine.module.named_parameters():
                grads_out[name] = safe_get_full_grad(param).clone()
        engine.step()
        losses.append(loss.item())
    return losses


def _full_fp32_params(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def _deepspeed_ep_vs_dp(rank: int, out: dict) -> None:
    for stage in (1, 2):
        runs = {}
        for ep_size in (1, 2):
            engine = _engine(ep_size, stage)
            grads: dict = {}
            losses = _train(engine, rank, range(NUM_STEPS), grads)
            runs[ep_size] = dict(losses=losses, grads=grads, params=_full_fp32_params(engine),
                                 moe_groups=sum(bool(g.get("moe")) for g in engine.optimizer.param_groups))
        ep1, ep2 = runs[1], runs[2]
        out[f"zero{stage}"] = dict(
            losses_ep1=ep1["losses"], losses_ep2=ep2["losses"],
            grad_err=max(_rel_err(g, ep1["grads"][n]) for n, g in ep2["grads"].items()),
            param_err=max(_rel_err(p, ep1["params"][n]) for n, p in ep2["params"].items()),
            num_params_ep1=len(ep1["params"]), num_params_ep2=len(ep2["params"]),
            moe_groups_ep2=ep2["moe_groups"])


def _checkpoint_roundtrip(rank: int, out: dict, ckpt_root: str) -> None:
    import torch.distributed as dist
    from pnet_dist.models.moe import expert_state_dict
    from pnet_dist.moe_deepspeed import load_checkpoint, save_checkpoint

    ckpt_root_list = [ckpt_root]
    dist.broadcast_object_list(ckpt_root_list, src=0)
    engine = _engine(2, 2)
    _train(engine, rank, range(2))
    save_checkpoint(engine, ckpt_root_list[0], "step2", client_state={"loader_position": 2})
    saved_experts = {k: v.clone() for k, v in expert_state_dict(engine.module).items()}
    reference = _train(engine, rank, range(2, 5))
    out["ckpt_reference"] = reference
    out["ckpt_saved_expert_names"] = sorted(saved_experts)
    gathered = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, saved_experts)
    all_saved = {k: v for part in gathered for k, v in part.items()}

    for ep_size in (2, 1):
        engine = _engine(ep_size, 2)
        client_state = load_checkpoint(engine, ckpt_root_list[0], "step2")
        held = expert_state_dict(engine.module)
        out[f"ckpt_ep{ep_size}"] = dict(
            client_state=client_state, global_steps=engine.global_steps,
            expert_names=sorted(held),
            experts_match=all(torch.equal(v, all_saved[k]) for k, v in held.items()),
            lr=[g["lr"] for g in engine.optimizer.param_groups],
            losses=_train(engine, rank, range(2, 5)))


def _bf16_checkpoint_roundtrip(rank: int, out: dict, ckpt_root: str) -> None:
    """bf16 weights with fp32 masters (the language recipe): EP=2 save, EP=2 and EP=1 resume."""
    import torch.distributed as dist
    from pnet_dist.moe_deepspeed import load_checkpoint, save_checkpoint

    root = [ckpt_root]
    dist.broadcast_object_list(root, src=0)
    engine = _engine(2, 2, bf16=True)
    _train(engine, rank, range(2))
    save_checkpoint(engine, root[0], "bf16_step2")
    out["bf16_reference"] = _train(engine, rank, range(2, 4))
    out["bf16_param_dtype"] = str(next(engine.module.parameters()).dtype)
    for ep_size in (2, 1):
        engine = _engine(ep_size, 2, bf16=True)
        load_checkpoint(engine, root[0], "bf16_step2")
        out[f"bf16_ep{ep_size}"] = _train(engine, rank, range(2, 4))


def _worker(rank: int, port: int, ckpt_root: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    # A rank that fails leaves its peer waiting in a collective: fail in minutes, not ten.
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    out: dict = {}
    _pure_torch_ep(rank, out)
    _deepspeed_ep_vs_dp(rank, out)
    _checkpoint_roundtrip(rank, out, ckpt_root)
    _bf16_checkpoint_roundtrip(rank, out, ckpt_root)
    torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    # DeepSpeed JIT-builds (or loads from TORCH_EXTENSIONS_DIR) its shm comm op in every
    # init_distributed; doing it here first keeps a cold build out of the ranks' rendezvous.
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
    with tempfile.TemporaryDirectory() as ckpt_root, tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(free_port(), ckpt_root, result_dir), nprocs=WORLD_SIZE,
                           start_method="spawn")
        yield [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
               for r in range(WORLD_SIZE)]


def test_pure_torch_expert_parallel_matches_replicated(results):
    for rank, out in enumerate(results):
        for capacity_factor in (None, 0.5):
            run = out[f"pure_cf{capacity_factor}"]
            assert run["losses"][1] == pytest.approx(run["losses"][0], rel=1e-6)
            assert run["dense_err"] <= 1e-5
            assert run["expert_err"] <= 1e-5
        assert out["pure_expert_keys"] == [str(e) for e in range(2 * rank, 2 * rank + 2)]
        assert out["pure_allreduce_tags"] == [(False, "ep_size_2")]
        assert out["pure_full_dict_loads"]


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_ep2_equals_ep1(results, stage):
    for out in results:
        run = out[f"zero{stage}"]
        assert run["moe_groups_ep2"] >= 1
        assert run["num_params_ep2"] < run["num_params_ep1"]   # experts really are sharded
        for loss_ep2, loss_ep1 in zip(run["losses_ep2"], run["losses_ep1"]):
            assert loss_ep2 == pytest.approx(loss_ep1, rel=1e-5)
        assert run["grad_err"] <= 1e-5
        assert run["param_err"] <= 1e-5
        # The model trains: losses change across steps.
        assert run["losses_ep1"][0] != run["losses_ep1"][-1]


def test_checkpoint_saved_with_ep2_resumes_at_ep2_and_ep1(results):
    for rank, out in enumerate(results):
        assert out["ckpt_saved_expert_names"] == sorted(
            f"layers.{layer}.ffn.up_proj.experts.{e}.{kind}"
            for layer in range(2) for e in range(2 * rank, 2 * rank + 2) for kind in ("weight", "bias"))
        ep2, ep1 = out["ckpt_ep2"], out["ckpt_ep1"]
        assert ep2["expert_names"] == out["ckpt_saved_expert_names"]
        assert len(ep1["expert_names"]) == 2 * len(ep2["expert_names"])   # all 4 experts at EP=1
        for resumed in (ep2, ep1):
            assert resumed["experts_match"]
            assert resumed["client_state"] == {"loader_position": 2}
            assert resumed["global_steps"] == 2
        assert ep2["losses"] == out["ckpt_reference"]                       # same topology: exact
        for loss, reference in zip(ep1["losses"], out["ckpt_reference"]):
            assert loss == pytest.approx(reference, rel=1e-5)


def test_bf16_checkpoint_saved_with_ep2_resumes_at_ep2_and_ep1(results):
    for out in results:
        assert out["bf16_param_dtype"] == "torch.bfloat16"
        assert out["bf16_ep2"] == out["bf16_reference"]
        for loss, reference in zip(out["bf16_ep1"], out["bf16_reference"]):
            assert loss == pytest.approx(reference, rel=2e-3)   # bf16 matmuls over other batch splits


def test_zero3_and_other_unsupported_settings_are_rejected_with_the_alternative():
    from pnet_dist.config import check_moe_deepspeed, config_from_dict

    def cfg(**deepspeed):
        return config_from_dict({"run_name": "r", "model": {"name": MODEL}, "data": {"kind": "text", "train_uri": "x"},
                                 "deepspeed": deepspeed}, source="job.yaml")
    with pytest.raises(ValueError, match="job.yaml: deepspeed.zero_stage: 3 is not supported; use 2"):
        check_moe_deepspeed(cfg(zero_stage=3), source="job.yaml")
    with pytest.raises(ValueError, match="deepspeed.precision: fp16"):
        check_moe_deepspeed(config_from_dict({"run_name": "r", "model": {"name": MODEL}, "scaling": {"use_gpu": True},
                                              "data": {"kind": "text", "train_uri": "x"},
                                              "deepspeed": {"precision": "fp16"}}))
    with pytest.raises(ValueError, match="offload_optimizer"):
        check_moe_deepspeed(cfg(offload_optimizer=True))
    with pytest.raises(ValueError, match="reduce_scatter"):
        check_moe_deepspeed(cfg(raw={"zero_optimization": {"reduce_scatter": False}}))
    check_moe_deepspeed(cfg(zero_stage=2, precision="bf16"))
    check_moe_deepspeed(cfg(zero_stage=1, precision="fp32"))