"""A rank that never joins a collective, under torchrun (2 ranks, gloo): the other fails fast.

    torchrun --nproc_per_node 2 tests/dist/collective_timeout.py TIMEOUT_S

Rank 0 averages a metric over the ranks (kiln/training.py `all_reduce_mean`, as the pretraining loop
does each step) in a process group joined by `init_distributed` with a timeout of TIMEOUT_S; rank 1
skips it and waits. Rank 0 prints the error it fails with and exits 1; rank 1 exits 0 after the wait.
Used by tests/test_pretrain_dist.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(timeout_s: float) -> None:
    import torch

    from kiln import training as T

    T.init_distributed(torch.device("cpu"), timeout_s / 60)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    started = time.monotonic()
    try:
        with T.collective_timeouts("pretrain", rank, world, timeout_s / 60):
            if rank == 0:
                T.all_reduce_mean({"loss": 1.0}, torch.device("cpu"))
            else:
                time.sleep(timeout_s + 10)
    except T.CollectiveTimeout as e:
        print(f"FAILED after {time.monotonic() - started:.1f} s: {e}", flush=True)
        os._exit(1)
    print(f"rank {rank}: done", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(float(sys.argv[1]))
