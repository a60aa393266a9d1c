"""The tiny setup shared by the 2-process pretraining tests and their single-process reference."""

from __future__ import annotations

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
# gradient accumulation: 4 micro-steps of 1 sequence == 1 micro-step of 4 (per rank; global batch 8).
# Dense: a MoE load-balancing loss is a product of per-micro-batch means, so it (rightly) depends on
# how the batch is cut; the LM loss, a mean over equal token counts, does not.
CASES["accum-4x1"] = {"zero_stage": 2, "micro_batch_size": 1}
CASES["accum-1x4"] = {"zero_stage": 2, "micro_batch_size": 4}
DENSE_CASES = {"accum-4x1", "accum-1x4"}


def model_for(case: str) -> ModelConfig:
    return replace(MODEL, n_experts=0) if case in DENSE_CASES else MODEL


def tokens_dir(out: Path) -> Path:
    from data_prep.synthetic import synthetic_tokens

    return synthetic_tokens(Path(out) / "tokens", sequences=64, seq_len=SEQ, vocab=VOCAB, seed=SEED)
