"""Every command of the CLI, listed from the Typer app (a new command must add its case here), given bad input:
exit 2, one line on stderr, no traceback. Exit 1 is reserved for `check` on a regression and `run -m` on
unfinished cells."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from infllm_eval.cli import app


def _commands(group, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out += _commands(cmd, (*prefix, name)) if hasattr(cmd, "commands") else [(*prefix, name)]
    return out


COMMANDS = _commands(typer.main.get_command(app))

# one bad input per command ({tmp}: an empty folder of this test); tiny and fast, nothing loads a model
BAD = {
    ("run",): ["method=nosuch"],
    ("ls",): ["nosuch"],
    ("config",): ["model=nosuch"],
    ("plan",): ["method=nosuch"],
    ("report",): ["{tmp}/missing"],
    ("check",): ["{tmp}/missing", "--baseline", "{tmp}/missing.csv"],
    ("merge",): ["{tmp}/missing"],
    ("score",): ["{tmp}/missing.jsonl"],
    ("bench",): ["bench.methods=[nosuch]"],
    ("data", "download"): ["nosuch"],
    ("data", "make"): ["passkey", "--lengths", ","],
}


def test_every_command_has_a_bad_input_case():
    assert sorted(COMMANDS) == sorted(BAD), "add a bad-input case for each new command to BAD"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_input_is_exit_2_one_line_no_traceback(command, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in BAD[command]]
    r = subprocess.run([sys.executable, "-m", "infllm_eval.cli", *command, *args], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, (command, r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []  # a refused command leaves nothing behind


@pytest.mark.parametrize("args", [["nosuch"], ["check"], ["plan", "--budget-gb", "abc"], ["check", "x", "--alpha"],
                                  ["data", "make"], ["report", "--nosuch", "x"]], ids=" ".join)
def test_usage_errors_are_one_line_exit_2_not_a_box(args, tmp_path):
    """Unknown commands and options, missing arguments, values of the wrong type: click's usage errors, said in
    one line like every other bad input (typer printed a multi-line box)."""
    r = subprocess.run([sys.executable, "-m", "infllm_eval.cli", *args], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--help" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "╭" not in r.stderr and "Traceback" not in r.stderr
