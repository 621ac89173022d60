"""Checkpoints across world sizes with real DeepSpeed on gloo: save on 2 ranks (ZeRO-1/2/3, and an
expert-parallel MoE LLaMA), resume on 1 rank, compare weights and optimizer states exactly and the
continued training with the 2-rank continuation; then the 1-rank checkpoint back on 2 ranks, and a
corrupted shard that only one rank reads: both ranks fall back to the older checkpoint together.

This file is also the worker program: `python tests/test_checkpoint_dist.py MODE OUT_DIR ROOT...`
runs on every rank (RANK / WORLD_SIZE / MASTER_* set by `run_ranks`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
STAGES = (1, 2, 3)
SAVE_STEP = 3
NUM_CONTINUE = 3
MICRO_BATCH = 4


# -- worker side -----------------------------------------------------------------------------
def mlp_engine(stage: int, grad_accum: int):
    import deepspeed
    from torch import nn
    torch.manual_seed(0)
    # BatchNorm: its running statistics must come back on every load path, the universal one too
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.5 * s))
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": grad_accum,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def moe_engine(ep_size: int, grad_accum: int):
    import deepspeed
    from pnet_dist import moe_deepspeed
    from pnet_dist.models import create_model
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": grad_accum,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    model = create_model("pnet_llama_debug_up_e4")
    moe_deepspeed.setup_expert_parallel(model, ep_size)
    groups = moe_deepspeed.moe_param_groups([{"params": list(model.parameters()), "name": "all"}])
    optimizer = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def mlp_loss(engine, sample: int) -> torch.Tensor:
    x = torch.randn(MICRO_BATCH, 8, generator=torch.Generator().manual_seed(sample))
    return (engine(x) - 1).pow(2).mean()


def moe_loss(engine, sample: int) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(sample))
    logits, aux = engine(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux


def train_step(engine, loss_fn, step: int, rank: int, world: int, grad_accum: int) -> float:
    """One optimizer step over the same 2 micro-batches whatever the layout: sample = 2*step + slot."""
    import torch.distributed as dist
    total = 0.0
    for micro in range(grad_accum):
        loss = loss_fn(engine, 2 * step + rank * grad_accum + micro)
        engine.backward(loss)
        engine.step()
        total += loss.item()
    mean = torch.tensor(total / grad_accum, dtype=torch.float64)
    dist.all_reduce(mean)
    return mean.item() / world


def full_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights and Adam moments of every parameter this rank holds, and its buffers (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, param in engine.module.named_parameters():
        out[name] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).clone()
    out.update({f"buffer/{name}": buffer.clone() for name, buffer in engine.module.named_buffers()})
    if engine.lr_scheduler is not None:
        out["lr"] = torch.tensor(engine.lr_scheduler.get_last_lr())
    return out


class Box:
    """A Stateful holding one value."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        self.value = state


def worker(mode: str, out_dir: Path, roots: list[str]) -> None:
    """mlp / moe on 2 ranks: train, checkpoints at steps 2 and 3; on 1 rank: resume (step 3),
    continue, checkpoint step 6. mlp_grow on 2 ranks: resume whatever is newest and usable."""
    import deepspeed
    import torch.distributed as dist
    from pnet_dist.checkpoint import CheckpointStore
    from pnet_dist.engine_checkpoint import EngineCheckpointer
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    grad_accum = 2 // world
    cases = ([(f"zero{s}", lambda s=s: mlp_engine(s, grad_accum), mlp_loss) for s in STAGES]
             if mode.startswith("mlp") else [("moe", lambda: moe_engine(world, grad_accum), moe_loss)])
    for (name, build, loss_fn), root in zip(cases, roots):
        engine = build()
        ckpt = EngineCheckpointer(engine, CheckpointStore(root, keep_last=3))
        info = Box()
        step = ckpt.start({"info": info})
        result: dict = {"step": step, "info": info.value}
        if step is None:
            for step in range(SAVE_STEP):
                train_step(engine, loss_fn, step, rank, world, grad_accum)
                if step + 1 >= SAVE_STEP - 1:
                    ckpt.save(step + 1, {"info": Box({"step": step + 1, "rank": rank})}, wait_for_previous=True)
                    result[f"state{step + 1}"] = full_state(engine)  # the training state the checkpoint holds
            result["state"] = result[f"state{SAVE_STEP}"]
        else:
            result.update(saved_world=ckpt.store.manifest(step)["world_size"], state=full_state(engine))
        if mode != "mlp_grow":
            result["continued"] = [train_step(engine, loss_fn, s, rank, world, grad_accum)
                                   for s in range(SAVE_STEP, SAVE_STEP + NUM_CONTINUE)]
        if world == 1:
            ckpt.save(SAVE_STEP + NUM_CONTINUE, {"info": Box({"step": SAVE_STEP + NUM_CONTINUE, "rank": rank})},
                      wait_for_previous=True)
            result["final_state"] = full_state(engine)
        ckpt.wait()
        torch.save(result, out_dir / f"{name}_{mode}_world{world}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# -- test side -------------------------------------------------------------------------------
def run_ranks(num_ranks: int, mode: str, out_dir: Path, roots: list[str], timeout_s: float = 400) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(num_ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(num_ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, __file__, mode, str(out_dir), *roots], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output[-6000:]}"


def load_result(out_dir: Path, name: str, mode: str, world: int, rank: int) -> dict:
    return torch.load(out_dir / f"{name}_{mode}_world{world}_rank{rank}.pt", weights_only=False)


def check_shrink(out_dir: Path, name: str, mode: str) -> None:
    """2 ranks saved, 1 rank loaded: same state exactly, same continued losses within tolerance."""
    saved_parts = [load_result(out_dir, name, mode, 2, r) for r in (0, 1)]
    loaded = load_result(out_dir, name, mode, 1, 0)
    assert loaded["step"] == SAVE_STEP and loaded["saved_world"] == 2
    assert loaded["info"] == {"step": SAVE_STEP, "rank": 0}
    saved = {**saved_parts[1]["state"], **saved_parts[0]["state"]}  # MoE: each rank holds its experts
    assert loaded["state"].keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded["state"][key], value), f"{name}: {key} differs after the 2 -> 1 rank load"
    assert saved_parts[0]["continued"] == saved_parts[1]["continued"]
    torch.testing.assert_close(loaded["continued"], saved_parts[0]["continued"], rtol=1e-5, atol=1e-7)


def test_zero123_saved_on_2_ranks_resume_on_1_rank(tmp_path, s3_bucket):
    roots = [str(tmp_path / "zero1"), f"{s3_bucket}/zero2", str(tmp_path / "zero3")]
    run_ranks(2, "mlp", tmp_path, roots)
    for root in (roots[0], roots[2]):
        manifest = json.loads((Path(root) / "ckpt" / "step_00000003" / "MANIFEST.json").read_text())
        assert manifest["world_size"] == 2
        assert {"client_state_rank_00000.pt", "client_state_rank_00001.pt"} <= manifest["files"].keys()
        assert any("zero_pp_rank_1" in rel for rel in manifest["files"])
    run_ranks(1, "mlp", tmp_path, roots)
    for stage in STAGES:
        check_shrink(tmp_path, f"zero{stage}", "mlp")
    # the universal form made by the first 1-rank resume is stored for the next one
    assert (Path(roots[0]) / "ckpt" / "step_00000003" / "universal" / "COMPLETE").is_file()

    # back on 2 ranks: ZeRO-2/3 load the 1-rank checkpoint; for ZeRO-1 the newest is the 2-rank
    # step 3 with a same-size corruption of the shard only rank 1 reads -- both ranks fall back to
    # step 2 together, neither hangs
    shutil.rmtree(Path(roots[0]) / "ckpt" / f"step_{SAVE_STEP + NUM_CONTINUE:08d}")
    shard = Path(roots[0]) / "ckpt" / "step_00000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    shard.write_bytes(bytes(data))
    run_ranks(2, "mlp_grow", tmp_path, roots)
    for stage in (2, 3):
        saved = load_result(tmp_path, f"zero{stage}", "mlp", 1, 0)
        for rank in (0, 1):
            grown = load_result(tmp_path, f"zero{stage}", "mlp_grow", 2, rank)
            assert grown["step"] == SAVE_STEP + NUM_CONTINUE and grown["info"]["rank"] == 0
            assert grown["state"].keys() == saved["final_state"].keys()
            for key, value in saved["final_state"].items():
                assert torch.equal(grown["state"][key], value), f"zero{stage} rank {rank}: {key} after 1 -> 2 ranks"
    for rank in (0, 1):
        fallback = load_result(tmp_path, "zero1", "mlp_grow", 2, rank)
        assert fallback["step"] == SAVE_STEP - 1 and fallback["info"] == {"step": SAVE_STEP - 1, "rank": rank}
        saved = load_result(tmp_path, "zero1", "mlp", 2, 0)["state2"]  # a checkpoint holds rank 0's buffers
        assert all(torch.equal(fallback["state"][key], value) for key, value in saved.items())
    damaged = json.loads((Path(roots[0]) / "ckpt" / "step_00000003" / "DAMAGED").read_text())
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256" in damaged["reason"]


def test_expert_parallel_moe_saved_on_2_ranks_resume_on_1_rank(tmp_path):
    pytest.importorskip("pnet_dist.moe_deepspeed")
    roots = [str(tmp_path / "moe")]
    run_ranks(2, "moe", tmp_path, roots)
    manifest = json.loads((tmp_path / "moe" / "ckpt" / "step_00000003" / "MANIFEST.json").read_text())
    assert manifest["format"] == "moe" and manifest["world_size"] == 2
    assert {f"expert_{e:03d}.pt" for e in range(4)} <= manifest["files"].keys()
    assert {meta["rank"] for rel, meta in manifest["files"].items() if rel.startswith("expert_")} == {0, 1}
    run_ranks(1, "moe", tmp_path, roots)
    check_shrink(tmp_path, "moe", "moe")


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
