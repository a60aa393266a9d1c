"""Run the pretraining worker loop as one plain process (rank 0 of 1, gloo), without Ray or torchrun.

    python tests/dist/single_rank.py OUT_DIR '{"steps": 40, "lr": 1e-2}'

Used by tests that signal the process itself (preemption) or make it fail (non-finite loss).
Metrics and checkpoints land in OUT_DIR (pipeline.context.EnvWorkerContext).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import MODEL, PRETRAIN, SEED, VOCAB  # noqa: E402


def main(out: Path, changes: dict) -> None:
    from pipeline import preemption
    from pipeline.context import EnvWorkerContext
    from stages.pretrain import PretrainJob, Vocab, train_worker

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    pcfg = replace(PRETRAIN, num_workers=1, **changes)
    job = PretrainJob(
        section=pcfg, model=MODEL, seed=SEED, tokens_dir=out.parent / "tokens", tokenizer_dir=out.parent / "tokens",
        vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None), export_dir=out / "export", wandb_run_id=None,
    )  # fmt: skip
    result = train_worker(job, EnvWorkerContext(out))
    if preemption.STOPPED in result:  # as `launch.py run` ends when a stage stops on SIGTERM
        print(preemption.Preempted("pretrain", result[preemption.STOPPED]), file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_CODE)
    print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
