"""Metrics: ∞-Bench first_int_match and exact_match, by hand-written cases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infllm_eval.errors import UserError
from infllm_eval.metrics import METRICS, exact_match, first_int, first_int_match, get_metric

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("12345", ["12345"], 1.0),
        (" 12345.", ["12345"], 1.0),
        ("The pass key is 12345", ["12345"], 1.0),
        ("The pass key is 12345. Remember it. 12345 is the pass key.", ["12345"], 1.0),
        ("1234 5", ["12345"], 0.0),  # first run of digits is "1234"
        ("123456", ["12345"], 0.0),  # a longer run is not a match
        ("", ["12345"], 0.0),
        ("abc", ["12345"], 0.0),
        ("01234", ["01234"], 1.0),  # leading zeros kept
        ("1234", ["01234"], 0.0),
        ("The key is 98765", ["12345", "98765"], 1.0),  # best over answers
        ("The key is 98765", ["12345", "55555"], 0.0),
        ("Step 1: the key is 12345", ["12345"], 0.0),  # ∞-Bench reads the first number only
    ],
)
def test_first_int_match(prediction: str, answers: list[str], expected: float) -> None:
    assert first_int_match(prediction, answers) == expected


def test_first_int() -> None:
    assert first_int("key: 007, then 8") == "007"
    assert first_int("no digits") == ""


def test_exact_match() -> None:
    assert exact_match("  12345\n", ["12345"]) == 1.0
    assert exact_match("12345.", ["12345"]) == 0.0
    assert exact_match("b", ["a", " b "]) == 1.0
    assert exact_match("", ["a"]) == 0.0


def test_metrics_return_floats_and_ignore_extra_fields() -> None:
    for fn in METRICS.values():
        score = fn("12345", ["12345"], length=4096, depth=0.5)
        assert isinstance(score, float) and 0.0 <= score <= 1.0


def test_get_metric() -> None:
    assert get_metric("first_int_match") is first_int_match
    with pytest.raises(UserError, match="Did you mean 'first_int_match'"):
        get_metric("first_int_matc")


def test_importing_metrics_leaves_the_scorers_for_the_first_lookup() -> None:
    code = (
        "import sys; from infllm_eval.metrics import METRICS; "
        "assert 'infllm_eval.scorers.longbench' not in sys.modules; "
        "assert METRICS['longbench_trec'].__name__ == 'longbench_trec'; "
        "assert 'infllm_eval.scorers.longbench' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ROOT})


def test_unknown_metric_by_index_names_the_closest_one() -> None:
    with pytest.raises(UserError, match="Unknown metric 'longbench_trc'. Did you mean 'longbench_trec'"):
        METRICS["longbench_trc"]
    assert METRICS.values()[METRICS.names().index("exact_match")] is exact_match
