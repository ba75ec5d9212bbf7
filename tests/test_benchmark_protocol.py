"""The throughput benchmark's `--check`: a loss that disagrees, is missing or is not finite fails it."""

import math
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dpo_throughput import loss_disagreement  # noqa: E402


def test_agreeing_losses_give_their_largest_relative_difference():
    assert loss_disagreement([0.5, 0.25], [0.5, 0.25]) == 0.0
    assert loss_disagreement([0.5, 0.25], [0.5005, 0.25]) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "other",
    [[0.5, math.nan], [math.inf, 0.25], [0.5], [0.5, 0.25, 0.1], []],
    ids=["nan", "inf", "fewer steps", "more steps", "no steps"],
)
def test_a_missing_or_non_finite_loss_never_passes(other):
    assert loss_disagreement([0.5, 0.25], other) == math.inf


def test_a_non_finite_reference_never_passes():
    assert loss_disagreement([0.5, math.nan], [0.5, math.nan]) == math.inf
    assert loss_disagreement([], []) == math.inf
