"""Rescoring saved predictions, never touching a model (`infllm-eval score`).

Two inputs:
- a predictions file in the LongBench / InfLLM output format: one JSON object per line with `pred` and
  `answers`, optionally `all_classes`, `options` and `length` (every other key is passed to the metric as a
  field, which ignores what it does not use). The task (a LongBench dataset or ∞-Bench task, bare or as
  `longbench_trec` / `infbench_passkey`) defaults to the file name before its first "." as in eval.py, and a
  `_e` suffix (LongBench-E) adds the 0-4k / 4-8k / 8k+ split by `length`. Score: `round(100 * mean, 2)`.
- a run directory, read-only (`store.read_run`): the `prediction`, `answers` and `score_fields` of every
  finished record that counts (`store.current_records`, as `report` counts them) are scored again with the
  run's metric (config.yaml: `task.metric`, else the task definition's) or `--task`'s. The run's own files are
  never changed (a run's records are what it produced; `report` reads them): the rescored records (each with
  `metric` and its `original_score`) go to OUT/rescored.jsonl with OUT/summary.csv / summary.md (store.py's
  `summarize` / `to_markdown`); OUT defaults to RUN_DIR/rescored-<metric> and is never a run directory.
Bad input is a UserError naming the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from infllm_eval.errors import UserError, unknown_name
from infllm_eval.metrics import METRICS
from infllm_eval.scorers import infbench, longbench, metric_name_for, missing_field
from infllm_eval.store import (CONFIG_FILE, SAMPLES_FILE, SUMMARY_CSV, SUMMARY_MD, read_config, read_run,
                               summarize, to_markdown)

RESCORED_FILE = "rescored.jsonl"

Metric = Callable[..., float]


@dataclass
class FileScores:
    """Per-line scores (0-1) of a predictions file, their aggregate (0-100) and, for LongBench-E, buckets."""

    task: str
    metric: str
    lines: list[int]  # 1-based line numbers of the scored lines (blank lines are skipped)
    scores: list[float]
    aggregate: float
    buckets: dict[str, float] | None = None


def resolve_task(task: str) -> tuple[str, bool]:
    """(metric name, LongBench-E?) for a task name such as `trec`, `trec_e`, `longbench_trec` or `passkey`."""
    bare = task.removeprefix("longbench_")
    is_e = bare.endswith("_e") and bare[:-2] in longbench.DATASET_METRIC
    name = metric_name_for(task[:-2] if is_e else task)
    if name is None:
        if task in METRICS:
            return task, False
        valid = [*longbench.DATASETS, *infbench.TASKS, *infbench.INFLLM_VARIANTS]
        raise unknown_name("task", task, valid)
    return name, is_e


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; malformed JSON or a non-object is a UserError."""
    if not path.is_file():
        raise UserError(f"Predictions file '{path}' does not exist.")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path} line {n} is not valid JSON ({e.msg}); fix or delete that line."
                ) from None
            if not isinstance(obj, dict):
                raise UserError(
                    f"{path} line {n} is not a JSON object; each line needs 'pred' and 'answers'."
                )
            rows.append((n, obj))
    if not rows:
        raise UserError(f"Predictions file '{path}' has no lines to score.")
    return rows


def _field(path: Path, n: int, row: dict, key: str, hint: str) -> Any:
    if key not in row or row[key] is None:
        raise UserError(f"{path} line {n} has no '{key}' field; {hint}.")
    return row[key]


def score_one(metric_name: str, prediction: Any, answers: Any, fields: dict, where: str) -> float:
    """The metric's score for one sample; `where` ("FILE line N") names it in a UserError."""
    if not isinstance(prediction, str):
        raise UserError(f"{where}: the prediction must be a string, not {type(prediction).__name__}.")
    if not isinstance(answers, list):
        answers = [answers]  # InfLLM's pred.py wraps a scalar answer the same way
    lacking = missing_field(metric_name, answers, fields)
    if lacking:
        raise UserError(f"{where} has no '{lacking}' field, which the metric {metric_name} needs.")
    try:
        return float(METRICS[metric_name](prediction, answers, **fields))
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"{where}: field 'answers' cannot be scored with {metric_name} ({e}).") from None


def score_file(path: str | Path, task: str | None = None, buckets: bool = False) -> FileScores:
    """Scores a LongBench / InfLLM predictions file; `task` defaults to the file name before its first "."."""
    path = Path(path)
    rows = _read_jsonl(path)
    task = task or path.name.split(".")[0]
    metric_name, is_e = resolve_task(task)
    need = "each line needs 'pred' and 'answers' (LongBench / InfLLM format)"
    lines, scores, lengths = [], [], []
    for n, row in rows:
        pred = _field(path, n, row, "pred", need)
        answers = _field(path, n, row, "answers", need)
        fields = {k: v for k, v in row.items() if k not in ("pred", "answers")}
        scores.append(score_one(metric_name, pred, answers, fields, f"{path} line {n}"))
        lines.append(n)
        if is_e or buckets:
            lengths.append(_field(path, n, row, "length", "LongBench-E scoring splits by 'length'"))
    aggregate = longbench.aggregate(scores)
    split = longbench.length_buckets(scores, lengths) if (is_e or buckets) else None
    return FileScores(
        task=task, metric=metric_name, lines=lines, scores=scores, aggregate=aggregate, buckets=split
    )


def write_per_sample(result: FileScores, out: str | Path) -> Path:
    """One JSON line per scored line: {"line": n, "score": s} with s in [0, 1]."""
    out = Path(out)
    text = "".join(json.dumps({"line": n, "score": s}) + "\n" for n, s in zip(result.lines, result.scores))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"Cannot write per-sample scores to '{out}' ({e.strerror}).") from None
    return out


# -- run directories -----------------------------------------------------------------------------------------
def run_metric(run_dir: Path, cfg: dict | None = None) -> str:
    """The metric a run used: config.yaml `task.metric`, else its task definition's (profile first); `cfg` is
    the run's config.yaml when the caller has read it already."""
    cfg = read_config(run_dir) if cfg is None else cfg
    task = cfg.get("task") or {}
    if task.get("metric"):
        return str(task["metric"])
    from infllm_eval.tasks import load_definition

    definition = load_definition(str(task.get("definition") or task.get("name")))
    profile = (definition.get("profiles") or {}).get(task.get("profile") or definition.get("default_profile"))
    metric = (profile or {}).get("metric") or definition.get("metric")
    if not metric:
        where = run_dir / CONFIG_FILE
        raise UserError(f"{where} names no metric for task '{task.get('name')}'; pass --task.")
    return str(metric)


def rescore_run(
    run_dir: str | Path, task: str | None = None, out: str | Path | None = None
) -> tuple[str, int, pd.DataFrame, Path]:
    """Rescores the finished records of a run directory into `out` (default RUN_DIR/rescored-<metric>), never
    touching the run; returns (metric, records rescored, summary of the rescored records, out)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE}) nor a predictions file.")
    if not (run_dir / SAMPLES_FILE).is_file():
        raise UserError(f"Run directory '{run_dir}' has no {SAMPLES_FILE}: it has no records to score.")
    metric_name = resolve_task(task)[0] if task else run_metric(run_dir, read_config(run_dir))
    if metric_name not in METRICS:
        raise unknown_name("metric", metric_name, list(METRICS))
    target = _rescore_dir(run_dir, metric_name, out)
    run = read_run(run_dir)
    if not run.records:
        raise UserError(f"{run_dir / SAMPLES_FILE} has no records of the run's current config to score.")
    records = [_rescored(rec, metric_name, run_dir / SAMPLES_FILE) for rec in run.records]
    summary = summarize(records)
    _write_rescored(target, records, summary)
    return metric_name, sum(r.get("status") == "ok" for r in records), summary, target


def _rescore_dir(run_dir: Path, metric_name: str, out: str | Path | None) -> Path:
    """Where rescored records go: checked before anything is scored or written; never a run directory."""
    target = Path(out).expanduser() if out else run_dir / f"rescored-{metric_name}"
    if target.exists() and not target.is_dir():
        raise UserError(f"--out '{target}' is a file; pass a folder for {RESCORED_FILE} and the summary.")
    if (target / CONFIG_FILE).exists() or (target / SAMPLES_FILE).exists():
        raise UserError(f"--out '{target}' is a run directory; rescoring never writes into a run, pass another folder.")
    return target


def _rescored(rec: dict, metric_name: str, samples_path: Path) -> dict:
    """A copy of a record with the new score (finished records only; failures are kept as they are)."""
    if rec.get("status") != "ok":
        return dict(rec)
    where = f"{samples_path} sample '{rec.get('sample_id')}'"
    for key in ("prediction", "answers"):
        if rec.get(key) is None:
            raise UserError(f"{where} has no '{key}' field; finished records need 'prediction' and 'answers'.")
    new = score_one(metric_name, rec["prediction"], rec["answers"], dict(rec.get("score_fields") or {}), where)
    return {**rec, "score": new, "original_score": rec.get("score"), "metric": metric_name}


def _write_rescored(target: Path, records: list[dict], summary: pd.DataFrame) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, text in ((RESCORED_FILE, lines), (SUMMARY_CSV, summary.to_csv(index=False)),
                           (SUMMARY_MD, to_markdown(summary))):
            tmp = target / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target / name)
    except OSError as e:
        raise UserError(f"Cannot write the rescored records to '{target}' ({e.strerror}).") from None
