"""Run the pretraining worker loop under torchrun (2 ranks, gloo) for several DeepSpeed setups.

    torchrun --nproc_per_node 2 tests/dist/pretrain_cases.py OUT_DIR

Started once by tests/test_pretrain_dist.py. First every 2-rank case, in the one process group torchrun
set up; then that group is closed and each process runs its share of the 1-rank cases alone, in a group
of its own (both at once: a 1-rank case costs no extra launch). Each case writes OUT_DIR/<case>/
metrics.jsonl and its exported model OUT_DIR/<case>/export/ from its rank 0.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import CASES, PRETRAIN, SEED, VOCAB, model_for  # noqa: E402


def run_case(out: Path, name: str) -> None:
    from pipeline.context import EnvWorkerContext
    from stages.pretrain import PretrainJob, Vocab, train_worker

    tokens = out / "tokens"  # written by the test before the ranks start
    job = PretrainJob(
        section=replace(PRETRAIN, **CASES[name]), model=model_for(name), seed=SEED, tokens_dir=tokens,
        tokenizer_dir=tokens, vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None), export_dir=out / name / "export",
        wandb_run_id=None,
    )  # fmt: skip
    train_worker(job, EnvWorkerContext(out / name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: Path) -> None:
    import deepspeed.utils.groups
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    sizes = {name: replace(PRETRAIN, **changes).num_workers for name, changes in CASES.items()}
    for name in [n for n, size in sizes.items() if size == world]:
        run_case(out, name)
        dist.barrier()
    # gloo can abort at interpreter exit after the work is done (a known PyTorch gloo shutdown race): leave cleanly.
    dist.destroy_process_group()
    alone = [n for n, size in sizes.items() if size == 1]
    if world > 1:
        # a group of one, its own store on a free port (not torchrun's, which the closed group used)
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        for name in alone[rank::world]:
            deepspeed.utils.groups._WORLD_GROUP = None  # DeepSpeed's clone of the closed group
            os.environ["MASTER_PORT"] = str(free_port())
            run_case(out, name)  # its engine joins the new group (kiln/training.py init_distributed)
            dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
