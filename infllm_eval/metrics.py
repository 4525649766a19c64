"""Scoring functions, registered by name in `METRICS`.

Every metric is a pure function `(prediction, answers, **fields) -> float` in [0, 1]. `answers` lists the
acceptable references; the score is the best over them unless the benchmark's own rule says otherwise.
`fields` carries extra per-sample data some metrics need (LongBench `all_classes`, ∞-Bench `options`); a
metric ignores the fields it does not use. Tasks name their metric in their definition yaml.

Registered: `first_int_match`, `exact_match` (below, by decorator), `longbench_<dataset>` for the 21 LongBench
v1 datasets and `infbench_<task>` for the 12 ∞-Bench tasks (+ `infbench_code_debug_infllm`), the official
scorers in `infllm_eval/scorers/`, each registered from its module's table on the first lookup. Importing this
module stays cheap: the scorer modules load on the first lookup, jieba, rouge and rapidfuzz on first use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from infllm_eval.registry import Registry

Metric = Callable[..., float]

__all__ = ["METRICS", "Metric", "exact_match", "first_int", "first_int_match", "get_metric"]

#: name -> metric. The scorer modules add their metrics when they are imported (on the first lookup).
METRICS: Registry[Metric] = Registry(
    "metric", modules=("infllm_eval.scorers.longbench", "infllm_eval.scorers.infbench")
)

_NON_DIGIT = re.compile(r"[^0-9]")


def first_int(prediction: str) -> str:
    """The first maximal run of ASCII digits in `prediction`, or "" (∞-Bench `first_int_match`)."""
    return next((item for item in _NON_DIGIT.split(prediction) if item), "")


@METRICS.register("first_int_match")
def first_int_match(prediction: str, answers: list[str], **fields: Any) -> float:
    """1.0 if the first run of digits in the prediction equals an answer string exactly (∞-Bench passkey).

    Leading zeros matter ("01234" only matches "01234"); "1234 5" reads as "1234".
    """
    found = first_int(prediction)
    if not found:
        return 0.0
    return float(any(found == str(answer).strip() for answer in answers))


@METRICS.register("exact_match")
def exact_match(prediction: str, answers: list[str], **fields: Any) -> float:
    """1.0 if the prediction equals an answer after stripping surrounding whitespace from both."""
    pred = prediction.strip()
    return float(any(pred == str(answer).strip() for answer in answers))


def get_metric(name: str) -> Metric:
    """The metric registered as `name`; an unknown name is a UserError with a suggestion."""
    return METRICS.get(name)
