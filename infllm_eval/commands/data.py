"""`infllm-eval data ...`: pre-fetch benchmark files for offline nodes and write synthetic retrieval data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from infllm_eval.errors import UserError, unknown_name

data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Benchmark data: download ∞-Bench / LongBench files, make synthetic retrieval data.")

#: benchmark group names -> which definitions they mean
GROUPS = {
    "infbench": lambda n: n.startswith("infbench_"),
    "longbench": lambda n: n.startswith("longbench_") and not n.endswith("_e"),
    "longbench_e": lambda n: n.startswith("longbench_") and n.endswith("_e"),
}


def resolve(names: list[str]) -> list[str]:
    """Task definition names for benchmark groups, task names (infbench_kv_retrieval) or dataset names (qasper_e)."""
    from infllm_eval.tasks import definition_names, load_definition

    known = [n for n in definition_names() if load_definition(n).get("builder") == "benchmark"]
    by_dataset = {load_definition(n)["dataset"]: n for n in known}
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            out += [n for n in known if GROUPS[name](n)]
        elif name in known:
            out.append(name)
        elif name in by_dataset:
            out.append(by_dataset[name])
        else:
            raise unknown_name("benchmark or task", name, [*GROUPS, *known])
    return list(dict.fromkeys(out))


NAMES = typer.Argument(..., help="infbench | longbench | longbench_e | a task (infbench_passkey, longbench_trec, "
                                  "trec_e, ...)")


@data_app.command("download")
def download(
    names: list[str] = NAMES,
    to: str | None = typer.Option(None, "--to", help="also copy the jsonl files here (use as task.data_dir=DIR)"),
) -> None:
    """Fetch the benchmarks' own jsonl files into the Hugging Face cache (and, with --to, a folder)."""
    import zipfile

    from infllm_eval.tasks import load_definition
    from infllm_eval.tasks.data import download as fetch

    tasks = resolve(names)
    if to:
        _writable_folder(Path(to).expanduser(), f"--to '{to}'")  # before any download
    for name in tasks:
        try:
            where = fetch(load_definition(name), to)
        except (OSError, zipfile.BadZipFile) as e:  # a full disk, a folder that went away, a corrupt cached archive
            raise UserError(f"Downloading {name} failed ({getattr(e, 'strerror', None) or e}); the tasks listed "
                            "above are done, re-run for the rest.") from None
        typer.echo(f"{name}: {where}")


def _writable_folder(folder: Path, what: str) -> None:
    """A folder that is, or can be created, writable: its nearest existing ancestor is a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"Cannot write {what}: '{folder}' is a file, not a folder.")
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or _pseudo_fs(parent):
        raise UserError(f"Cannot write {what}: '{parent}' is not a writable folder.")


def _pseudo_fs(path: Path) -> bool:
    """/proc and /sys accept no new files, whatever os.access says (as root it says yes)."""
    return path.resolve().parts[1:2] in (("proc",), ("sys",))


@data_app.command("make")
def make(
    task: str = typer.Argument(..., help="passkey | number_string | kv_retrieval (∞-Bench recipes)"),
    lengths: str = typer.Option(..., "--lengths", help="comma-separated prompt lengths in tokens, e.g. 4096,131072"),
    depths: str | None = typer.Option(None, "--depths", help="comma-separated needle depths in [0, 1] "
                                                                "(default: tasks/passkey.yaml's run:)"),
    samples: int | None = typer.Option(None, "--samples", help="rows per length x depth (default: passkey's)"),
    model: str | None = typer.Option(None, "--model", help="whose tokenizer sizes the rows (default: conf's)"),
    seed: int | None = typer.Option(None, "--seed", help="default: conf's seed"),
    out: str | None = typer.Option(None, "--out", help="output jsonl (default: ./<task>.jsonl)"),
) -> None:
    """Write synthetic ∞-Bench rows sized in a model's tokens (run them with task.data_dir=<folder of --out>)."""
    from infllm_eval.config import compose
    from infllm_eval.tasks.synthetic import GENERATORS, check_request, load_tokenizer, make_rows

    if task not in GENERATORS:
        raise unknown_name("synthetic task", task, list(GENERATORS))
    # bad input fails before a tokenizer loads or anything is written
    length_values = _numbers(lengths, int, "--lengths")
    depth_values = _numbers(depths, float, "--depths") if depths is not None else None
    cfg = compose(["task=passkey", *([f"model={model}"] if model else [])])
    depth_values = depth_values if depth_values is not None else [float(d) for d in cfg.task.depths]
    n_samples = cfg.task.samples if samples is None else samples
    check_request(task, length_values, depth_values, n_samples)
    target = _writable_target(Path(out or f"{task}.jsonl").expanduser())
    rows = make_rows(task, load_tokenizer(cfg.model), length_values, depth_values, n_samples,
                     int(cfg.seed if seed is None else seed))
    _write_rows(target, rows)
    typer.echo(f"{len(rows)} rows -> {target} (run: task=infbench_{task} task.data_dir={target.parent})")


def _writable_target(target: Path) -> Path:
    """--out, checked before any work: not a folder, and its nearest existing folder is writable."""
    if target.is_dir():
        raise UserError(f"--out '{target}' is a folder; pass a file name such as {target / 'passkey.jsonl'}.")
    _writable_folder(target.parent, f"--out '{target}'")
    return target


def _write_rows(target: Path, rows: list[dict]) -> None:
    """Writes the rows atomically (a temporary file, then a rename); on failure nothing is left behind."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise UserError(f"Cannot write --out '{target}' ({e.strerror or e}).") from None


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} must be comma-separated numbers, e.g. 4096,8192; got {text!r}.") from None
