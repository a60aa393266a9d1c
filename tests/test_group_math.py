"""GRPO, Dr. GRPO and RLOO math (kiln/rl/group_math.py) against examples worked by hand.

pytest tests/test_group_math.py
"""

from __future__ import annotations

import math

import pytest
import torch

from kiln.rl.group_math import group_advantages, group_policy_loss, kl_penalized_scores, token_weights

# two prompts, four answers each: the first group half right, the second all the same
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # responses of 3 and 1 tokens


def test_grpo_divides_by_the_groups_std_and_dr_grpo_does_not():
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2: no spread, no signal
    std = math.sqrt(1 / 3)
    grpo = group_advantages(SCORES, 4)
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)] + [0.0] * 4
    assert grpo.tolist() == pytest.approx(want, abs=1e-6)
    assert group_advantages(SCORES, 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_rloo_baseline_is_the_mean_of_the_other_answers():
    # answer 0 of group 1: 1 - (0 + 0 + 1) / 3 = 2/3; answer 1: 0 - (1 + 0 + 1) / 3 = -2/3  (= 4/3 (r - mean))
    rloo = group_advantages(SCORES, 4, baseline="leave_one_out", scale=False)
    assert rloo.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    # the baseline does not depend on the answer's own score: moving r_0 moves only A_0 by as much
    moved = SCORES.clone()
    moved[0] += 3.0
    again = group_advantages(moved, 4, baseline="leave_one_out", scale=False)
    assert (again[0] - rloo[0]).item() == pytest.approx(3.0)
    assert (again[1:4] - rloo[1:4]).tolist() == pytest.approx([-1.0] * 3)  # their baseline rose by 3/3


def test_groups_must_be_whole():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(SCORES, 3)


def test_token_weights_per_method():
    seq = token_weights(
        MASK, "sequence_mean"
    )  # 1 / (N |o_i|): 1/6 on each of 3 tokens, 1/2 on the single one
    assert seq.flatten().tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0, 1 / 2, 0, 0, 0])
    assert token_weights(MASK, "token_mean").flatten().tolist() == pytest.approx(
        [0.25] * 3 + [0, 0.25, 0, 0, 0]
    )
    const = token_weights(MASK, "constant", max_len=4)  # 1 / (N * max_len) = 1/8
    assert const.flatten().tolist() == pytest.approx([0.125] * 3 + [0, 0.125, 0, 0, 0])
    with pytest.raises(ValueError, match="max_len"):
        token_weights(MASK, "constant")


@pytest.mark.parametrize("weighting", ["sequence_mean", "token_mean", "constant"])
def test_micro_batch_losses_sum_to_the_batch_loss(weighting):
    torch.manual_seed(0)
    B, T = 6, 5
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 1.0
    logp, old, ref = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    adv = torch.randn(B)
    totals = {"num_sequences": B, "num_tokens": mask.sum().item(), "max_len": T}

    def loss(rows):
        w = token_weights(mask[rows], weighting, **totals)
        return group_policy_loss(
            logp[rows], old[rows], ref[rows], adv[rows], mask[rows], w, clip_eps=0.2, kl_coef=0.1
        )[0]

    whole = loss(slice(0, B))
    assert (loss(slice(0, 2)) + loss(slice(2, 6))).item() == pytest.approx(whole.item(), rel=1e-6)


def test_policy_loss_by_hand():
    # one response of two tokens, A = 1: token 0 ratio e^0.1 = 1.105 (clipped at 1.1 with eps 0.1),
    # token 1 ratio e^-0.1 = 0.905 (the unclipped term is the smaller): weights 1/2 each (sequence mean)
    logp = torch.tensor([[0.1, -0.1]])
    old = torch.zeros(1, 2)
    ref = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    w = token_weights(mask, "sequence_mean")
    loss, stats = group_policy_loss(logp, old, ref, torch.tensor([1.0]), mask, w, clip_eps=0.1, kl_coef=0.5)
    k3 = [math.exp(-v) - 1 + v for v in (0.1, -0.1)]  # exp(ref - logp) - 1 - (ref - logp)
    want = 0.5 * (-1.1 + 0.5 * k3[0]) + 0.5 * (-math.exp(-0.1) + 0.5 * k3[1])
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["clip_frac"].item() == 0.5 and stats["kl"].item() == pytest.approx(sum(k3) / 2, rel=1e-5)
    # only the unclipped token carries a gradient
    logp.requires_grad_(True)
    group_policy_loss(logp, old, None, torch.tensor([1.0]), mask, w, clip_eps=0.1)[0].backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.5 * math.exp(-0.1)], rel=1e-6)


def test_kl_in_the_reward_is_the_summed_log_ratio_of_real_tokens():
    logp = torch.tensor([[0.2, 0.4, 9.0], [0.1, 9.0, 9.0]])
    ref = torch.tensor([[0.1, 0.1, 0.0], [0.3, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the 9s are padding
    got = kl_penalized_scores(torch.tensor([1.0, 0.0]), logp, ref, mask, kl_coef=0.5)
    assert got.tolist() == pytest.approx([1.0 - 0.5 * 0.4, 0.0 - 0.5 * -0.2])
