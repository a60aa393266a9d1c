"""The tiny setup shared by the 2-process pretraining tests and their single-process reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.config import ModelConfig, PretrainConfig

SEED, VOCAB, SEQ, STEPS = 7, 256, 32, 3
MODEL = ModelConfig(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4, top_k=2, max_seq_len=SEQ
)
PRETRAIN = PretrainConfig(
    steps=STEPS, num_workers=2, micro_batch_size=2, global_batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2,
    checkpoint_every=1000, eval_every=1000, eval_batches=1, precision="fp32", zero_stage=0,
)  # fmt: skip

CASES: dict[str, dict] = {
    f"zero{z}-{p}": {"zero_stage": z, "precision": p} for z in (0, 1, 2, 3) for p in ("fp32", "bf16")
}
# The same global batch of 8 sequences cut into ranks x micro-steps (R x A: micro-batches of 8 / (R * A)
# sequences): the gradient is the mean over all 8 whatever the cut, so a sum over ranks or micro-steps
# shows as a gradient R or A times too large. Dense: a MoE load-balancing loss is a product of
# per-micro-batch means, so it (rightly) depends on how the batch is cut; the LM loss, a mean over equal
# token counts, does not. 5 steps: the last two are on the cosine part of the schedule (warmup_steps=2).
SPLITS = {"2x1": (2, 1), "2x2": (2, 2), "2x4": (2, 4), "1x1": (1, 1), "1x4": (1, 4)}
DENSE_STEPS = 5
for _name, (_ranks, _accum) in SPLITS.items():
    CASES[f"dense-{_name}"] = {
        "zero_stage": 2, "num_workers": _ranks, "micro_batch_size": 8 // (_ranks * _accum), "steps": DENSE_STEPS,
    }  # fmt: skip
DENSE_CASES = {f"dense-{name}" for name in SPLITS}
# pretrain.compile on the MoE model: torch.compile of the whole decoder, its dropless MoE layers in one graph
CASES["zero2-fp32-compiled"] = {"zero_stage": 2, "precision": "fp32", "compile": True}


def model_for(case: str) -> ModelConfig:
    return replace(MODEL, n_experts=0) if case in DENSE_CASES else MODEL


def tokens_dir(out: Path) -> Path:
    from data_prep.synthetic import synthetic_tokens

    return synthetic_tokens(Path(out) / "tokens", sequences=64, seq_len=SEQ, vocab=VOCAB, seed=SEED)


ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, out: Path, timeout: float) -> None:
    """`script OUT` on 2 CPU ranks (torchrun, one thread each, a free port); a failure fails the
    calling test with the ranks' output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def rank_reports(script: Path, out: Path, timeout: float) -> list[dict]:
    """`torchrun(script, out)`, then what each of the 2 ranks wrote to `out`/rank<r>.json."""
    torchrun(script, out, timeout)
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]


def leave() -> None:
    """End a rank's script once its work is written: destroy the process group, flush, and exit at once
    (gloo can abort at interpreter exit after the work is done, a known PyTorch gloo shutdown race)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
