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
import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
    """Read and check the task's rows from `data_dir` or the hub cache (downloading when online).

    The file is streamed line by line (hashed on the way), never held whole: the peak memory is the rows plus one
    line, not the file's bytes and text on top (∞-Bench files run to GBs).
    """
    with _open_local(definition, data_dir) if data_dir else _open_hub(definition) as (fh, origin):
        digest = hashlib.sha256()
        rows = read_jsonl(_hashed(fh, digest), origin)
    check_rows(rows, definition, origin)
    return Rows(rows=rows, origin=origin, sha256=digest.hexdigest())


# -- reading ------------------------------------------------------------------------------------------------------
@contextmanager
def _open_local(definition: dict, data_dir: str) -> Iterator[tuple[BinaryIO, str]]:
    folder = Path(str(data_dir)).expanduser()
    name = file_name(definition)
    for cand in (folder / name, folder / "data" / name, folder / str(definition["benchmark"]) / name):
        if cand.is_file():
            with cand.open("rb") as fh:
                yield fh, str(cand)
            return
    raise UserError(
        f"task.data_dir '{data_dir}' has no {name}; put the benchmark's {name} there "
        f"(e.g. `infllm-eval data download {definition['dataset']} --to {data_dir}`)."
    )


@contextmanager
def _open_hub(definition: dict) -> Iterator[tuple[BinaryIO, str]]:
    src = definition["source"]
    if src.get("hub_archive"):
        archive = hub_file(src["hub_repo"], src["hub_archive"], definition["dataset"])
        member = src["archive_member"].format(dataset=definition["dataset"])
        with zipfile.ZipFile(archive) as zf:
            try:
                fh = zf.open(member)
            except KeyError:
                raise UserError(
                    f"{archive} has no member {member}; the hub's archive changed, so put {file_name(definition)} in a "
                    "folder and set task.data_dir=that folder."
                ) from None
            with fh:
                yield fh, f"{archive}:{member}"
        return
    path = hub_file(src["hub_repo"], src["hub_file"].format(dataset=definition["dataset"]), definition["dataset"])
    with open(path, "rb") as fh:
        yield fh, str(path)


def _hashed(lines: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    for line in lines:
        digest.update(line)
        yield line


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
    return read_jsonl(io.BytesIO(raw), origin)


def read_jsonl(chunks: Iterable[bytes], origin: str) -> list[dict]:
    """`parse_jsonl` over the file's bytes given as `\\n`-ended pieces (a binary file's lines), one at a time.

    Lines are numbered as `str.splitlines` of the whole text numbers them. A file that is not UTF-8 is reported
    before any bad line, wherever its bad byte lies.
    """
    rows: list[dict] = []
    offset = number = 0
    bad_line: UserError | None = None
    for chunk in chunks:
        try:
            text = chunk.decode("utf-8")  # b"\n" never occurs inside a UTF-8 sequence, so pieces decode alone
        except UnicodeDecodeError as e:
            raise UserError(
                f"{origin} is not UTF-8 text (byte {offset + e.start}); use the benchmark's own jsonl file."
            ) from e
        offset += len(chunk)
        if bad_line is not None:
            continue  # only the UTF-8 check goes on
        for line in text.splitlines():
            number += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad_line = UserError(f"{origin} line {number} is not valid JSON ({e.msg} at column {e.colno}).")
                bad_line.__cause__ = e
                break
            if not isinstance(row, dict):
                bad_line = UserError(
                    f"{origin} line {number} is a JSON {type(row).__name__}, not an object with fields."
                )
                break
            row["_line"] = number
            rows.append(row)
    if bad_line is not None:
        raise bad_line
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
