"""Critic-free group methods as small pure torch functions: GRPO, Dr. GRPO and RLOO.

Each prompt is answered G times; a response's advantage is its score against the other answers to the same
prompt, so no value model is trained. What the methods differ in is the baseline, the scale of the advantage
and how a response's token losses are averaged:

    method      advantage of response i of a group              token weight in the loss
    GRPO        (r_i - mean r) / std r                          1 / (N * |o_i|)       "sequence_mean"
    Dr. GRPO    r_i - mean r                                    1 / (N * max_len)     "constant"
    RLOO        r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean)  1 / (tokens)          "token_mean"

(N responses in the batch, |o_i| the length of response i; any weighting goes with any advantage.) The
clipped surrogate, the KL estimators and the masked reductions are PPO's (kiln/rl/ppo_math.py), with its
conventions: per-token tensors are (B, T) over response tokens, `mask` 1.0 on real ones, masked positions
never change a result. Responses are laid out group by group: [prompt 0 sample 0, ..., prompt 0 sample G-1,
prompt 1 sample 0, ...]. Nothing here knows about models, Ray or DeepSpeed; tests/test_group_math.py works
each function by hand.
"""

from __future__ import annotations

from typing import Literal

import torch

from kiln.rl.ppo_math import clipped_surrogate, kl_k3, masked_mean

Baseline = Literal["group_mean", "leave_one_out"]
Weighting = Literal["sequence_mean", "token_mean", "constant"]


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    baseline: Baseline = "group_mean",
    scale: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """One advantage per response from its group's scores. scores (N,), N = prompts * group_size -> (N,).

    group_mean, scale=True: GRPO, Shao et al. 2024, "DeepSeekMath", §4.1.2 (outcome supervision):
        A_i = (r_i - mean(r)) / (std(r) + eps), std the unbiased standard deviation of the group (as TRL's
        GRPOTrainer computes it).
    group_mean, scale=False: Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
        Perspective", §3.1: dividing by std weighs the prompts whose answers barely differ (too easy or too
        hard) the most; without it, A_i = r_i - mean(r).
    leave_one_out: RLOO, Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
        Learning from Human Feedback in LLMs", eq. 6 (after Kool et al. 2019): the baseline of response i is
        the mean of the other G - 1, independent of r_i: A_i = r_i - (sum(r) - r_i) / (G - 1). With scale,
        divided by the group's std as GRPO is.
    A group whose responses all score the same gets advantage 0 everywhere: it carries no signal."""
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores are not groups of {group_size} >= 2 responses")
    r = scores.float().view(-1, group_size)  # (prompts, G)
    if baseline == "group_mean":
        centred = r - r.mean(dim=1, keepdim=True)
    elif baseline == "leave_one_out":
        centred = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"unknown baseline {baseline!r}: group_mean or leave_one_out")
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def token_weights(
    mask: torch.Tensor,
    weighting: Weighting,
    *,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """The weight w of each token in the policy loss L = sum_i sum_t w_it l_it. mask (B, T) -> (B, T), 0 on
    masked positions.

    sequence_mean: GRPO's eq. 3 (Shao et al. 2024): 1 / (N * |o_i|), the mean over each response's tokens,
        then over the responses. Every response weighs the same, so a long response's tokens weigh less:
        a long wrong answer is penalised less per token than a short one (the length bias of Liu et al. 2025).
    token_mean: 1 / (sum_i |o_i|), every token the same (DAPO, Yu et al. 2025, §3.3; PPO's `token_mean`).
    constant: Dr. GRPO (Liu et al. 2025, §3.2): 1 / (N * max_len), `max_len` the generation budget: no
        length divides, so the gradient does not depend on how long the batch's responses happened to be.
    For a batch split into micro-batches, pass the whole batch's `num_sequences` (N) and `num_tokens` and
    sum the micro-batch losses: the sum is the unsplit batch's loss."""
    m = mask.float()
    n = m.shape[0] if num_sequences is None else num_sequences
    if weighting == "sequence_mean":
        w = m / m.sum(dim=1, keepdim=True).clamp(min=1.0) / n
    elif weighting == "token_mean":
        w = m / (m.sum() if num_tokens is None else num_tokens)
    elif weighting == "constant":
        if max_len is None:
            raise ValueError("constant weighting (Dr. GRPO) needs max_len, the generation budget in tokens")
        w = m / (n * max_len)
    else:
        raise ValueError(f"unknown weighting {weighting!r}: sequence_mean, token_mean or constant")
    return w


def group_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    clip_eps: float,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective (Shao et al. 2024, eq. 3), to minimise:

        L = sum_i sum_t w_it [ -min(ratio_it A_i, clip(ratio_it, 1 - eps, 1 + eps) A_i) + beta KL_k3,it ]

    with the KL to the reference as a loss term, estimated per token by k3 (eq. 4: unbiased, >= 0), when
    `kl_coef` (beta) > 0 and `ref_logp` is given; the other choice, the KL in the reward, is
    `kl_penalized_scores` before `group_advantages`. logp, old_logp, ref_logp, mask, weights (B, T);
    advantages (B,) one per response (or (B, T)). Stats (detached means over real tokens): clip_frac,
    approx_kl (old || new), kl (policy || reference, k3)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    surrogate, clipped = clipped_surrogate(logp, old_logp, adv, clip_eps)  # (B, T) each
    per_token = -surrogate
    kl = None
    if kl_coef and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)  # (B, T)
        per_token = per_token + kl_coef * kl
    loss = torch.where(mask.bool(), per_token * weights, torch.zeros_like(per_token)).sum()
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.to(logp.dtype), mask),
            "approx_kl": masked_mean(kl_k3(old_logp, logp), mask),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask)
    return loss, stats


def kl_penalized_scores(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """A response's score less beta times its summed per-token KL to the reference (k1 = logp - ref_logp,
    whose sum over a sampled response is an unbiased estimate of the sequence KL): the KL in the reward, as
    PPO's `penalized_rewards` puts it, taken before the group baseline. scores (B,), the rest (B, T) -> (B,)."""
    kl = torch.where(mask.bool(), logp - ref_logp, torch.zeros_like(logp)).sum(dim=1)
    return scores.float() - kl_coef * kl
