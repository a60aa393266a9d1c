"""Run the pretraining worker loop under torchrun (2 ranks, gloo) for several DeepSpeed setups.

    torchrun --nproc_per_node 2 tests/dist/pretrain_cases.py OUT_DIR

Started once by tests/test_pretrain_dist.py: one process group for every case (DeepSpeed cannot
re-create it in one process). Each case writes OUT_DIR/<case>/metrics.jsonl from rank 0.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import CASES, PRETRAIN, SEED, VOCAB, model_for  # noqa: E402


def main(out: Path) -> None:
    import torch.distributed as dist

    from pipeline.context import EnvWorkerContext
    from stages.pretrain import PretrainJob, Vocab, train_worker

    tokens = out / "tokens"  # written by the test before the ranks start
    for name, changes in CASES.items():
        pcfg = replace(PRETRAIN, **changes)
        job = PretrainJob(
            section=pcfg, model=model_for(name), seed=SEED, tokens_dir=tokens, tokenizer_dir=tokens,
            vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None), export_dir=out / name / "export", wandb_run_id=None,
        )  # fmt: skip
        train_worker(job, EnvWorkerContext(out / name))
        dist.barrier()
    # gloo can abort at interpreter exit after the work is done (a known PyTorch gloo shutdown race): leave cleanly.
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
