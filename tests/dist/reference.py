"""The pretraining stage's training, written again as a plain single-process PyTorch loop.

Independent of the stage's helpers (kiln/training.py `micro_batch`, `lr_at`, `adamw`, `load_batch`):
the cut of a global batch into ranks and micro-steps, the learning-rate schedule, the AdamW parameter
groups, the clipping and the loss average are written here from their documentation, so a bug in a
helper that the stage and a reference would share does not cancel out. Only the ids of a whole global
batch come from `global_batch`; tests/test_pretrain_dist.py checks those against the documented data
order on its own (each sequence once per epoch, in a seeded order).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelConfig, PretrainConfig
from tests.dist.common import CASES, DENSE_CASES, MODEL, PRETRAIN, SEED, VOCAB


@dataclass(frozen=True)
class Trace:
    """What a run did, step by step (index 0 = optimizer step 1), and its parameters after the last step."""

    losses: list[float]
    grad_norms: list[float]  # the global norm of the averaged gradient, before clipping
    lrs: list[float]
    batch_crcs: list[int]
    params: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor]  # the parameters before the first step


def schedule(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to `lr` (reached at step warmup - 1, 0-based), then a cosine from `lr` at step
    `warmup` down to `min_lr` at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    done = (step - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * done)) / 2


def rank_slices(ids: np.ndarray, world: int, accum: int) -> list[np.ndarray]:
    """The global batch as the ranks train on it: micro-step by micro-step, rank by rank; in the
    documented global order (micro-step, then rank, then position) rank r's micro-step a is the
    (a * world + r)-th run of len(ids) / (world * accum) consecutive ids."""
    micro = len(ids) // (world * accum)
    assert micro * world * accum == len(ids)
    starts = [(a * world + r) * micro for a in range(accum) for r in range(world)]
    return [ids[i : i + micro] for i in starts]


def saved(model) -> dict[str, torch.Tensor]:
    """The model's tensors as its saved files name them (a MoE layer's stacked experts one by one)."""
    from transformers.core_model_loading import revert_weight_conversion

    return {k: v.detach().clone() for k, v in revert_weight_conversion(model, model.state_dict()).items()}


def reference_run(
    tokens: Path,
    pcfg: PretrainConfig,
    model_cfg: ModelConfig,
    *,
    seed: int,
    vocab: int,
    per_micro_batch: bool,
) -> Trace:
    """`pcfg.steps` optimizer steps of the stage's training, in one process, in fp32.

    The loss of a step is the mean over the global batch; each sequence has the same number of
    tokens, so it is the mean of the per-sequence-group means. `per_micro_batch` computes it micro-batch
    by micro-batch as the ranks cut it (an MoE model's router losses are per micro-batch, so its loss
    depends on the cut); otherwise in one forward over the whole global batch (a dense model's loss
    does not depend on the cut)."""
    from data_prep.packed import PackedTokens
    from kiln import training as T
    from kiln.model import KilnForCausalLM, build_config

    torch.manual_seed(seed)  # the stage's initialisation: the same seed, then the model
    model = KilnForCausalLM(build_config(model_cfg, vocab, 0, 1, None)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW decays matrices (linear weights, embeddings) and not vectors (norm gains, biases)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": pcfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=pcfg.lr, betas=(pcfg.beta1, pcfg.beta2), eps=1e-8, foreach=False)
    data = PackedTokens(tokens, "train")
    world = pcfg.num_workers
    accum = pcfg.global_batch_size // (world * pcfg.micro_batch_size)
    trace = Trace([], [], [], [], {}, saved(model))
    for step in range(pcfg.steps):
        lr = schedule(step, lr=pcfg.lr, min_lr=pcfg.min_lr, warmup=pcfg.warmup_steps, total=pcfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        ids = T.global_batch(step, pcfg.global_batch_size, len(data), seed)
        pieces = rank_slices(ids, world, accum) if per_micro_batch else [ids]
        loss = 0.0
        for piece in pieces:
            windows = torch.from_numpy(np.stack([data[int(i)] for i in piece]).astype(np.int64))
            out = model(input_ids=windows[:, :-1], shift_labels=windows[:, 1:])
            (out.loss / len(pieces)).backward()  # the mean over the global batch
            loss += out.loss.item() / len(pieces)
        # a parameter no token reached (an idle expert) has a zero gradient, as under DeepSpeed
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        if pcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, pcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trace.losses.append(loss)
        trace.grad_norms.append(norm.item())
        trace.lrs.append(lr)
        trace.batch_crcs.append(zlib.crc32(ids.astype(np.int64).tobytes()))
    trace.params.update(saved(model))
    return trace


def for_case(tokens: Path, case: str) -> Trace:
    """The reference run of a case of tests/dist/common.py. The dense model's loss does not depend on how
    the batch is cut: one forward over the whole global batch. The MoE's router losses are per
    micro-batch: the ranks' cut."""
    p = replace(PRETRAIN, **CASES[case])
    cut = None if case in DENSE_CASES else (p.num_workers, p.micro_batch_size)
    return _reference(tokens, case in DENSE_CASES, p.steps, cut)


@cache
def _reference(tokens: Path, dense: bool, steps: int, cut: tuple[int, int] | None) -> Trace:
    p = replace(PRETRAIN, steps=steps)  # fp32, whatever the case's precision and ZeRO stage
    if cut is not None:
        p = replace(p, num_workers=cut[0], micro_batch_size=cut[1])
    model = replace(MODEL, n_experts=0) if dense else MODEL
    return reference_run(tokens, p, model, seed=SEED, vocab=VOCAB, per_micro_batch=cut is not None)


def errors(rows: list[dict], exported: dict[str, torch.Tensor], want: Trace) -> dict[str, float]:
    """How far a run (its metrics rows and its exported parameters) is from the reference.

    loss / grad_norm: the largest relative difference over the steps (and at step 1 alone);
    param_max: the largest absolute difference of any parameter after the last step;
    param_rel: |got - want| / |want - init| over all parameters as one vector: the error in units of
    how far the training moved the weights."""
    assert sorted(exported) == sorted(want.params), (sorted(exported), sorted(want.params))

    def rel(got, ref):
        return [abs(g - r) / abs(r) for g, r in zip(got, ref, strict=True)]

    loss = rel([r["loss"] for r in rows], want.losses)
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    norm = rel(norms, want.grad_norms) if norms else [math.nan]
    diff = torch.cat([(exported[k].float() - want.params[k]).flatten() for k in sorted(want.params)])
    moved = torch.cat([(want.params[k] - want.init[k]).flatten() for k in sorted(want.params)])
    return {
        "loss_1": loss[0], "loss": max(loss), "grad_norm_1": norm[0], "grad_norm": max(norm),
        "param_max": diff.abs().max().item(), "param_rel": (diff.norm() / moved.norm()).item(),
    }  # fmt: skip
