"""Run directories: per-sample records flushed as they finish, resume by content key, tidy summaries.

A run directory holds
  config.yaml       the resolved config
  provenance.json   git commit + dirty flag, package versions, device, seed, model/task/method fingerprints
  samples.jsonl     one JSON record per finished sample (appended, flushed and fsynced one by one)
  summary.csv       one row per model x method x task x length x depth cell (written atomically at the end)
  summary.md        the same as a markdown table
Records are keyed by a hash of everything that determines the sample's result, never by position, so a resumed
run reuses exactly the finished samples whose key still matches; a torn last line (a killed writer) is dropped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from infllm_eval.errors import UserError

SUMMARY_KEYS = ["model", "method", "task", "length", "depth"]


def content_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


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
        self.samples_path = self.dir / "samples.jsonl"
        self._lock_file = None

    # -- locking: two processes must not write the same run directory ---------------------------------------------
    def __enter__(self) -> "RunStore":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.dir / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock_file.close()
            raise UserError(f"Run directory '{self.dir}' is in use by another infllm-eval process; wait for it "
                            "or choose another output_dir/run_name.") from e
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    # -- records ---------------------------------------------------------------------------------------------------
    def load_records(self) -> list[dict]:
        """All complete records in samples.jsonl; a torn (unterminated or unparsable) last line is dropped."""
        if not self.samples_path.exists():
            return []
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
        if good_bytes < len(data):  # cut the torn tail so the next append starts on a fresh line
            with open(self.samples_path, "r+b") as f:
                f.truncate(good_bytes)
        return records

    def finished(self) -> dict[str, dict]:
        """key -> latest record with status ok (failed samples are retried on resume)."""
        return {r["key"]: r for r in self.load_records() if r.get("status") == "ok"}

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    # -- run files -------------------------------------------------------------------------------------------------
    def start(self, config_yaml: str, provenance: dict) -> None:
        """Writes config + provenance and removes a previous summary, so an interrupted run never leaves a
        summary that looks complete."""
        for name in ("summary.csv", "summary.md"):
            (self.dir / name).unlink(missing_ok=True)
        _atomic_write(self.dir / "config.yaml", config_yaml)
        _atomic_write(self.dir / "provenance.json", json.dumps(provenance, indent=2, default=str))

    def write_summary(self, records: Iterable[dict]) -> pd.DataFrame:
        df = summarize(list(records))
        _atomic_write(self.dir / "summary.csv", df.to_csv(index=False))
        _atomic_write(self.dir / "summary.md", to_markdown(df))
        return df


def _int_or_none(x) -> int | None:
    return None if pd.isna(x) else int(x)


def summarize(records: list[dict]) -> pd.DataFrame:
    """Tidy summary: one row per cell; score = 100 x mean over samples that finished (status ok)."""
    cols = SUMMARY_KEYS + ["n", "n_ok", "n_error", "n_oom", "n_timeout", "n_skipped", "score", "input_tokens",
                           "prefill_s", "decode_s", "prefill_tok_s", "peak_mem_mb"]
    if not records:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(records)
    df["depth"] = df["depth"].fillna(-1.0)
    rows = []
    for keys, g in df.groupby(SUMMARY_KEYS, sort=True):
        ok = g[g["status"] == "ok"]
        rows.append({
            **dict(zip(SUMMARY_KEYS, keys)),
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
            "prefill_tok_s": round((ok["n_input_tokens"] / ok["prefill_s"]).mean(), 1) if len(ok) else float("nan"),
            "peak_mem_mb": round(g["peak_mem_bytes"].max() / 2**20, 1) if g["peak_mem_bytes"].notna().any()
            else float("nan"),
        })
    out = pd.DataFrame(rows, columns=cols)
    out["depth"] = out["depth"].where(out["depth"] >= 0, None)
    return out


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    body = "".join("| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |\n" for row in df.itertuples(index=False))
    return header + body


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
