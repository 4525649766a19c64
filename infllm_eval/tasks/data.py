"""Benchmark data: the benchmarks' own jsonl files, from a local folder or the Hugging Face hub cache.

Where a task's rows come from is data in its definition (`source:` in tasks/_infbench.yaml, _longbench.yaml):

- ∞-Bench: `{dataset}.jsonl` in the dataset repo `xinrongzhang2022/InfiniteBench` (fields id, context, input,
  answer, options).
- LongBench: `data/{dataset}.jsonl` inside `data.zip` of the dataset repo `THUDM/LongBench` (fields input, context,
  answers, length, dataset, language, all_classes, _id); the hub's loading script is not used (newer `datasets`
  no longer run scripts).

`task.data_dir=DIR` reads `DIR/{dataset}.jsonl` (or `DIR/data/...`, the zip's layout, or `DIR/infbench/...`,
`DIR/longbench/...`, so one folder serves a sweep over both benchmarks) instead, e.g.
a copy made with `infllm-eval data download ... --to DIR` for offline nodes. Every problem with the data is one
UserError naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infllm_eval.errors import UserError


@dataclass
class Rows:
    """A task's rows, where they came from (for messages) and the sha256 of the file's bytes (for resume keys)."""

    rows: list[dict]
    origin: str
    sha256: str


def file_name(definition: dict) -> str:
    """The benchmark's own name of the task's file, e.g. `kv_retrieval.jsonl`."""
    return f"{definition['dataset']}.jsonl"


def load_rows(definition: dict, data_dir: str | None) -> Rows:
    """Read and check the task's rows from `data_dir` or the hub cache (downloading when online)."""
    raw, origin = _read_local(definition, data_dir) if data_dir else _read_hub(definition)
    rows = parse_jsonl(raw, origin)
    check_rows(rows, definition, origin)
    return Rows(rows=rows, origin=origin, sha256=hashlib.sha256(raw).hexdigest())


# -- reading ------------------------------------------------------------------------------------------------------
def _read_local(definition: dict, data_dir: str) -> tuple[bytes, str]:
    folder = Path(str(data_dir)).expanduser()
    name = file_name(definition)
    for cand in (folder / name, folder / "data" / name, folder / str(definition["benchmark"]) / name):
        if cand.is_file():
            return cand.read_bytes(), str(cand)
    raise UserError(
        f"task.data_dir '{data_dir}' has no {name}; put the benchmark's {name} there "
        f"(e.g. `infllm-eval data download {definition['dataset']} --to {data_dir}`)."
    )


def _read_hub(definition: dict) -> tuple[bytes, str]:
    src = definition["source"]
    if src.get("hub_archive"):
        archive = hub_file(src["hub_repo"], src["hub_archive"], definition["dataset"])
        member = src["archive_member"].format(dataset=definition["dataset"])
        with zipfile.ZipFile(archive) as zf:
            try:
                return zf.read(member), f"{archive}:{member}"
            except KeyError:
                raise UserError(
                    f"{archive} has no member {member}; the hub's archive changed, so put {file_name(definition)} in a "
                    "folder and set task.data_dir=that folder."
                ) from None
    path = hub_file(src["hub_repo"], src["hub_file"].format(dataset=definition["dataset"]), definition["dataset"])
    return Path(path).read_bytes(), str(path)


def hub_file(repo: str, filename: str, dataset: str) -> str:
    """Local path of a file of a hub dataset repo: from the cache, downloaded when online."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset")
    except Exception as e:  # offline + not cached, no network, gated, moved: one sentence either way
        raise UserError(
            f"{filename} of the dataset {repo} is not in the Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); run `infllm-eval data download {dataset}` where there is internet, or put "
            f"{dataset}.jsonl in a folder and set task.data_dir=that folder."
        ) from e


def parse_jsonl(raw: bytes, origin: str) -> list[dict]:
    """One JSON object per non-empty line; a bad line is a UserError naming the file and the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{origin} is not UTF-8 text (byte {e.start}); use the benchmark's own jsonl file.") from e
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{origin} line {number} is not valid JSON ({e.msg} at column {e.colno}).") from e
        if not isinstance(row, dict):
            raise UserError(f"{origin} line {number} is a JSON {type(row).__name__}, not an object with fields.")
        row["_line"] = number
        rows.append(row)
    if not rows:
        raise UserError(f"{origin} has no rows; use the benchmark's own jsonl file.")
    return rows


def check_rows(rows: Iterable[dict], definition: dict, origin: str) -> None:
    """Every row has the definition's required fields (∞-Bench: `context` or its older name `content`)."""
    required = list(definition.get("required_fields") or [])
    for row in rows:
        for field in required:
            if field not in row:
                raise field_error(origin, row, field, "is missing (wrong file or schema?)")
        if definition.get("benchmark") == "infbench" and "context" not in row and "content" not in row:
            raise field_error(origin, row, "context", "is missing (wrong file or schema?)")
        context = row.get("context", row.get("content"))
        if not isinstance(context, str):
            raise field_error(origin, row, "context", f"must be text, not {type(context).__name__}")


def field_error(origin: str, row: dict, field: str, problem: str) -> UserError:
    return UserError(f"{origin} line {row.get('_line', '?')}: field '{field}' {problem}.")


def answers_of(row: dict, field: str) -> list[str]:
    """The raw answer field as a list of strings (a scalar becomes a one-item list; numbers become text)."""
    value: Any = row[field]
    items = value if isinstance(value, list) else [value]
    return [v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in items]


# -- pre-fetching for offline nodes ---------------------------------------------------------------------------------
def download(definition: dict, to: str | None) -> str:
    """Fetch the task's file into the hub cache; with `to`, also write `to/{dataset}.jsonl`. Returns where it is.

    Files are streamed, never read whole (∞-Bench's longbook_qa_chn.jsonl is about 2 GB).
    """
    src, dataset = definition["source"], definition["dataset"]
    if src.get("hub_archive"):
        archive = hub_file(src["hub_repo"], src["hub_archive"], dataset)
        member = src["archive_member"].format(dataset=dataset)
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise UserError(f"{archive} has no member {member}; the hub's archive changed.")
            if not to:
                return f"{archive}:{member}"
            with zf.open(member) as fh:
                return _write(fh, to, file_name(definition))
    path = hub_file(src["hub_repo"], src["hub_file"].format(dataset=dataset), dataset)
    if not to:
        return path
    with open(path, "rb") as fh:
        return _write(fh, to, file_name(definition))


def _write(fh: Any, to: str, name: str) -> str:
    folder = Path(to).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as out:
        shutil.copyfileobj(fh, out, length=1 << 20)
    os.replace(tmp, target)
    return str(target)
