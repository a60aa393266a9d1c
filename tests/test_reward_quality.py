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
