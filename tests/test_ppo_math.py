"""Pure-function tests for kiln/rl/ppo_math.py on hand-built tensors: `pytest tests/test_ppo_math.py`.

Expected numbers are worked out by hand in the comments next to them.
"""

import math

import pytest
import torch

from kiln.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    eos_penalty,
    gae,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    penalized_rewards,
    policy_loss,
    token_mean,
    value_loss,
)

LN2 = math.log(2.0)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=atol, rtol=0
    )


def ragged_batch(seed=0, B=6, T=7, garbage=None):
    """Random (B, T) tensors with responses of lengths 1..T and, if given, `garbage` after them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1  # a full row and a one-token row
    mask = (torch.arange(T) < lengths[:, None]).float()
    tensors = {k: torch.randn(B, T, generator=g) for k in ("logp", "old_logp", "ref_logp", "adv", "values")}
    tensors["returns"] = tensors["values"] + torch.randn(B, T, generator=g)
    tensors["old_values"] = tensors["values"] + 0.3 * torch.randn(B, T, generator=g)
    if garbage is not None:
        tensors = {k: torch.where(mask.bool(), v, garbage) for k, v in tensors.items()}
    return mask, tensors


# --- masked reductions -----------------------------------------------------------------------------------


def test_whitening_with_a_reduce_covers_every_rank():
    """`reduce` sums statistics over ranks: two ranks holding the same batch whiten as one batch twice
    as long (Bessel's n counts both)."""
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    both = masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:2]
    close(masked_whiten(x, mask, reduce=lambda t: 2 * t), both)
    close(masked_whiten(x, mask, reduce=lambda t: t), masked_whiten(x, mask))


def test_masked_mean_and_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    close(masked_mean(x, mask), 2.5)  # (1+2+3+4)/4
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])
    close(masked_var(x, mask, unbiased=False), 1.25)  # (2.25+0.25+0.25+2.25)/4
    close(masked_var(x, mask), 5.0 / 3.0)  # 5/3, Bessel n/(n-1) = 4/3
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not nan
    x[1, 1:] = float("inf")  # inf in padding cannot leak into the value
    close(masked_mean(x, mask), 2.5)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1.0, 0, 0], [0, 0, 0]]))


def test_whiten_mean0_std1_over_real_tokens_and_ignores_padding():
    mask, t = ragged_batch(garbage=1e4)
    x = 3.0 + 5.0 * t["adv"]
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0, atol=1e-5)
    close(masked_var(w, mask).sqrt(), 1.0, atol=1e-5)
    assert torch.all(w[mask == 0] == 0)
    x_other_padding = torch.where(mask.bool(), x, -7.0)
    close(masked_whiten(x_other_padding, mask), w)
    # shift_mean=False only rescales: the mean stays, the std becomes 1
    w_keep = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(w_keep, mask), masked_mean(x, mask), atol=1e-5)
    close(masked_var(w_keep, mask).sqrt(), 1.0, atol=1e-5)


def test_whiten_by_hand():
    # x = [1, 2, 3] : mean 2, unbiased var 1 -> [-1, 0, 1]
    w = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    close(w, [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)


# --- KL estimators ---------------------------------------------------------------------------------------


def test_kl_estimators_known_values():
    # token 0: pi = 0.5, ref = 0.25  -> log r = -ln2, r = 1/2
    # token 1: pi = 0.25, ref = 0.5  -> log r = +ln2, r = 2
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    close(kl_k1(logp, ref), [[LN2, -LN2]])  # 0.6931, -0.6931
    close(kl_k2(logp, ref), [[0.5 * LN2**2, 0.5 * LN2**2]])  # 0.2402 both
    close(kl_k3(logp, ref), [[-0.5 + LN2, 1.0 - LN2]])  # (1/2 - 1) + ln2 = 0.1931; (2 - 1) - ln2 = 0.3069
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        close(kl_estimate(logp, ref, kind), fn(logp, ref))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def test_k1_mean_can_be_negative_k3_never():
    # on samples where the policy is less likely than the reference, k1 < 0 and its mean is negative
    logp = torch.log(torch.tensor([[0.25, 0.1, 0.3]]))
    ref = torch.log(torch.tensor([[0.5, 0.4, 0.3]]))
    mask = torch.ones(1, 3)
    assert masked_mean(kl_k1(logp, ref), mask) < 0
    assert torch.all(kl_k3(logp, ref) >= 0)
    g = torch.Generator().manual_seed(1)
    a, b = 10 * torch.randn(1000, generator=g), 10 * torch.randn(1000, generator=g)
    assert torch.all(kl_k3(a, b) >= 0) and torch.all(kl_k3(a, a + 1e-7) >= 0)


def test_k1_k3_unbiased_k2_not():
    # exact expectation over a 4-way categorical: E_p[k1] = E_p[k3] = KL(p || q); E_p[k2] != KL
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()  # 0.4564
    close((p * kl_k1(p.log(), q.log())).sum(), kl, atol=1e-12)
    close((p * kl_k3(p.log(), q.log())).sum(), kl, atol=1e-12)
    assert abs((p * kl_k2(p.log(), q.log())).sum() - kl) > 1e-3


# --- rewards ---------------------------------------------------------------------------------------------


def test_penalized_rewards_by_hand():
    kl = torch.tensor([[0.1, -0.2, 0.3, 9.0], [0.4, 0.5, 0.6, 0.7]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    score = torch.tensor([2.0, -1.0])
    # row 0: -0.5 * [0.1, -0.2, 0.3] = [-0.05, 0.1, -0.15], score 2 at t=2 -> 1.85; padding 0
    # row 1: -0.5 * [0.4, 0.5, 0.6, 0.7] = [-0.2, -0.25, -0.3, -0.35], score -1 at t=3 -> -1.35
    expected = [[-0.05, 0.1, 1.85, 0.0], [-0.2, -0.25, -0.3, -1.35]]
    close(penalized_rewards(score, kl, mask, kl_coef=0.5), expected)


def test_kl_coef_zero_gives_exactly_the_score():
    kl = torch.tensor([[0.1, float("inf"), 0.3, 9.0], [0.4, 0.5, float("nan"), 0.7]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = penalized_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.0)
    assert torch.equal(rewards, torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0]]))


def test_penalized_rewards_any_mask_layout_and_empty_row():
    kl = torch.zeros(3, 4)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    rewards = penalized_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, kl_coef=0.1)
    assert torch.equal(rewards, torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 2], [0, 0, 0, 0]]))


def test_eos_penalty_subtracts_only_for_unfinished():
    score = torch.tensor([1.5, 1.5, -0.5])
    ended = torch.tensor([True, False, False])
    close(eos_penalty(score, ended, penalty=1.0), [1.5, 0.5, -1.5])


# --- GAE -------------------------------------------------------------------------------------------------


def test_gae_by_hand_gamma09_lam08():
    # rewards [0, 0, 1], values [0.5, 0.4, 0.6], 4th token is padding (garbage)
    # t=2: delta = 1 + 0.9*0 - 0.6 = 0.4                 A2 = 0.4
    # t=1: delta = 0 + 0.9*0.6 - 0.4 = 0.14              A1 = 0.14 + 0.72*0.4 = 0.428
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14             A0 = -0.14 + 0.72*0.428 = 0.16816
    # returns = A + V = [0.66816, 0.828, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.6, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.16816, 0.428, 0.4, 0.0]])
    close(ret, [[0.66816, 0.828, 1.0, 0.0]])


def test_gae_lam1_is_discounted_return_lam0_is_td():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.6]])
    mask = torch.ones(1, 3)
    _, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    close(ret, [[0.81, 0.9, 1.0]])  # Monte Carlo: 0.9^2, 0.9, 1, independent of the values
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(adv, [[-0.14, 0.14, 0.4]])  # one-step TD errors


def test_gae_padding_never_bootstraps_and_is_ignored():
    mask, t = ragged_batch(seed=2, garbage=1e3)
    rewards, values = t["adv"], t["values"]
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    clean = {k: torch.where(mask.bool(), v, -42.0) for k, v in (("r", rewards), ("v", values))}
    adv2, ret2 = gae(clean["r"], clean["v"], mask, gamma=0.95, lam=0.9)
    close(adv, adv2)
    close(ret, ret2)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
    # the one-token row: A = r - V, no bootstrap from the garbage value after it
    close(adv[1, 0], rewards[1, 0] - values[1, 0])
    # each row equals GAE run on that row cut at its length
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        adv_b, _ = gae(rewards[b : b + 1, :n], values[b : b + 1, :n], mask[b : b + 1, :n], 0.95, 0.9)
        close(adv[b : b + 1, :n], adv_b)


def test_gae_steps_over_a_hole_in_the_mask():
    # a masked token in the middle is skipped: same as the sequence without it
    rewards = torch.tensor([[0.0, 7.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.4, 0.6]])
    adv, _ = gae(rewards, values, torch.tensor([[1.0, 0.0, 1.0, 1.0]]), gamma=0.9, lam=0.8)
    adv_ref, _ = gae(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.4, 0.6]]), torch.ones(1, 3), 0.9, 0.8
    )
    close(adv[:, [0, 2, 3]], adv_ref)
    assert adv[0, 1] == 0


# --- policy loss -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio, adv, loss, clipped, grad",
    [
        # clip_eps = 0.2, one token; loss = -min(r*A, clip(r)*A); d loss / d logp = -r*A if unclipped else 0
        (1.1, 1.0, -1.1, False, -1.1),  # inside the clip
        (1.5, 1.0, -1.2, True, 0.0),  # A > 0, ratio above 1+eps: clipped at 1.2
        (0.5, 1.0, -0.5, False, -0.5),  # A > 0, ratio below 1-eps: unclipped (pessimistic min)
        (0.5, -1.0, 0.8, True, 0.0),  # A < 0, ratio below 1-eps: clipped at 0.8
        (1.5, -1.0, 1.5, False, 1.5),  # A < 0, ratio above 1+eps: unclipped
        (0.9, -2.0, 1.8, False, 1.8),  # inside the clip, negative advantage
    ],
)
def test_policy_loss_clip_cases(ratio, adv, loss, clipped, grad):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    old_logp = torch.zeros(1, 1)
    out, stats = policy_loss(logp, old_logp, torch.tensor([[adv]]), torch.ones(1, 1), clip_eps=0.2)
    out.backward()
    close(out, loss)
    close(logp.grad, [[grad]])
    close(stats["clip_frac"], float(clipped))
    close(stats["ratio_mean"], ratio)
    close(stats["approx_kl"], (ratio - 1) - math.log(ratio))  # k3 of old vs new


def test_policy_loss_stats_and_masking():
    # 3 real tokens at ratios 1.1 (A=1), 1.5 (A=1, clipped), 0.5 (A=-1, clipped); padding at ratio 100
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5, 100.0]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 4), adv, mask, clip_eps=0.2)
    loss.backward()
    close(loss, (-1.1 - 1.2 + 0.8) / 3)  # -0.5
    close(stats["clip_frac"], 2 / 3)
    close(stats["ratio_mean"], (1.1 + 1.5 + 0.5) / 3)
    close(logp.grad, [[-1.1 / 3, 0.0, 0.0, 0.0]])
    assert all(not v.requires_grad for v in stats.values())


# --- value loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, loss, clipped, grad",
    [
        # old_value 0, return 1, clip_eps 0.2; loss = 0.5 * max((v-R)^2, (clip(v)-R)^2)
        (0.1, 0.405, False, -0.9),  # inside: 0.5 * 0.81; grad v - R
        (0.5, 0.32, True, 0.0),  # moved toward R past the clip: 0.5 * (0.2-1)^2 = 0.32 > 0.5 * 0.25
        (-0.5, 1.125, False, -1.5),  # moved away past the clip: 0.5 * 2.25 > 0.5 * 1.44, unclipped
        (1.0, 0.32, True, 0.0),  # exactly at the return, but clipped at 0.2: 0.5 * 0.64
    ],
)
def test_value_loss_clip_cases(value, loss, clipped, grad):
    values = torch.tensor([[value]], requires_grad=True)
    out, stats = value_loss(values, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip_eps=0.2)
    out.backward()
    close(out, loss)
    close(values.grad, [[grad]])
    close(stats["value_clip_frac"], float(clipped))


def test_value_loss_ignores_padding():
    mask, t = ragged_batch(seed=3)
    _, t_garbage = ragged_batch(seed=3, garbage=1e4)
    a, sa = value_loss(t["values"], t["old_values"], t["returns"], mask, clip_eps=0.2)
    b, sb = value_loss(t_garbage["values"], t_garbage["old_values"], t_garbage["returns"], mask, clip_eps=0.2)
    close(a, b)
    close(sa["value_clip_frac"], sb["value_clip_frac"])


# --- loss normalisation ----------------------------------------------------------------------------------


def test_loss_invariant_to_microbatch_split():
    """Token-level mean over the minibatch: summing microbatch losses normalised by the minibatch's token
    count gives the same loss and gradients as the unsplit minibatch, for any split."""
    mask, t = ragged_batch(seed=4, B=6, T=7)
    num_tokens = mask.sum()

    def losses(rows, n):
        logp = t["logp"][rows].clone().requires_grad_()
        values = t["values"][rows].clone().requires_grad_()
        m = mask[rows]
        pl, _ = policy_loss(logp, t["old_logp"][rows], t["adv"][rows], m, 0.2, num_tokens=n)
        vl, _ = value_loss(values, t["old_values"][rows], t["returns"][rows], m, 0.2, num_tokens=n)
        (pl + vl).backward()
        return pl.detach(), vl.detach(), logp.grad, values.grad

    full_pl, full_vl, full_glogp, full_gv = losses(slice(0, 6), None)  # None -> this batch's tokens
    for split in ([slice(0, 6)], [slice(0, 1), slice(1, 6)], [slice(0, 2), slice(2, 3), slice(3, 6)]):
        parts = [losses(s, num_tokens) for s in split]
        close(sum(p[0] for p in parts), full_pl)
        close(sum(p[1] for p in parts), full_vl)
        close(torch.cat([p[2] for p in parts]), full_glogp)
        close(torch.cat([p[3] for p in parts]), full_gv)

    # the tempting alternative, averaging per-microbatch means, is not invariant when lengths differ
    parts = [losses(s, None) for s in (slice(0, 1), slice(1, 6))]
    assert abs(sum(p[0] for p in parts) / 2 - full_pl) > 1e-3


def test_token_mean_counts_tokens_not_sequences():
    x = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    close(token_mean(x, mask), 7 / 4)  # not the per-sequence mean (1 + 4) / 2
    close(token_mean(x[:1], mask[:1], num_tokens=4) + token_mean(x[1:], mask[1:], num_tokens=4), 7 / 4)


# --- from logits -----------------------------------------------------------------------------------------


def test_entropy_from_logits():
    V = 8
    logits = torch.zeros(2, 3, V)
    logits[1] = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), V) * 100.0  # near-deterministic
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    logits[0, 2] = torch.randn(V) * 10  # padding: ignored
    close(entropy_from_logits(logits, mask), math.log(V), atol=1e-5)  # uniform -> ln V
    close(entropy_from_logits(logits, torch.tensor([[0.0, 0, 0], [1, 1, 1]])), 0.0, atol=1e-5)
    # a 2-way distribution p = (0.25, 0.75): H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623
    two = torch.log(torch.tensor([[[0.25, 0.75]]]))
    close(entropy_from_logits(two, torch.ones(1, 1)), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_logprobs_from_logits_matches_log_softmax():
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(3, 5, 11, generator=g)).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    lp = logprobs_from_logits(logits, tokens)
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(lp, ref, atol=1e-5)
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    (grad_ref,) = torch.autograd.grad(ref.sum(), logits)
    close(grad, grad_ref, atol=1e-6)
    lp_bf16 = logprobs_from_logits(logits.detach().bfloat16(), tokens)
    assert lp_bf16.dtype == torch.float32
    close(lp_bf16, ref.detach(), atol=0.1)


# --- KL controllers --------------------------------------------------------------------------------------


def test_fixed_controller_never_changes():
    ctl = FixedKLController(kl_coef=0.05)
    for kl in (0.0, 1.0, 100.0, -3.0):
        ctl.update(kl, n_steps=512)
        assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}


def test_adaptive_controller_sequence_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 12: error 12/6 - 1 = 1 -> clipped 0.2; beta *= 1 + 0.2 * 256/10000 = 1.00512 -> 0.100512
    ctl.update(12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    # KL 3: error -0.5 -> clipped -0.2; beta *= 0.99488 -> 0.100512 * 0.99488 = 0.099997379 (rounded)
    ctl.update(3.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512 * 0.99488, abs=1e-12)
    assert ctl.value == pytest.approx(0.0999973786, abs=1e-10)
    # KL 6.6: error 0.1 inside the clip; beta *= 1 + 0.1 * 1000/10000 = 1.01
    ctl.update(6.6, n_steps=1000)
    assert ctl.value == pytest.approx(0.100512 * 0.99488 * 1.01, abs=1e-12)
    # KL on target: no change
    before = ctl.value
    ctl.update(6.0, n_steps=1000)
    assert ctl.value == before


def test_adaptive_controller_moves_toward_target():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=1.0, horizon=100)
    values = [ctl.value]
    for _ in range(5):
        ctl.update(50.0, n_steps=10)  # KL too high -> beta grows, by at most 1 + 0.2 * 10/100
        values.append(ctl.value)
    assert all(b == pytest.approx(a * 1.02) for a, b in zip(values, values[1:], strict=False))
    for _ in range(5):
        ctl.update(0.0, n_steps=10)  # KL too low -> beta shrinks
    assert ctl.value < values[-1]


def test_controller_state_dict_resume():
    a = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    for kl in (10.0, 2.0, 7.0):
        a.update(kl, n_steps=64)
    state = a.state_dict()
    assert isinstance(state["value"], float)
    b = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    b.load_state_dict(state)
    a.update(9.0, n_steps=64)
    b.update(9.0, n_steps=64)
    assert a.value == b.value
    fixed = FixedKLController(kl_coef=0.1)
    fixed.load_state_dict({"value": 0.3})
    assert fixed.value == 0.3


def test_adaptive_controller_reports_all_errors():
    with pytest.raises(ValueError, match="target.*horizon"):
        AdaptiveKLController(init_kl_coef=0.1, target=0.0, horizon=-1.0)
