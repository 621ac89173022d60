"""pnet_dist.dist's collectives on 2 gloo ranks (one spawn; each rank writes what it saw)."""
from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

pytestmark = pytest.mark.dist

WORLD_SIZE = 2


def _worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as torch_dist

    from pnet_dist import dist

    torch_dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    out = {}
    # Stats (float32) and buffers of two dtypes, different on each rank.
    stats = torch.tensor([1.0 + rank, 10.0 * rank, 0.25])
    buffers = [torch.full((3,), 2.0 + 4 * rank), torch.arange(4, dtype=torch.float64) * (rank + 1),
               torch.full((2, 2), 1.5 * rank, dtype=torch.bfloat16)]
    pending = dist.start_sum_and_average(stats, buffers)
    # The caller computes on while the collective travels: it changes the buffers, and issues
    # collectives of its own (as DeepSpeed's ZeRO step does) before waiting.
    for b in buffers:
        b.add_(100.0)
    other = torch.tensor([float(rank + 1)])
    torch_dist.all_reduce(other)
    out["sums"] = pending.wait()
    out["buffers"] = [b.clone() for b in buffers]
    out["other"] = other.item()
    out["blocking"] = dist.sum_and_average(torch.tensor([float(rank)]))
    torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(free_port(), result_dir), nprocs=WORLD_SIZE, start_method="spawn")
        yield [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


def test_sum_and_average_in_flight_sums_the_values_at_its_start_and_averages_the_buffers_on_wait(results):
    for out in results:
        assert out["sums"] == [1.0 + 2.0, 0.0 + 10.0, 0.5]
        # The means of the values at the start, whatever the buffers became in between.
        assert torch.equal(out["buffers"][0], torch.full((3,), 4.0))
        assert torch.equal(out["buffers"][1], torch.arange(4, dtype=torch.float64) * 1.5)
        assert torch.equal(out["buffers"][2], torch.full((2, 2), 0.75, dtype=torch.bfloat16))
        assert out["buffers"][2].dtype == torch.bfloat16
        assert out["other"] == 3.0        # a collective issued while ours was in flight
        assert out["blocking"] == [1.0]
