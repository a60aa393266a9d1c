"""The held-out gold measure of the post-training stages (kiln/rl/evaluation.py) on hand-worked evaluations:
the means by half of the prompts, the paired flips and their z-score, the over-optimisation flag, and
the choice of the exported iteration with its figures on the report half."""

from __future__ import annotations

import math

import pytest

from kiln.rl.evaluation import (
    REPORT,
    SELECT,
    Evaluation,
    better,
    final_measures,
    flips,
    overoptimized,
    row_measures,
)


def ev(iteration: int, greedy: str, sampled: str, kl=None, proxy=None, samples: int = 2) -> Evaluation:
    n = len(greedy)  # kl and proxy: of each prompt's first sampled answer
    return Evaluation(iteration, samples, greedy, sampled, kl or [0.0] * n, proxy or [0.0] * n)


# 4 prompts, 2 sampled answers each (prompt-major): prompts 0 and 2 are the selection half, 1 and 3 the report half
FIRST = ev(0, "1010", "10001001", proxy=[0.0] * 4)
LATER = ev(10, "1110", "11001111", kl=[1, 3, 5, 7], proxy=[1.0] * 4)


def test_measures_average_over_all_prompts_or_one_half():
    assert LATER.measures() == {
        "task_accuracy": 0.75,
        "task_accuracy_sampled": 0.75,
        "kl_sft": 4.0,
        "proxy_score": 1.0,
    }
    assert LATER.prompts(SELECT) == [0, 2] and LATER.answers(SELECT) == [0, 1, 4, 5]
    assert LATER.measures(SELECT) == {
        "task_accuracy": 1.0,
        "task_accuracy_sampled": 1.0,
        "kl_sft": 3.0,
        "proxy_score": 1.0,
    }
    assert LATER.measures(REPORT) == {
        "task_accuracy": 0.5,
        "task_accuracy_sampled": 0.5,
        "kl_sft": 5.0,
        "proxy_score": 1.0,
    }
    assert Evaluation.from_json(LATER.to_json()) == LATER  # what a checkpoint keeps


def test_flips_count_the_paired_changes_of_two_evaluations():
    assert flips(FIRST, LATER) == {"task_sampled_gained": 3, "task_sampled_lost": 0}
    assert flips(FIRST, LATER, REPORT) == {"task_sampled_gained": 1, "task_sampled_lost": 0}  # answer 7 only
    assert flips(LATER, FIRST) == {"task_sampled_gained": 0, "task_sampled_lost": 3}
    assert flips(None, LATER) == {} and flips(ev(0, "1", "1", samples=1), LATER) == {}  # nothing to pair with


def test_over_optimisation_is_a_rising_proxy_with_gold_falling_beyond_noise():
    top = ev(0, "1111", "11111111", proxy=[0.0] * 4)
    worse = ev(10, "1111", "00001111", proxy=[0.5] * 4)  # 4 lost, none gained: z = -4 / 2 = -2
    assert not overoptimized(top, ev(10, "1111", "00011111", proxy=[0.5] * 4))  # 3 lost: z = -1.7, noise
    assert overoptimized(top, worse)
    assert not overoptimized(
        top, ev(10, "1111", "00001111", proxy=[0.0] * 4)
    )  # gold fell, proxy did not rise
    row = row_measures(top, worse, select=True)
    assert row["overoptimized"] == 1.0 and row["task_sampled_lost"] == 4
    assert row["task_accuracy_sampled_select"] == 0.5  # prompts 0 and 2: answers 0, 1 lost, 4, 5 kept
    assert "overoptimized" not in row_measures(None, top, select=False)  # the first evaluation


def test_the_best_on_the_selection_half_is_kept_and_reported_on_the_other_half():
    assert better(FIRST, None) and better(LATER, FIRST)
    assert not better(ev(20, "1110", "11111111"), LATER)  # a tie on the selection half: the earlier
    out = final_measures(FIRST, LATER, last_it=20, select=True)
    assert out["selected_iteration"] == 10 and out["gold_prompts"] == 2
    assert out["task_accuracy_sampled"] == 0.5 and out["task_accuracy_sampled_sft"] == 0.25  # report half
    assert out["task_accuracy_sampled_select"] == 1.0
    assert (out["task_sampled_gained"], out["task_sampled_lost"]) == (1, 0) and out["task_sampled_z"] == 1.0
    assert "selection half" in out["selected_why"]
    last = final_measures(FIRST, LATER, last_it=10, select=False)  # every prompt
    assert last["task_accuracy_sampled"] == 0.75 and last["task_sampled_z"] == pytest.approx(math.sqrt(3))
    assert last["selected_iteration"] == 10 and "last" in last["selected_why"]
    assert final_measures(None, None, last_it=7, select=False)["selected_iteration"] == 7  # no task prompts
