"""Benchmark the MoE projection and the ParameterNet-LLaMA models; prints tables of ratios.

CPU mode (default), each baseline measured in the same run:
  1. MoE-8 projection vs the dense Linear of the same active FLOPs (forward + backward);
  2. debug LLaMA training step, dense vs MoE-8 on the up projection (tokens/s);
  3. expert parallel EP=2 vs EP=1 (replicated experts) on 2 gloo ranks (forward + backward).
GPU mode (--gpu): tokens/s and MFU of llama_1b and pnet_llama_1b_up_e8 at sequence 2048 on one
GPU, bf16 autocast, fp32 master weights, forward + backward + AdamW step, CUDA-synchronised timing;
FLOPs per token = 6 * active params + 12 * layers * dim * seq (LlamaForCausalLM.train_flops_per_token).

    python tools/bench_moe.py            # CPU tables
    python tools/bench_moe.py --gpu      # GPU table (peak bf16 TFLOP/s guessed for H100/H200)
    python tools/bench_moe.py --gpu --dry-run   # the GPU table's code on the CPU: debug models,
                                                # seq 64, MFU against --peak-tflops (default 1)
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="GPU tokens/s and MFU for the 1B models")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak bf16 TFLOP/s")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: on a small shared machine, extra "
                             "threads mostly measure OpenMP barriers waiting on other processes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --gpu: the same code on the CPU with the debug models, in seconds "
                             "(tools/gpu_check.sh in CI)")
    args = parser.parse_args()
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu (the CPU tables are already small)")
    return args


if __name__ == "__main__":
    ARGS = parse_args()   # --help and usage errors answer before torch loads (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pnet_dist.models import create_model  # noqa: E402
from pnet_dist.models.moe import MoEProjection, shard_experts  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _median_seconds(fns, warmup: int, repeats: int, sync=lambda: None,
                    clock=time.perf_counter) -> list[float]:
    """Median time of each fn; the fns take turns so that load from other processes on a shared
    machine falls on ours and the baseline alike. clock=time.process_time measures the CPU time
    of a single-threaded process, which other processes do not inflate."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = clock()
            fn()
            sync()
            fn_times.append(clock() - start)
    return [statistics.median(t) for t in times]


def _fwd_bwd(layer, x):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        y.sum().backward()
    return step


def bench_projection(num_tokens: int, repeats: int, clock=time.perf_counter) -> list[tuple]:
    rows = []
    for label, d_in, d_out in (("up 512->2048", 512, 2048), ("down 2048->512", 2048, 512)):
        torch.manual_seed(0)
        x = torch.randn(4, num_tokens // 4, d_in, requires_grad=True)   # inside a network
        dense = torch.nn.Linear(d_in, d_out)           # one expert's FLOPs (experts have a bias)
        moe = MoEProjection(d_in, d_out, 8)
        t_dense, t_moe = _median_seconds([_fwd_bwd(dense, x), _fwd_bwd(moe, x)], 2, repeats, clock=clock)
        rows.append((label, num_tokens, t_dense * 1e3, t_moe * 1e3, t_moe / t_dense))
    return rows


def _train_step(model, optimizer, ids, autocast_dtype: torch.dtype | None):
    def step():
        with torch.autocast(ids.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits, aux = model(ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_training(model_names, device: torch.device, batch: int, seq_len: int, repeats: int,
                   autocast_dtype: torch.dtype | None = None, sync=lambda: None,
                   clock=time.perf_counter) -> list[dict]:
    """Tokens/s and achieved FLOP/s of a full training step per model (built on meta, then init).

    All models are held at once so their steps can take turns (see _median_seconds).
    """
    models, steps = [], []
    for name in model_names:
        model = create_model(name, device="meta")
        model.to_empty(device=device)
        model.init_weights()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        ids = torch.randint(0, model.cfg.vocab_size, (batch, seq_len), device=device)
        models.append(model)
        steps.append(_train_step(model, optimizer, ids, autocast_dtype))
    results = []
    for name, model, seconds in zip(model_names, models, _median_seconds(steps, 2, repeats, sync, clock)):
        tokens_per_s = batch * seq_len / seconds
        results.append(dict(name=name, params=sum(p.numel() for p in model.parameters()),
                            tokens_per_s=tokens_per_s,
                            flops_per_s=tokens_per_s * model.train_flops_per_token(seq_len)))
    return results


def _ep_worker(rank: int, port: int, result_dir: str, batch: int, seq_len: int, repeats: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    x = torch.randn(batch, seq_len, 512, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    torch.manual_seed(0)
    replicated = MoEProjection(512, 2048, 8)
    sharded = MoEProjection(512, 2048, 8)
    shard_experts(sharded, group)
    dist.barrier()
    seconds = _median_seconds([_fwd_bwd(replicated, x), _fwd_bwd(sharded, x)], 2, repeats,
                              sync=dist.barrier)
    results = dict(zip((1, 2), seconds))
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def bench_expert_parallel(batch: int, seq_len: int, repeats: int) -> list[tuple]:
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_ep_worker, args=(port, result_dir, batch, seq_len, repeats), nprocs=2,
                           start_method="spawn")
        per_rank = [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(2)]
    seconds = {ep: max(r[ep] for r in per_rank) for ep in (1, 2)}
    tokens = batch * seq_len
    return [(f"EP={ep}", 8 // ep, tokens / seconds[ep]) for ep in (1, 2)] + \
        [("EP=2 / EP=1 time", None, seconds[2] / seconds[1])]


GPU_MODELS = ("llama_1b", "pnet_llama_1b_up_e8")
DRY_RUN_MODELS = ("llama_debug", "pnet_llama_debug_up_e8")


def bench_gpu(batch: int, seq_len: int, repeats: int, peak_tflops: float | None, dry_run: bool = False) -> list[tuple]:
    if dry_run:  # the same rows from the CPU; the MFU column is against the given peak
        return [(name, "cpu (dry run)", batch, result["tokens_per_s"], result["flops_per_s"] / 1e12,
                 result["flops_per_s"] / ((peak_tflops or 1.0) * 1e12), 0.0)
                for name in DRY_RUN_MODELS
                for (result,) in [bench_training([name], torch.device("cpu"), batch, seq_len, repeats, torch.bfloat16)]]
    device = torch.device("cuda")
    device_name = torch.cuda.get_device_name(device)
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
        if peak_tflops is None:
            raise ValueError(f"unknown peak bf16 TFLOP/s for {device_name!r}; pass --peak-tflops")
    rows = []
    for name in GPU_MODELS:
        torch.cuda.reset_peak_memory_stats(device)
        (result,) = bench_training([name], device, batch, seq_len, repeats, torch.bfloat16,
                                   sync=torch.cuda.synchronize)
        rows.append((name, device_name, batch, result["tokens_per_s"], result["flops_per_s"] / 1e12,
                     result["flops_per_s"] / (peak_tflops * 1e12),
                     torch.cuda.max_memory_allocated(device) / 2**30))
        torch.cuda.empty_cache()
    return rows


def _print_table(title: str, header: tuple, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(_format(v) for v in row))


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def main(args: argparse.Namespace) -> None:
    if args.gpu:
        seq_len = 64 if args.dry_run else 2048
        rows = bench_gpu(args.batch or (2 if args.dry_run else 4), seq_len, 1 if args.dry_run else args.repeats,
                         args.peak_tflops, args.dry_run)
        _print_table(f"{'debug models (dry run)' if args.dry_run else '1B models'}, seq {seq_len}, bf16 autocast, "
                     "fwd+bwd+AdamW",
                     ("model", "device", "batch", "tokens/s", "TFLOP/s", "MFU", "peak GiB"), rows)
        dense, moe = rows
        print(f"\nMoE-8 (up) / dense tokens/s: {moe[3] / dense[3]:.3f}")
        return

    torch.set_num_threads(args.threads)
    # One thread: CPU time of this process is the cost; more threads: wall time.
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"CPU threads: {torch.get_num_threads()} (of {os.cpu_count()} cores); sections 1-2 timed "
          f"by {'process CPU time' if args.threads == 1 else 'wall time'}, section 3 by wall time")
    _print_table("1. MoE-8 projection vs dense projection of the same active FLOPs (fwd+bwd)",
                 ("projection", "tokens", "dense ms", "MoE-8 ms", "MoE/dense"),
                 bench_projection(4096, args.repeats, clock))
    results = bench_training(("llama_debug", "pnet_llama_debug_up_e8"), torch.device("cpu"),
                             args.batch or 8, 128, args.repeats, clock=clock)
    rows = [(r["name"], r["params"] / 1e6, r["tokens_per_s"]) for r in results]
    rows.append(("MoE / dense tokens/s", None, rows[1][2] / rows[0][2]))
    _print_table("2. debug LLaMA training step (batch 8 x 128)", ("model", "params (M)", "tokens/s"), rows)
    _print_table("3. MoE-8 projection 512->2048, 2 gloo ranks x 1 thread, 2048 tokens per rank (fwd+bwd)",
                 ("layout", "experts per rank", "tokens/s per rank"),
                 bench_expert_parallel(8, 256, args.repeats))


if __name__ == "__main__":
    import sys

    from pnet_dist.cli import run
    sys.exit(run(lambda: main(ARGS)))
