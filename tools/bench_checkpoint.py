"""Benchmark the checkpoint path against its baselines, in one run, on this machine.

Rows (ratios, each the median of --repeats measurements):
  blocked / sync save    time the training loop is blocked in save() with async_upload=True (the
                         engine's save with its state dicts copied to CPU memory), over the wall
                         time of a synchronous save (write + upload + manifest) of the same state.
                         Target <= 0.10.
  stall / sync save      the same plus the extra time of every step run while the background
                         write and upload are in flight, over the median step just before. On a
                         GPU host the background work runs on otherwise idle cores; on this
                         2-core CPU-only machine it takes CPU from the training loop itself (and
                         so does the moto server, which stands in for remote S3).
  upload throughput      bytes/s of our upload of one checkpoint whose files are written (the
                         uploads -- with the sha256 taken from the bytes as the background write
                         produced them, so the upload reads each file in parallel parts as
                         upload_file does --, receipt, MANIFEST, COMPLETE;
                         CheckpointStore.last_upload_stats; the pruning of old checkpoints after
                         COMPLETE is printed apart) over bytes/s of a raw boto3 upload_file of the
                         same files, one after the other, right after DeepSpeed's save_checkpoint
                         wrote them (ours too uploads right after its write; the order of the two
                         alternates between repeats). Target >= 0.9.
                         A second row compares write + upload with DeepSpeed's save_checkpoint +
                         upload_file, so the hashing cost moved into the write shows.
  step rate in outage    training steps/s while the checkpoint prefix is unreachable for
                         --outage-s seconds (pnet_dist.faults.OutageProxy between the checkpointer
                         and moto resets every connection) right as a checkpoint starts uploading,
                         over steps/s with storage up and no checkpoint in flight; the checkpoint
                         must complete once the outage is over. Target >= 0.9.

A moto S3 server is started on 127.0.0.1 in its own process (it would otherwise share the GIL with
the training loop). One DeepSpeed rank (ZeRO-1, gloo, torch AdamW) trains an MLP on one torch
thread, as a GPU job's host thread would leave CPU to I/O; on this CPU-only machine every cycle the
upload (sha256, HTTP) and the moto server take still slows the training loop, and counts as stall.

    python tools/bench_checkpoint.py [--params-m 12] [--repeats 5] [--outage-s 60] [--rows-json]

tools/bench_engine.py runs this script too (with --rows-json) and prints its rows in its own table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("PNET_LOG_LEVEL", "WARNING")


def start_moto() -> tuple[subprocess.Popen, str]:
    from pnet_dist.dist import free_port
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start within 30 s")


def build_engine(params_m: float):
    import deepspeed
    import torch
    from torch import nn
    width = int((params_m * 1e6 / 4) ** 0.5)  # four width x width layers
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.GELU())])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, width


def step_times(engine, width: int, num_steps: int) -> list[float]:
    import torch
    x = torch.randn(32, width)
    times = []
    for _ in range(num_steps):
        started = time.perf_counter()
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
    return times


def stall_of_one_async_checkpoint(engine, width: int, manager, step: int, num_base_steps: int) -> tuple[float, float]:
    """(blocking, total) seconds the loop lost to one async checkpoint: the save() call alone, and
    that plus how much longer the steps ran while the background write + upload was in flight,
    against the median step just before."""
    base_s = statistics.median(step_times(engine, width, num_base_steps))
    started = time.perf_counter()
    manager.save(step, {"step": Value(step)}, wait_for_previous=True)
    blocking = time.perf_counter() - started
    lost = blocking
    while manager.store.busy():
        lost += step_times(engine, width, 1)[0] - base_s
    started = time.perf_counter()
    manager.wait()
    return blocking, lost + time.perf_counter() - started


class Value:
    """A Stateful holding one value (what the bench saves beside the engine)."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        self.value = state


def checkpointer(engine, uri: str, async_upload: bool, endpoint: str | None = None):
    """An EngineCheckpointer that has claimed its run folder (and made its S3 client)."""
    from pnet_dist.checkpoint import CheckpointStore
    from pnet_dist.engine_checkpoint import EngineCheckpointer
    from pnet_dist.storage import s3_client
    store = CheckpointStore(uri, keep_last=1, async_upload=async_upload)
    if endpoint is not None:
        saved = os.environ["AWS_ENDPOINT_URL_S3"]
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        store.storage._client = s3_client()
        os.environ["AWS_ENDPOINT_URL_S3"] = saved
    ckpt = EngineCheckpointer(engine, store)
    ckpt.start({})
    return ckpt


def step_rate_in_outage(engine, width: int, endpoint: str, outage_s: float) -> tuple[float, float]:
    """(steps/s during an outage of the checkpoint prefix that starts with a checkpoint, steps/s
    with storage up and no checkpoint in flight)."""
    from pnet_dist.faults import OutageProxy
    proxy = OutageProxy(int(endpoint.rsplit(":", 1)[1]))
    try:
        ckpt = checkpointer(engine, "s3://bench/outage", async_upload=True, endpoint=proxy.endpoint)

        def steps_per_s(seconds: float, checkpoint_at: int | None = None) -> float:
            started, num_steps = time.perf_counter(), 0
            if checkpoint_at is not None:
                ckpt.save(checkpoint_at, {"step": Value(checkpoint_at)}, wait_for_previous=False)
            while time.perf_counter() - started < seconds:
                step_times(engine, width, 1)
                num_steps += 1
            return num_steps / (time.perf_counter() - started)

        normal = steps_per_s(outage_s)
        proxy.set_mode("refuse")
        in_outage = steps_per_s(outage_s, checkpoint_at=1)
        assert ckpt.store.busy(), "the checkpoint finished during the outage: the outage did not hold it"
        proxy.set_mode("pass")
        ckpt.wait()
        assert ckpt.store.latest_complete() == 1, "the checkpoint did not complete after the outage"
        return in_outage, normal
    finally:
        proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, default=12.0, help="model size in millions of parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base-steps", type=int, default=10, help="steps timed before each checkpoint")
    parser.add_argument("--outage-s", type=float, default=60.0,
                        help="length of the storage outage (and of the normal-rate window before it)")
    parser.add_argument("--rows-json", action="store_true",
                        help="also print the rows as one 'BENCH_ROWS <json>' line (read by bench_engine.py)")
    args = parser.parse_args()
    import torch   # torch, deepspeed and boto3 load after --help
    from pnet_dist.dist import free_port
    torch.set_num_threads(1)
    load_at_start = os.getloadavg()[0]

    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        import boto3
        import torch.distributed as dist
        from boto3.s3.transfer import TransferConfig

        dist.init_process_group("gloo")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        engine, width = build_engine(args.params_m)
        step_times(engine, width, 5)  # warm-up
        step_s = statistics.median(step_times(engine, width, 20))

        counter = iter(range(1, 10**6))
        sync_s, blocking, stall, ours_s, raw_s, prune_s, raw_bytes = [], [], [], [], [], [], []
        ours_total_s, raw_total_s = [], []
        num_bytes = 0
        for repeat in range(args.repeats):
            # synchronous save: what the training loop would wait for without the background upload
            sync = checkpointer(engine, f"s3://bench/sync{repeat}", async_upload=False)
            started = time.perf_counter()
            sync.save(next(counter), {"step": Value(0)}, wait_for_previous=True)
            sync_s.append(time.perf_counter() - started)

            manager = checkpointer(engine, f"s3://bench/async{repeat}", async_upload=True)
            blocked_s, lost_s = stall_of_one_async_checkpoint(engine, width, manager, next(counter), args.base_steps)
            blocking.append(blocked_s)
            stall.append(lost_s)

            # upload throughput: ours (no training running; the upload of files the save just
            # wrote) vs raw boto3 of the same bytes just written by DeepSpeed; which runs first
            # alternates
            step = next(counter)

            def ours() -> None:
                manager.save(step, {"step": Value(step)}, wait_for_previous=True)
                manager.wait()
                ours_s.append(manager.last_upload_stats["upload_s"])
                ours_total_s.append(manager.last_upload_stats["write_s"] + manager.last_upload_stats["upload_s"])
                prune_s.append(manager.last_upload_stats["prune_s"])

            def raw() -> None:
                # The baseline's files are written by DeepSpeed right before their upload, as ours
                # are: both uploads then read files equally fresh (a file written seconds earlier
                # has been flushed to disk meanwhile, and its upload no longer shares the disk and
                # CPU with the kernel's writeback).
                with tempfile.TemporaryDirectory() as tmp:
                    write_started = time.perf_counter()
                    engine.save_checkpoint(tmp, tag="raw", client_state={}, save_latest=False)
                    torch.save({"step": step}, Path(tmp) / "raw" / "client_state_rank_00000.pt")
                    files = sorted(p for p in (Path(tmp) / "raw").rglob("*") if p.is_file())
                    started = time.perf_counter()
                    for path in files:
                        client.upload_file(str(path), "bench", f"raw{repeat}/{path.name}", Config=TransferConfig())
                    raw_s.append(time.perf_counter() - started)
                    raw_total_s.append(time.perf_counter() - write_started)
                    raw_bytes.append(sum(p.stat().st_size for p in files))
                for path in files:
                    client.delete_object(Bucket="bench", Key=f"raw{repeat}/{path.name}")

            if repeat % 2:
                raw()
                ours()
            else:
                ours()
                raw()
            num_bytes = manager.last_upload_stats["num_bytes"]
            assert abs(raw_bytes[-1] - num_bytes) < 0.01 * num_bytes, "baseline bytes differ"
            shutil.rmtree(Path(tempfile.gettempdir()) / "pnet_dist_staging", ignore_errors=True)

        outage_rate, normal_rate = step_rate_in_outage(engine, width, endpoint, args.outage_s)
        sync_med, stall_med, blocking_med = statistics.median(sync_s), statistics.median(stall), statistics.median(blocking)
        ours_med, raw_med = statistics.median(ours_s), statistics.median(raw_s)
        ours_total_med, raw_total_med = statistics.median(ours_total_s), statistics.median(raw_total_s)
        print(f"load average (1 min) at start {load_at_start:.1f}, at end {os.getloadavg()[0]:.1f}")
        print(f"\nmodel {args.params_m:g}M params, checkpoint {num_bytes / 1e6:.1f} MB, step {step_s * 1e3:.1f} ms, "
              f"{args.repeats} repeats (medians), moto on {endpoint}, {os.cpu_count()} CPU cores\n")
        print("| metric | ours | baseline | ratio | target |")
        print("|---|---|---|---|---|")
        print(f"| training blocked by save() (async) vs sync save | {blocking_med:.3f} s | {sync_med:.3f} s | "
              f"{blocking_med / sync_med:.3f} | <= 0.10 |")
        print(f"| training stall incl. CPU shared with the background write/upload and moto | {stall_med:.3f} s | "
              f"{sync_med:.3f} s | {stall_med / sync_med:.3f} | (explains the row above) |")
        print(f"| upload throughput vs raw boto3 upload_file | {num_bytes / ours_med / 1e6:.1f} MB/s | "
              f"{num_bytes / raw_med / 1e6:.1f} MB/s | {raw_med / ours_med:.3f} | >= 0.9 |")
        print(f"| write + upload (ours hashes while writing) vs DeepSpeed save_checkpoint + upload_file | "
              f"{num_bytes / ours_total_med / 1e6:.1f} MB/s | {num_bytes / raw_total_med / 1e6:.1f} MB/s | "
              f"{raw_total_med / ours_total_med:.3f} | (the hash is not hidden in the write) |")
        print(f"| training steps/s during a {args.outage_s:g} s outage of the checkpoint prefix vs storage up | "
              f"{outage_rate:.2f} | {normal_rate:.2f} | {outage_rate / normal_rate:.3f} | >= 0.9 |")
        if args.rows_json:
            mb = num_bytes / 1e6
            rows = [  # name, ours, baseline, unit, ratio, target (op, value)
                (f"checkpoint {mb:.0f} MB: training blocked by async save() / sync save", blocking_med, sync_med, "s",
                 blocking_med / sync_med, ["<=", 0.10]),
                ("  same, plus CPU the background upload and moto take from the loop", stall_med, sync_med, "s",
                 stall_med / sync_med, None),
                (f"checkpoint {mb:.0f} MB: upload throughput, ours / raw boto3", mb / ours_med, mb / raw_med, "MB/s",
                 raw_med / ours_med, [">=", 0.9]),
                ("  same, write + upload / DeepSpeed save_checkpoint + upload_file", mb / ours_total_med,
                 mb / raw_total_med, "MB/s", raw_total_med / ours_total_med, None),
                (f"training steps/s in a {args.outage_s:g} s checkpoint-storage outage / storage up", outage_rate,
                 normal_rate, "st/s", outage_rate / normal_rate, [">=", 0.9])]
            print("BENCH_ROWS " + json.dumps(rows), flush=True)
        print(f"\nraw seconds: sync {[round(s, 3) for s in sync_s]}, blocked {[round(s, 3) for s in blocking]}, "
              f"stall {[round(s, 3) for s in stall]}, "
              f"ours upload {[round(s, 3) for s in ours_s]}, raw upload {[round(s, 3) for s in raw_s]}, "
              f"ours write + upload {[round(s, 3) for s in ours_total_s]}, "
              f"raw write + upload {[round(s, 3) for s in raw_total_s]}, "
              f"ours pruning after COMPLETE {[round(s, 3) for s in prune_s]}")
        dist.destroy_process_group()
    finally:
        moto.kill()
        moto.wait()


if __name__ == "__main__":
    from pnet_dist.cli import run
    sys.exit(run(main))
