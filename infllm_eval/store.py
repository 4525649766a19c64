"""Run directories: per-sample records flushed as they finish, resume by content key, tidy summaries.

A run directory holds
  config.yaml       the resolved config
  provenance.json   git commit + dirty flag, package versions, device, seed, model/task/method fingerprints
  samples.jsonl     one JSON record per finished sample (appended, flushed and fsynced one by one)
  summary.csv       one row per model x method x task x length x depth cell (written atomically at the end)
  summary.md        the same as a markdown table
  .lock             held (flock) by the one process writing the directory
Records are keyed by a hash of everything that determines the sample's result, never by position, so a resumed
run reuses exactly the finished samples whose key still matches; a torn last line (a killed writer) is dropped.

The read side lives here too, one reader for every command: `read_run` (one run directory, read-only, with
the records that count, see `current_records`, and what else it holds, counted), `scan_runs` (every run
directory under a root: one row per sample, the same content key in several directories folded, unreadable
runs listed with the reason), `load_runs` (its tidy per-sample table) and `read_table` (that table from a run
root or from a tidy.csv / tidy.parquet written by `report`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import yaml

from infllm_eval.errors import UserError

# -- the run directory's files: the on-disk contract (tests spell the names out) -------------------------------
CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
LOCK_FILE = ".lock"
#: the tidy per-sample table `report` writes (and `check` reads)
TIDY_CSV = "tidy.csv"
TIDY_PARQUET = "tidy.parquet"
#: a shard's run directory (`shard=i/n`): run_name-shard{i}of{n}
SHARD_DIR = re.compile(r"^(?P<base>.+)-shard(?P<i>\d+)of(?P<n>\d+)$")

#: the axes of a sample: one summary row / report cell per distinct combination
AXES = ["model", "method", "task", "length", "depth"]
#: a cell of the grid (every depth together)
CELL = ["model", "method", "task", "length"]
FAILED = ("error", "oom", "timeout", "skipped")  # statuses counted separately, never scored


def content_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run_dir_name(run_name: str, shard: tuple[int, int] | None) -> str:
    """The directory name of a run: run_name, or run_name-shard{i}of{n} for shard i of n."""
    return f"{run_name}-shard{shard[0]}of{shard[1]}" if shard else run_name


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunStore:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.samples_path = self.dir / SAMPLES_FILE
        self._lock_file = None

    # -- locking: two processes must not write the same run directory ---------------------------------------------
    def __enter__(self) -> "RunStore":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.dir / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock_file.close()
            raise UserError(f"Run directory '{self.dir}' is in use by another infllm-eval process; wait for it "
                            "or choose another output_dir/run_name.") from e
        except OSError as e:  # e.g. a network filesystem without locks
            self._lock_file.close()
            raise UserError(f"Cannot lock '{self.dir / LOCK_FILE}' ({e.strerror}); put output_dir on a filesystem "
                            "with file locks (flock).") from e
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    # -- records ---------------------------------------------------------------------------------------------------
    def load_records(self) -> list[dict]:
        """All complete records in samples.jsonl; a torn (unterminated or unparsable) last line is dropped (and
        cut from the file, so the next append starts on a fresh line). A bad line before the last one is a
        UserError, raised before the file is touched."""
        records, good_bytes, size = self._parse_records()
        if good_bytes < size:  # cut the torn tail so the next append starts on a fresh line
            with open(self.samples_path, "r+b") as f:
                f.truncate(good_bytes)
        return records

    def check_records(self) -> None:
        """Reads samples.jsonl without modifying it: a UserError if a line other than the last is corrupt."""
        self._parse_records()

    def _parse_records(self) -> tuple[list[dict], int, int]:
        """(complete records, bytes they span, file size); a corrupt line before the last is a UserError."""
        if not self.samples_path.exists():
            return [], 0, 0
        data = self.samples_path.read_bytes()
        lines = data.split(b"\n")
        records, good_bytes = [], 0
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last and line == b"":
                break
            try:
                if last:  # no trailing newline: the writer died mid-line
                    raise ValueError
                records.append(json.loads(line))
                good_bytes += len(line) + 1
            except ValueError:
                if not last:
                    raise UserError(f"{self.samples_path} line {i + 1} is not valid JSON; delete that line to resume.")
                break
        return records, good_bytes, len(data)

    def finished(self) -> dict[str, dict]:
        """key -> latest record with status ok (failed samples are retried on resume): `latest_per_key`'s
        choice, finished records only. The writer knows its current keys, so looking them up here picks exactly
        the records `current_records` counts."""
        return {r["key"]: r for r in latest_per_key(self.load_records()) if r.get("status") == "ok"}

    def replace_records(self, records: Iterable[dict]) -> None:
        """Rewrites samples.jsonl with `records` (atomically: a crash leaves the old file or the new one)."""
        lines = (json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        _atomic_write(self.samples_path, "".join(lines))

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    # -- run files -------------------------------------------------------------------------------------------------
    def start(self, config_yaml: str, provenance: dict) -> None:
        """Checks the existing records first (a corrupt line refuses the run before anything changes), then
        removes a previous summary, so an interrupted run never leaves a summary that looks complete, and
        writes config + provenance."""
        self.load_records()
        for name in (SUMMARY_CSV, SUMMARY_MD):
            (self.dir / name).unlink(missing_ok=True)
        _atomic_write(self.dir / CONFIG_FILE, config_yaml)
        _atomic_write(self.dir / PROVENANCE_FILE, json.dumps(provenance, indent=2, default=str))

    def write_summary(self, records: Iterable[dict]) -> pd.DataFrame:
        """summary.md, then summary.csv (each atomically): summary.csv is the mark of a finished cell, so it
        is written last."""
        df = summarize(list(records))
        _atomic_write(self.dir / SUMMARY_MD, to_markdown(df))
        _atomic_write(self.dir / SUMMARY_CSV, df.to_csv(index=False))
        return df


def _int_or_none(x) -> int | None:
    return None if pd.isna(x) else int(x)


def summarize(records: list[dict]) -> pd.DataFrame:
    """Tidy summary: one row per cell; score = 100 x mean over samples that finished (status ok)."""
    cols = AXES + ["n", "n_ok", "n_error", "n_oom", "n_timeout", "n_skipped", "score", "input_tokens",
                   "prefill_s", "decode_s", "prefill_tok_s", "peak_mem_mb"]
    if not records:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(records)
    df["depth"] = df["depth"].fillna(-1.0)
    rows = []
    for keys, g in df.groupby(AXES, sort=True):
        ok = g[g["status"] == "ok"]
        rows.append({
            **dict(zip(AXES, keys)),
            "n": len(g),
            "n_ok": len(ok),
            "n_error": int((g["status"] == "error").sum()),
            "n_oom": int((g["status"] == "oom").sum()),
            "n_timeout": int((g["status"] == "timeout").sum()),
            "n_skipped": int((g["status"] == "skipped").sum()),
            "score": round(100 * ok["score"].mean(), 2) if len(ok) else float("nan"),
            "input_tokens": _int_or_none(g["n_input_tokens"].mean()),
            "prefill_s": round(ok["prefill_s"].mean(), 3) if len(ok) else float("nan"),
            "decode_s": round(ok["decode_s"].mean(), 3) if len(ok) else float("nan"),
            "prefill_tok_s": round((_prefilled(ok) / ok["prefill_s"]).mean(), 1) if len(ok) else float("nan"),
            "peak_mem_mb": round(g["peak_mem_bytes"].max() / 2**20, 1) if g["peak_mem_bytes"].notna().any()
            else float("nan"),
        })
    out = pd.DataFrame(rows, columns=cols)
    out["depth"] = out["depth"].where(out["depth"] >= 0, None)
    return out


def _cell_text(v: Any) -> str:
    return "" if pd.isna(v) else str(v)


def to_markdown(df: pd.DataFrame, fmt: Callable[[Any], str] = _cell_text) -> str:
    """A markdown table of `df`, each value written by `fmt` (default: empty for NaN / None, else str)."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    body = "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in df.itertuples(index=False))
    return header + body


# -- reading run directories (read-only: a run may still be written) -------------------------------------------
@dataclass
class SamplesFile:
    """A samples.jsonl as read: its records and the lines that could not be read (never silently)."""

    records: list[dict]
    bad_lines: list[int]  # 1-based numbers of lines that are not a JSON object (corrupt, or the torn last line)
    torn: bool  # the last line is unterminated: its writer was killed mid-line (or is still writing it)


def _prefilled(ok: pd.DataFrame) -> pd.Series:
    """Prompt tokens each sample prefilled itself: all of them, less those it reused from another sample's prefix
    (`prefix_reused_tokens`, prefix_reuse) whose time its prefill_s does not hold."""
    reused = ok["prefix_reused_tokens"].fillna(0) if "prefix_reused_tokens" in ok else 0
    return ok["n_input_tokens"] - reused


def read_samples(samples_path: Path) -> SamplesFile:
    """The records of a samples.jsonl without modifying it. A line that is not a JSON object is skipped and
    listed in `bad_lines`; an unterminated last line is torn (the writer's resume drops it, see
    `RunStore.load_records`)."""
    if not samples_path.is_file():
        return SamplesFile([], [], False)
    try:
        lines = samples_path.read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"Cannot read '{samples_path}' ({e.strerror}).") from None
    torn = lines[-1].strip() != b""  # a complete file ends with a newline
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = None if torn and number == len(lines) else json.loads(line)
        except ValueError:
            rec = None
        if _is_record(rec):
            records.append(rec)
        else:
            bad.append(number)
    return SamplesFile(records, bad, torn)


def _is_record(rec: Any) -> bool:
    """A JSON object with the fields every reader computes with of the right type (or absent)."""
    if not isinstance(rec, dict):
        return False
    number = (int, float, type(None))
    return (all(isinstance(rec.get(k), number) and not isinstance(rec.get(k), bool)
                for k in ("score", "length", "depth", "prefill_s", "decode_s", "peak_mem_bytes", "n_input_tokens"))
            and all(isinstance(rec.get(k), (str, type(None))) for k in ("key", "cell_key", "sample_id", "status")))


def read_config(run_dir: Path) -> dict:
    """A run directory's config.yaml as a plain dict."""
    path = run_dir / CONFIG_FILE
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not valid YAML"
        raise UserError(f"Cannot read '{path}' ({reason}); is '{run_dir}' a run directory?") from None
    if not isinstance(cfg, dict):
        raise UserError(f"'{path}' is not a config (a YAML mapping); restore it or re-run '{run_dir}'.")
    return cfg


def read_provenance(run_dir: Path) -> dict:
    """A run directory's provenance.json; {} when there is none (its records then cannot be verified)."""
    path = run_dir / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        prov = None
    if not isinstance(prov, dict):
        raise UserError(f"'{path}' is not valid JSON; restore it or re-run '{run_dir}'.")
    return prov


def current_records(records: list[dict], prov: dict, cfg: dict) -> list[dict]:
    """The records that count in a run directory: those of its current config and grid, one per sample.

    A run directory accumulates the records of every config it was run with. A record counts when
    1. its content key belongs to the current config: its `cell_key` equals provenance's `cell_key` (the
       runner writes both). Runs written before `cell_key` existed: its `key` equals the key the runner
       computes from the provenance (harness version, model / task fingerprints, method, generation, device,
       dtype); when no key can be re-derived (another harness version wrote it), the latest record per
       sample_id, marked `_unverified`;
    2. it is the latest record of its key, except that a finished (`ok`) record is never replaced by a later
       failure (see `latest_per_key`): the sample a resume would reuse;
    3. it lies in the grid config.yaml selects (`grid_split`): a run re-run with fewer lengths, depths,
       samples or a lower limit describes that grid, as its summary.csv does; the records outside it stay on
       disk (a grown grid reuses them) and `read_run` counts them as `outside_grid`.
    `report`, `check`, `score`, `merge` and the runner's summary all count by this rule (the runner's resume,
    `RunStore.finished`, looks records up by the keys of its current grid).
    """
    return grid_split(config_records(records, prov, cfg), cfg)[0]


def config_records(records: list[dict], prov: dict, cfg: dict) -> list[dict]:
    """Rules 1 and 2 of `current_records`: the current config's latest record per key, whatever the grid."""
    cell_key = prov.get("cell_key")
    if cell_key is not None:
        mine = [r for r in records if r.get("cell_key") == cell_key and r.get("key") is not None]
    else:
        mine = _records_of_legacy_config(records, prov, cfg)
    return latest_per_key(mine)


def latest_per_key(records: list[dict]) -> list[dict]:
    """One record per `key`: later lines win, but a finished sample is never replaced by a failure."""
    latest: dict[str, dict] = {}
    for r in records:
        prev = latest.get(r["key"])
        if prev is None or r.get("status") == "ok" or prev.get("status") != "ok":
            latest[r["key"]] = r
    return list(latest.values())


def grid_split(records: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    """(records inside, records outside) the grid of the run's config.yaml: `task.lengths`, `task.depths`,
    `task.samples` (the sample's index, the last part of its id) and `task.limit` (the first `limit` rows of a
    benchmark's file; with `shard=i/n` the shard's rows i, i+n, ...). A key the task does not have selects
    nothing, and a record that does not say its length / depth / index is kept."""
    task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    inside = [r for r in records if _in_sample_grid(r, task)]
    limit = _number(task.get("limit"))
    if limit:
        inside = _within_limit(inside, int(limit), cfg.get("shard"))
    kept = {id(r) for r in inside}
    return inside, [r for r in records if id(r) not in kept]


def _number(x: Any) -> float | None:
    try:
        return None if x is None or isinstance(x, bool) else float(x)
    except (TypeError, ValueError):
        return None


def _numbers(xs: Any) -> list[float] | None:
    values = [_number(x) for x in xs] if isinstance(xs, list) else []
    return None if not values or None in values else values


def _in_sample_grid(r: dict, task: dict) -> bool:
    lengths, depths, samples = _numbers(task.get("lengths")), _numbers(task.get("depths")), _number(task.get("samples"))
    length, depth = _number(r.get("length")), _number(r.get("depth"))
    index = re.search(r"-(\d+)$", str(r.get("sample_id", "")))
    return not (
        (lengths is not None and length is not None and length not in lengths)
        or (depths is not None and depth is not None and not any(abs(depth - d) < 1e-9 for d in depths))
        or (samples is not None and index is not None and int(index[1]) >= samples)
    )


def _within_limit(records: list[dict], limit: int, shard: Any) -> list[dict]:
    """A benchmark run takes its file's rows in order, so the rows with records are the first ones: the k-th
    distinct data line (`meta.line`) is row i + k*n of shard i/n (row k unsharded)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard or ""))
    first, step = (int(m[1]), int(m[2])) if m else (0, 1)
    rank = {v: k for k, v in enumerate(sorted({_data_line(r) for r in records} - {None}))}
    return [r for r in records if _data_line(r) not in rank or first + rank[_data_line(r)] * step < limit]


def _data_line(r: dict) -> int | None:
    line = r["meta"].get("line") if isinstance(r.get("meta"), dict) else None
    return line if isinstance(line, int) and not isinstance(line, bool) else None


def _records_of_legacy_config(records: list[dict], prov: dict, cfg: dict) -> list[dict]:
    """Runs written before cell_key existed: recompute the runner's keys from provenance."""
    mine: list[dict] = []
    base = {
        "harness": (prov.get("versions") or {}).get("infllm-eval"),
        "model": prov.get("model_fingerprint"),
        "method": prov.get("method"),
        "task": prov.get("task_fingerprint"),
        "generation": prov.get("generation"),
        "device": str(prov.get("device", "")).split(":")[0],
    }
    for dtype in _dtype_candidates(cfg, base["device"]):
        expected = {
            sid: content_key({**base, "dtype": dtype}, sid)
            for sid in {r.get("sample_id") for r in records}
        }
        hits = [r for r in records if r.get("key") == expected[r.get("sample_id")]]
        if len(hits) > len(mine):
            mine = hits
    if not mine:  # keys cannot be re-derived (e.g. written by another harness version): latest per sample
        by_id = {r.get("sample_id"): r for r in records if r.get("key") or r.get("sample_id")}
        mine = [{**r, "key": r.get("key") or r.get("sample_id"), "_unverified": True} for r in by_id.values()]
    return mine


def _dtype_candidates(cfg: dict, device_type: str) -> list[str]:
    names = {
        "float32": "torch.float32",
        "fp32": "torch.float32",
        "bfloat16": "torch.bfloat16",
        "bf16": "torch.bfloat16",
        "float16": "torch.float16",
        "fp16": "torch.float16",
    }
    if cfg.get("dtype") in names:
        return [names[cfg["dtype"]]]
    return (
        ["torch.bfloat16", "torch.float32"] if device_type == "cuda" else ["torch.float32", "torch.bfloat16"]
    )


COMPLETE, INTERRUPTED = "complete", "interrupted"


def run_status(run_dir: Path, n_counted: int | None = None) -> str:
    """`complete` when summary.csv is at least as new as samples.jsonl (the runner, `merge` and `score` write
    it last) or, for a copy whose file times were not kept, when its `n` adds up to the `n_counted` samples
    that count; else `interrupted` (killed, still running, or appended to after its summary)."""
    summary, samples = run_dir / SUMMARY_CSV, run_dir / SAMPLES_FILE
    if not summary.is_file():
        return INTERRUPTED
    if not samples.is_file() or samples.stat().st_mtime_ns <= summary.stat().st_mtime_ns:
        return COMPLETE
    try:
        n = pd.read_csv(summary)["n"].sum()
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return INTERRUPTED
    return COMPLETE if n_counted is not None and n == n_counted else INTERRUPTED


@dataclass
class RunContents:
    """A run directory as read: its config, provenance, the records that count (`current_records`) and
    everything else it holds, counted."""

    dir: Path
    config: dict
    provenance: dict
    records: list[dict]  # the records that count
    outside_grid: list[dict]  # records of the current config outside config.yaml's grid (kept, not counted)
    other_configs: int  # records of earlier configs of the directory (kept, not counted)
    bad_lines: list[int]  # unreadable lines of samples.jsonl (see `read_samples`), skipped
    torn: bool  # the last of them is torn
    status: str  # COMPLETE | INTERRUPTED (`run_status`)


def read_run(run_dir: str | Path) -> RunContents:
    """Reads a run directory without modifying it; an unreadable config.yaml / provenance.json is a UserError."""
    run_dir = Path(run_dir)
    cfg, prov = read_config(run_dir), read_provenance(run_dir)
    samples = read_samples(run_dir / SAMPLES_FILE)
    mine = config_records(samples.records, prov, cfg)
    inside, outside = grid_split(mine, cfg)
    keys = {m["key"] for m in mine}
    other = sum(r.get("key") not in keys for r in samples.records)
    return RunContents(run_dir, cfg, prov, inside, outside, other, samples.bad_lines, samples.torn,
                       run_status(run_dir, len(inside)))


def find_runs(root: Path) -> list[Path]:
    """The run directories under `root`: folders holding samples.jsonl or the .lock every run takes first (a
    run that stopped before its first sample), outside hidden folders."""
    found = {p.parent for name in (SAMPLES_FILE, LOCK_FILE) for p in root.rglob(name) if p.is_file()}
    return sorted(d for d in found if not any(part.startswith(".") for part in d.relative_to(root).parts))


# -- the tidy per-sample table -------------------------------------------------------------------------------
RESULT_COLS = [
    "sample_id",
    "key",
    "score",
    "status",
    "error",
    "n_input_tokens",
    "truncated",
    "n_dropped",
    "prefill_s",
    "decode_s",
    "new_tokens",
    "stopped_by",
    "peak_mem_bytes",
    "prediction",
    "answers",
    "finished_at",
]
#: one row per run directory found under a root (`RunsScan.runs`)
RUN_COLS = ["run_dir", "run_status", "samples", "outside_grid", "other_configs", "corrupt_lines", "torn_last_line",
            "duplicates_folded", "unreadable"]


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _rel(root: Path, run_dir: Path) -> str:
    return str(run_dir.relative_to(root)) if run_dir != root else "."


def _run_columns(root: Path, run: RunContents) -> dict:
    cfg, prov = run.config, run.provenance
    git = prov.get("git") or {}
    versions = prov.get("versions") or {}
    method = dict(prov.get("method") or {})
    task = cfg.get("task") or {}
    return {
        "run_dir": _rel(root, run.dir),
        "run_status": run.status,
        "run_corrupt_lines": len(run.bad_lines),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "harness_version": versions.get("infllm-eval"),
        "torch_version": versions.get("torch"),
        "transformers_version": versions.get("transformers"),
        "device": prov.get("device"),
        "device_name": prov.get("device_name"),
        "dtype": str(prov.get("dtype") or cfg.get("dtype")).removeprefix("torch."),
        "seed": prov.get("seed", cfg.get("seed")),
        "chunk_size": cfg.get("chunk_size"),
        "max_new_tokens": (prov.get("generation") or {}).get("max_new_tokens"),
        "model_fingerprint": prov.get("model_fingerprint"),
        "task_fingerprint": prov.get("task_fingerprint"),
        "prompt_profile": task.get("profile"),
        "method_fingerprint": _short_hash(method),
        "method_params": json.dumps(
            {k: v for k, v in method.items() if k not in ("name", "position_scheme")}, sort_keys=True
        ),
        "shard": cfg.get("shard"),
    }


def _row(r: dict, run_cols: dict) -> dict:
    row = {k: r.get(k) for k in AXES}
    row.update({k: r.get(k) for k in RESULT_COLS})
    row["answers"] = json.dumps(r.get("answers"), ensure_ascii=False) if r.get("answers") is not None else None
    row["config_verified"] = not r.get("_unverified", False)  # record provably of the run's current config
    row.update(run_cols)
    return row


@dataclass
class RunsScan:
    """Every run directory under a root, read (`scan_runs`)."""

    table: pd.DataFrame  # one row per sample (content key), see `load_runs`; may be empty
    runs: pd.DataFrame  # one row per run directory found (RUN_COLS): status, counts of what was not counted
    duplicates: pd.DataFrame  # kept_run_dir, dropped_run_dir, n: samples found in several run directories


def scan_runs(root: str | Path) -> RunsScan:
    """Reads every run directory under `root` (`find_runs`, `read_run`). A run whose config.yaml or
    provenance.json cannot be read is listed with the reason (`unreadable`) and the others are read. The same
    sample (content key) in several run directories is one row: the record a resume would keep (a finished
    one over a failure, then the latest `finished_at`), the others counted in `duplicates`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Results root '{root}' is not a directory; pass a folder that holds run directories.")
    runs, rows = [], []
    for run_dir in find_runs(root):
        info = dict.fromkeys(RUN_COLS, 0) | {"run_dir": _rel(root, run_dir), "unreadable": ""}
        try:
            run = read_run(run_dir) if (run_dir / SAMPLES_FILE).is_file() else _no_samples(run_dir)
        except UserError as e:
            runs.append(info | {"run_status": run_status(run_dir), "unreadable": str(e)})
            continue
        info.update(run_status=run.status, outside_grid=len(run.outside_grid), other_configs=run.other_configs,
                    corrupt_lines=len(run.bad_lines), torn_last_line=int(run.torn))
        run_cols = _run_columns(root, run)
        rows += [_row(r, run_cols) for r in run.records]
        runs.append(info)
    table, dups = _fold_duplicates(pd.DataFrame(rows))
    runs = pd.DataFrame(runs, columns=RUN_COLS)
    if len(dups):
        runs["duplicates_folded"] = runs["run_dir"].map(dups.groupby("dropped_run_dir")["n"].sum()).fillna(0)
    runs["duplicates_folded"] = runs["duplicates_folded"].astype(int)
    runs["samples"] = runs["run_dir"].map(table["run_dir"].value_counts() if len(table) else {}).fillna(0).astype(int)
    return RunsScan(table, runs, dups)


def _no_samples(run_dir: Path) -> RunContents:
    """A run directory without samples.jsonl (stopped before its first sample): nothing to count."""
    cfg = read_config(run_dir) if (run_dir / CONFIG_FILE).is_file() else {}
    return RunContents(run_dir, cfg, read_provenance(run_dir), [], [], 0, [], False, run_status(run_dir))


def _fold_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per content key: a finished record over a failure, then the latest; records whose config could
    not be verified are never folded across directories."""
    dup_cols = ["kept_run_dir", "dropped_run_dir", "n"]
    if df.empty:
        return df, pd.DataFrame(columns=dup_cols)
    fold = df["key"].astype(str).where(df["config_verified"], df["run_dir"] + "\0" + df["key"].astype(str))
    rank = pd.DataFrame({"fold": fold, "ok": df["status"] == "ok", "at": df["finished_at"].fillna("").astype(str)})
    order = rank.sort_values(["fold", "ok", "at"], kind="stable").index  # the last of each fold wins
    last = rank.loc[order].drop_duplicates("fold", keep="last").index
    kept = df.loc[sorted(last)]
    dropped = df.drop(index=last)
    dups = pd.DataFrame(columns=dup_cols)
    if len(dropped):
        kept_dir = df.loc[last, "run_dir"].set_axis(fold.loc[last])
        pairs = pd.DataFrame({"kept_run_dir": fold.loc[dropped.index].map(kept_dir),
                              "dropped_run_dir": dropped["run_dir"]})
        dups = pairs.groupby(["kept_run_dir", "dropped_run_dir"]).size().reset_index(name="n")
    return kept, dups


def finish_table(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["peak_mem_mb"] = (pd.to_numeric(df["peak_mem_bytes"]) / 2**20).round(1)
    df["total_s"] = pd.to_numeric(df["prefill_s"]) + pd.to_numeric(df["decode_s"])
    return df.sort_values(
        AXES[:4] + ["depth", "sample_id", "run_dir"], na_position="first", kind="stable", ignore_index=True
    )


def load_runs(root: str | Path, scan: RunsScan | None = None) -> pd.DataFrame:
    """One row per sample (content key) over every readable run directory under `root` (read-only, see
    `scan_runs`): the axes (model, method, task, length, depth, sample_id), the result (score, status, timings,
    peak memory, input tokens, truncation), the run (`run_dir`, `run_status` complete | interrupted,
    `run_corrupt_lines`) and the provenance (git commit, versions, device, dtype, model / task / method
    fingerprints, prompt profile); `config_verified` is False for records `current_records` could not tie to
    the config. A UserError when no run under `root` has a sample that counts."""
    scan = scan_runs(root) if scan is None else scan
    if scan.table.empty:
        bad = scan.runs[scan.runs["unreadable"] != ""]
        why = f"; {len(bad)} unreadable, e.g. {bad['unreadable'].iloc[0]}" if len(bad) else ""
        raise UserError(
            f"No run directories with samples under '{root}' (each needs {CONFIG_FILE} and {SAMPLES_FILE}){why}"
            .rstrip(".") + "."
        )
    return finish_table(scan.table)


def read_table(path: str | Path) -> pd.DataFrame:
    """A tidy table written by `write_report` (CSV or Parquet), or built from a run root; a run root with an
    unreadable run directory or a corrupt samples.jsonl line is refused (a gate must not skip samples)."""
    path = Path(path)
    if path.is_dir():
        scan = scan_runs(path)
        runs = scan.runs
        bad = runs[(runs["unreadable"] != "") | (runs["corrupt_lines"] > runs["torn_last_line"])]
        if len(bad):
            r = bad.iloc[0]
            raise UserError(r["unreadable"] or f"'{path / r['run_dir'] / SAMPLES_FILE}' has unreadable lines "
                            f"(see `infllm-eval report {path}`); fix or delete them first.")
        return load_runs(path, scan)
    if not path.is_file():
        raise UserError(
            f"'{path}' does not exist; pass a run root or a {TIDY_CSV} / {TIDY_PARQUET} from `report`."
        )
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in AXES + ["sample_id", "score", "status"] if c not in df.columns]
    if missing:
        raise UserError(f"'{path}' is not a tidy table from `infllm-eval report` (no column {missing[0]}).")
    return df


# -- provenance ---------------------------------------------------------------------------------------------------
def _git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("infllm-eval", "torch", "transformers", "hydra-core", "tokenizers", "flash-attn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def provenance(device, seed: int, **fingerprints: Any) -> dict:
    return {"git": _git_state(), "versions": _versions(), "device": str(device),
            "device_name": device_name(device), "platform": platform.platform(), "seed": seed, **fingerprints}
