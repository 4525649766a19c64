"""The official LongBench v1 and ∞-Bench scorers as metrics `(prediction, answers, **fields) -> float`.

`longbench_<dataset>` for the 21 LongBench datasets (`longbench.py`), `infbench_<task>` for the 12 ∞-Bench
tasks (`infbench.py`), plus `infbench_code_debug_infllm` (InfLLM's own code_debug rule); each module adds them
to `infllm_eval.metrics.METRICS` from its table. Each metric ignores fields it does not use; `missing_field`
says which field a sample lacks for a metric that needs one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infllm_eval.metrics import METRICS
from infllm_eval.scorers import infbench, longbench

LONGBENCH_PREFIX = longbench.PREFIX
INFBENCH_PREFIX = infbench.PREFIX


def metric_name_for(task: str) -> str | None:
    """The metric for a LongBench dataset or ∞-Bench task, bare or prefixed (`trec`, `longbench_trec`)."""
    if task.startswith((LONGBENCH_PREFIX, INFBENCH_PREFIX)):
        return task if task in METRICS else None
    if task in longbench.DATASET_METRIC:
        return LONGBENCH_PREFIX + task
    if task in infbench.TASK_METRIC or task in infbench.INFLLM_VARIANTS:
        return INFBENCH_PREFIX + task
    return None


_CLASSIFICATION = {f"{LONGBENCH_PREFIX}trec", f"{LONGBENCH_PREFIX}lsht"}
_CHOICE = {
    f"{INFBENCH_PREFIX}longbook_choice_eng",
    f"{INFBENCH_PREFIX}code_debug",
    f"{INFBENCH_PREFIX}code_debug_infllm",
}


def missing_field(metric_name: str, answers: Sequence[Any], fields: dict) -> str | None:
    """The field a sample needs for `metric_name` but lacks ("all_classes" / "options"), else None.

    Classification needs `all_classes`; the choice tasks need `options` unless the answers already are
    `[text, letter]`. Without them the metrics still return a number, but not the official one.
    """
    if metric_name in _CLASSIFICATION and not fields.get("all_classes"):
        return "all_classes"
    if (
        metric_name in _CHOICE
        and not fields.get("options")
        and len(infbench.choice_label(list(answers), None)) < 2
    ):
        return "options"
    return None
