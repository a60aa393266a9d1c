"""The reward model's quality measures (kiln/chat_eval.py) on examples worked by hand.

pytest tests/test_reward_quality.py
"""

from __future__ import annotations

import pytest
import torch

from kiln.chat_eval import expected_calibration_error, pearson


def test_calibration_error_is_the_gap_between_confidence_and_accuracy_per_bin():
    # four pairs said 0.9 for the chosen answer, three of them right (the chosen one preferred): a bin at
    # confidence 0.9 with accuracy 0.75; two pairs at 0.3 for the chosen (confidence 0.7 for the rejected,
    # wrong both times): accuracy 0
    p = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.3, 0.3])
    # the 0.1 pair: confidence 0.9, predicts the rejected answer: wrong, in the 0.9 bin
    ece = expected_calibration_error(p)
    want = 4 / 6 * abs(3 / 4 - 0.9) + 2 / 6 * abs(0.0 - 0.7)
    assert ece == pytest.approx(want, rel=1e-6)
    assert expected_calibration_error(torch.tensor([0.75, 0.75, 0.75, 0.25])) == pytest.approx(0.0, abs=1e-7)


def test_pearson_and_its_undefined_cases():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None


def test_in_prompt_auc_pairs_right_and_wrong_answers_to_the_same_prompt_only():
    from kiln.chat_eval import in_prompt_auc

    # prompt 0: the right answer (1) below both wrong ones (2, 3): 0 of 2; prompt 1: a tie, a half of 1;
    # prompt 2: all right, no pair. Across prompts the right 5 is above the wrong 2 and 3, which must not count.
    auc, pairs = in_prompt_auc(
        [[1, 2, 3], [5, 5], [9, 9]], [[True, False, False], [True, False], [True, True]]
    )
    assert pairs == 3 and auc == pytest.approx(0.5 / 3)
    assert in_prompt_auc([[1.0, 2.0]], [[False, False]]) == (None, 0)


def test_labelled_answers_records_name_what_is_wrong(tmp_path):
    import json

    from data_prep.chat_data import load_records

    good = {"prompt": "Q", "answers": ["a", "b"], "right": [True, False]}
    bad = [
        {"prompt": "Q", "answers": ["a"], "right": [True, False]},
        {"prompt": "Q", "answers": "a", "right": [True]},
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, *bad)))
    records, stats = load_records([str(path)], "answers", key="reward.answer_eval")
    assert records == [
        {"prompt": [{"role": "user", "content": "Q"}], "answers": ["a", "b"], "right": [True, False]}
    ]
    assert stats["malformed"] == {"bad_length": 1, "bad_type": 1}
    assert [(e["line"], e["reason"].split(":")[0]) for e in stats["errors"]] == [
        (2, "bad_length"),
        (3, "bad_type"),
    ]
