"""PPO / RLHF math as small pure torch functions, one per variant, each citing its source.

Run the tests with `pytest tests/test_ppo_math.py`; the PPO stage imports these functions, nothing here
knows about models, Ray or DeepSpeed.

Conventions
-----------
* Per-token tensors are (B, T) over *response* tokens only; `mask` (B, T) is 1.0 on real response tokens
  and 0.0 after EOS / on padding. Values at masked positions never change a result (the tests fill them
  with garbage), and outputs are 0 there.
* Logprobs are already aligned with the tokens they score (logits at t predict token t + 1; the caller
  shifts before calling `logprobs_from_logits`).
* Loss normalisation: the policy and value losses are a *token-level mean over the real tokens of the
  optimiser minibatch*: sum over tokens / number of real tokens. Every token weighs the same, whatever
  the length of its sequence (no per-sequence mean first). With gradient accumulation, pass
  `num_tokens` = real tokens in the whole minibatch to every microbatch call and *sum* the microbatch
  losses: that sum, and its gradient, equal the loss of the unsplit minibatch (see `token_mean` and
  `test_loss_invariant_to_microbatch_split`). Averaging per-microbatch means instead would weight tokens
  of short microbatches more.
* Stats are detached 0-d tensors; callers call `.item()` when they log, so nothing here syncs the GPU
  (except `masked_var`'s check for at least two tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]

# ---------------------------------------------------------------------------------------------------------
# Masked reductions


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over data-parallel ranks (an all-reduce), so a statistic covers every rank's batch."""


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, reduce: Reduce | None = None
) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1; over all dims if `dim` is None; over every rank's
    positions too with `reduce` (which sums the numerator and the count).

    `torch.where` rather than `x * mask`, so inf/nan at masked positions cannot leak into the forward value.
    An all-zero mask gives 0 (not nan): an empty microbatch then contributes nothing.
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x)).sum(dim=dim)  # () or x with `dim` removed
    count = mask.to(total.dtype).sum(dim=dim)
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return total / count.clamp(min=1.0)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce: Reduce | None = None
) -> torch.Tensor:
    """Variance of `x` over masked positions (of every rank with `reduce`), a 0-d tensor;
    Bessel-corrected (n / (n - 1)) if `unbiased`."""
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce=reduce)
    if unbiased:
        n = mask.sum() if reduce is None else reduce(mask.to(var.dtype).sum())
        if n < 2:  # one sync; a variance of one token is meaningless, so say so instead of returning inf
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 real tokens, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce | None = None
) -> torch.Tensor:
    """Normalise `x` to mean 0, std 1 over the real tokens of the batch (of every rank's batch with
    `reduce`); masked positions become 0.

    Advantage whitening of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (openai/lm-human-preferences `whiten`). With `shift_mean=False` the mean is added back (only the scale
    changes), as used there for rewards. Deviation: the variance is the unbiased one (as in TRL);
    lm-human-preferences uses the biased `tf.nn.moments`. The difference is a factor n / (n - 1).
    """
    mean = masked_mean(x, mask, reduce=reduce)  # ()
    var = masked_var(x, mask, unbiased=True, reduce=reduce)  # ()
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def token_mean(
    x: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of `x` over real tokens divided by `num_tokens`, a 0-d tensor.

    This is the loss normalisation of this module. `num_tokens=None` uses this batch's real tokens, i.e.
    `masked_mean`. For a minibatch split into microbatches, pass the minibatch's real-token count to every
    microbatch and sum the results: the sum equals the unsplit minibatch's `token_mean`.
    """
    if num_tokens is None:
        return masked_mean(x, mask)
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum() / num_tokens


# ---------------------------------------------------------------------------------------------------------
# KL estimators, per token, for samples drawn from the policy: estimates of KL(policy || reference).
# J. Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html, with
# r = ref(x) / policy(x), x ~ policy.


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = -log r = logp - ref_logp: unbiased, high variance, negative on some tokens (and its batch
    mean can be negative). (B, T) -> (B, T)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (log r)^2 / 2: biased (low bias when the policies are close), low variance, >= 0.
    (B, T) -> (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r = (exp(ref - logp) - 1) - (ref - logp): unbiased, low variance, always >= 0.
    `expm1` keeps it accurate (and >= 0) when the two logprobs are close. (B, T) -> (B, T)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token KL estimate of the given kind ("k1", "k2" or "k3", Schulman 2020). (B, T) -> (B, T)."""
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[kind](logp, ref_logp)


# ---------------------------------------------------------------------------------------------------------
# Rewards


def penalized_rewards(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every real token, plus the sequence score at its last real token.

    Ziegler et al. 2019, eq. 2: R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x)), spread over tokens as
    in Stiennon et al. 2020, "Learning to Summarize from Human Feedback" (KL per token, score at the end).
    score (B,), kl (B, T), mask (B, T) -> rewards (B, T), 0 on masked positions. With kl_coef == 0 the KL
    is not touched at all (not even multiplied by 0, so an inf KL cannot turn into nan). A row with no real
    token gets no score.
    """
    keep = mask.bool()
    B, T = kl.shape
    if kl_coef == 0:
        rewards = torch.zeros_like(kl)
    else:
        rewards = torch.where(keep, -kl_coef * kl, torch.zeros_like(kl))  # (B, T)
    # last real token per row; works for any mask layout, not only left-aligned responses
    positions = torch.arange(T, device=kl.device).expand(B, T)  # (B, T)
    last = torch.where(keep, positions, -1).amax(dim=1)  # (B,), -1 for an empty row
    has_token = last >= 0  # (B,)
    bonus = torch.where(has_token, score.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))  # (B,)
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), bonus.unsqueeze(1))


def eos_penalty(score: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that never emitted EOS. score (B,), ended (B,)
    bool -> (B,).

    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
    Summarization", detail on EOS tricks. Deviation: the paper *replaces* such scores by a constant (-1);
    here the penalty is *subtracted* (TRL's `missing_eos_penalty`), which keeps the reward model's ranking
    among truncated responses.
    """
    return torch.where(ended, score, score - penalty)


# ---------------------------------------------------------------------------------------------------------
# Advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 11-16:

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lam * A_{t+1},   R_t = A_t + V(s_t)

    rewards, values, mask (B, T) -> advantages, returns (B, T), 0 on masked positions. The loop runs
    backwards over T. Masked positions are skipped: the value and advantage carried backwards come from the
    next *real* token, so after the last real token there is no bootstrap (V = 0, A = 0), and a hole
    inside a response is stepped over. Pass detached values; nothing here needs a gradient.
    """
    keep = mask.bool()
    B, T = rewards.shape
    next_value = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1}) of the next real token
    next_adv = torch.zeros_like(values[:, 0])  # (B,) A_{t+1} of the next real token
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = torch.where(keep[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))  # (B,)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        next_adv = torch.where(keep[:, t], adv, next_adv)
        advantages_reversed.append(adv)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))  # (B, T)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# Losses


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7:

        L = -E_t[min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)],   ratio_t = pi / pi_old

    logp, old_logp, advantages, mask (B, T) -> loss (), stats. Normalised by `token_mean` (module docstring).
    Stats (detached, means over this call's real tokens):
      clip_frac   fraction of tokens where the clipped term is the minimum, i.e. gets no gradient;
      approx_kl   k3 estimate of KL(old || new) on samples of the old policy (Schulman 2020 blog);
      ratio_mean  mean of ratio_t.
    """
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    loss = token_mean(-surrogate, mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.to(logp.dtype), mask),
            "approx_kl": masked_mean(kl_k3(old_logp, logp), mask),
            "ratio_mean": masked_mean(torch.exp(logp - old_logp), mask),
        }
    return loss, stats


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) (the objective inside `policy_loss`'s
    expectation, to maximise) and where the clipped term is the smaller (no gradient there). (B, T) each;
    advantages may be (B, 1), one per sequence."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages  # (B, T)
    return torch.min(unclipped, clipped), clipped < unclipped


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss as in OpenAI baselines PPO2 (`ppo2/model.py`), also used by lm-human-preferences:

        L = 0.5 * E_t[max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)]

    values, old_values, returns, mask (B, T) -> loss (), stats. Normalised by `token_mean`. Not in the PPO
    paper; eps is in the units of the value head. Stats: value_clip_frac, the fraction of real tokens
    where the clipped error is the larger one (no gradient reaches V there).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    err_unclipped = (values - returns) ** 2  # (B, T)
    err_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * token_mean(torch.max(err_unclipped, err_clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# From logits


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the entropy of softmax(logits): H = logsumexp(z) - sum_v p_v z_v.
    logits (B, T, V), mask (B, T) -> ()."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # (B, T)
    return masked_mean(entropy, mask)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], computed as logit[token] - logsumexp(logits) one row at a time.

    logits (B, T, V), tokens (B, T) -> (B, T) float32. Never materialises a (B, T, V) log_softmax, and
    upcasts bf16/fp16 logits to float32 only one row (T, V) at a time, which bounds peak memory for large
    vocabularies (the trick OpenRLHF and TRL use).
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):  # (T, V), (T,)
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)  # (B, T)


# ---------------------------------------------------------------------------------------------------------
# KL coefficient controllers, Ziegler et al. 2019, sec. 2.2


@dataclass
class FixedKLController:
    """Constant KL coefficient beta."""

    kl_coef: float
    """beta, the weight of the per-token KL penalty in `penalized_rewards`."""

    @property
    def value(self) -> float:
        return self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; same signature as `AdaptiveKLController.update`."""

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.kl_coef)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["value"])


@dataclass
class AdaptiveKLController:
    """beta steered so the measured KL tracks `target` (Ziegler et al. 2019, sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n_steps / horizon)

    The paper writes K_beta * e with K_beta = 0.1; n_steps / horizon is how lm-human-preferences sets it
    (n_steps = samples, or episodes, seen since the last update).
    """

    init_kl_coef: float
    """beta before the first update."""
    target: float
    """KL (in nats per sequence, as measured by the caller) the controller steers toward; > 0."""
    horizon: float
    """Samples over which a persistent error of 0.2 changes beta by a factor of about e^0.2; > 0."""
    value: float = field(init=False)
    """Current beta."""

    def __post_init__(self) -> None:
        errors = [
            f"{name} must be > 0, got {getattr(self, name)}"
            for name in ("target", "horizon")
            if not getattr(self, name) > 0
        ]
        if errors:  # all at once
            raise ValueError("; ".join(errors))
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
