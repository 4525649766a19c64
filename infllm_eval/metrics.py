"""Scoring functions, registered by name.

Every metric is a pure function `(prediction, answers, **fields) -> float` in [0, 1]. `answers` lists the
acceptable references; the score is the best over them. `fields` carries extra per-sample data some
metrics need (ignored by the ones here). Tasks name their metric in their definition yaml.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from infllm_eval.errors import unknown_name

Metric = Callable[..., float]

_NON_DIGIT = re.compile(r"[^0-9]")


def first_int(prediction: str) -> str:
    """The first maximal run of ASCII digits in `prediction`, or "" if there is none.

    ∞-Bench `first_int_match` (src/compute_scores.py / eval_utils.py): split on `[^0-9]`, first non-empty.
    """
    for item in _NON_DIGIT.split(prediction):
        if item:
            return item
    return ""


def first_int_match(prediction: str, answers: list[str], **fields: Any) -> float:
    """1.0 if the first run of digits in the prediction equals an answer string exactly (∞-Bench passkey).

    Leading zeros matter ("01234" only matches "01234"); "1234 5" reads as "1234".
    """
    found = first_int(prediction)
    if not found:
        return 0.0
    return float(any(found == str(answer).strip() for answer in answers))


def exact_match(prediction: str, answers: list[str], **fields: Any) -> float:
    """1.0 if the prediction equals an answer after stripping surrounding whitespace from both."""
    pred = prediction.strip()
    return float(any(pred == str(answer).strip() for answer in answers))


METRICS: dict[str, Metric] = {
    "first_int_match": first_int_match,
    "exact_match": exact_match,
}


def get_metric(name: str) -> Metric:
    """The metric registered as `name`; an unknown name is a UserError with a suggestion."""
    try:
        return METRICS[name]
    except KeyError:
        raise unknown_name("metric", name, list(METRICS)) from None
