"""A new method and a new task from outside the project: one module + one config each, no project file edited.

The module is a third-party package in a temporary folder that joins through the `infllm_eval` entry point group
(a `.dist-info` with `entry_points.txt`, as `pip install` would leave); its configs sit in a plugin folder named by
INFLLM_EVAL_PATH (`conf/method/<name>.yaml`, `tasks/<name>.yaml`). They then run through `run`, `plan` and `bench`
(whose cells are fresh processes, so the child finds the plugin the same way).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from infllm_eval import registry
from infllm_eval.cli import app
from infllm_eval.config import compose

PLUGIN = '''
"""A toy third-party plugin: a sliding window without attention sinks, and an echo-the-number task."""
import hashlib

import torch

from infllm_eval.methods import METHODS, ContextMethod
from infllm_eval.methods.kernels import Stage, multi_stage_attention
from infllm_eval.tasks import TASK_BUILDERS
from infllm_eval.tasks.base import Sample, max_new_tokens, pick_profile


@METHODS.register("toy-window")
class ToyWindow(ContextMethod):
    """The last `n_local` tokens at their true distances (StreamingLLM without its sinks)."""

    name = "toy-window"
    position_scheme = "true"
    param_names = ("n_local", "base", "distance_scale")

    def new_state(self, layer_idx):
        return {"k": None, "v": None, "start": 0}

    def attend(self, state, q, k, v, pos, out=None):
        p0, n = int(pos[0]), self.params["n_local"]
        keys = k if state["k"] is None else torch.cat([state["k"], k], dim=2)
        values = v if state["v"] is None else torch.cat([state["v"], v], dim=2)
        start = state["start"]
        stage = Stage(self.rope.rotate_range(q, p0), self.rope.rotate_range(keys, start), values,
                      k_start=start, band=(0, n - 1))
        out, _ = multi_stage_attention([stage], pos, self.scale, self.q_tile, self.fattn, out=out)
        keep = min(n - 1, keys.shape[2])  # what the next query can still see
        state["k"], state["v"] = keys[:, :, -keep:].clone(), values[:, :, -keep:].clone()
        state["start"] = start + keys.shape[2] - keep
        return out

    def attended_keys(self, p):
        return min(p + 1, self.params["n_local"])

    def memory_model(self, length, chunk, device):
        kept = min(length, self.params["n_local"] - 1 + chunk)
        return {"device_tokens": kept, "host_tokens": 0, "workspace_keys": self.params["n_local"] + self.q_tile}


@TASK_BUILDERS.register("toy-echo")
class EchoTask:
    """Filler, then a number to repeat: `samples` prompts of about `words` words."""

    def __init__(self, task_cfg, definition, tokenizer, render, *, answer_prefix, seed):
        self.name, self.tokenizer, self.seed, self.render = task_cfg["name"], tokenizer, seed, render
        self.metric = definition["metric"]
        _, profile = pick_profile(definition, task_cfg["profile"])
        self.template, self.max_new_tokens = profile["template"], max_new_tokens(task_cfg["max_new_tokens"], profile)
        self.samples, self.words = task_cfg["samples"], task_cfg["words"]

    @staticmethod
    def plan_samples(task_cfg, max_context):
        return [task_cfg["words"]], task_cfg["samples"], "about words tokens"

    def sample_specs(self):
        return [{"sample_id": f"{self.name}-{i}", "length": self.words, "depth": None, "index": i}
                for i in range(self.samples)]

    def build(self, spec):
        key = str(10000 + (self.seed * 7919 + spec["index"] * 104729) % 90000)
        text = self.render(self.template.format(filler="grass " * self.words, key=key))
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return Sample(spec["sample_id"], ids, [key], self.words, None, n_input_tokens=len(ids))

    def data_fingerprint(self):
        return hashlib.sha256(f"{self.template}|{self.words}|{self.seed}".encode()).hexdigest()
'''

METHOD_YAML = """\
defaults: [_base, _self_]
name: toy-window
impl: toy-window
description: a toy sliding window (a plugin)
params:
  n_local: 64
"""

TASK_YAML = """\
description: echo a number after filler (a plugin)
builder: toy-echo
metric: first_int_match
default_profile: plain
profiles:
  plain:
    template: "{filler}The number is {key}. Repeat the number: "
    max_new_tokens: 4
run:
  profile: plain
  samples: 2
  words: 150
  max_new_tokens: null
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Installs the toy plugin the way a user would: a package with an entry point, plus a plugin folder."""
    site = tmp_path / "site"
    (site / "toy_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "toy_plugin.py").write_text(PLUGIN)
    (site / "toy_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (site / "toy_plugin-0.1.dist-info" / "entry_points.txt").write_text("[infllm_eval]\ntoy = toy_plugin\n")
    folder = tmp_path / "plugin"
    (folder / "conf" / "method").mkdir(parents=True)
    (folder / "tasks").mkdir()
    (folder / "conf" / "method" / "toy-window.yaml").write_text(METHOD_YAML)
    (folder / "tasks" / "toy-echo.yaml").write_text(TASK_YAML)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))  # bench's cells are fresh processes
    monkeypatch.setenv("INFLLM_EVAL_PATH", str(folder))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    registry.load_plugins()
    yield tmp_path
    from infllm_eval.methods import METHODS
    from infllm_eval.tasks import TASK_BUILDERS

    METHODS._entries.pop("toy-window", None)
    TASK_BUILDERS._entries.pop("toy-echo", None)


def _run(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_a_plugin_method_and_task_run_plan_and_bench_without_touching_the_project(plugin):
    out = plugin / "runs"
    common = ["model=tiny-llama", "task=toy-echo", "progress=false", f"output_dir={out}"]
    # run: the toy window covering the whole prompt is full attention, so both give the same greedy tokens
    _run(["run", "method=toy-window", "method.params.n_local=4096", *common, "run_name=wide"])
    _run(["run", "method=full", *common, "run_name=full"])
    wide = [json.loads(x) for x in (out / "wide" / "samples.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (out / "full" / "samples.jsonl").read_text().splitlines()]
    assert [r["status"] for r in wide] == ["ok", "ok"] and [r["answers"] for r in wide] == [r["answers"] for r in full]
    assert [r["prediction"] for r in wide] == [r["prediction"] for r in full]
    assert all(r["new_tokens"] == 4 for r in wide)  # the task file's max_new_tokens
    # a narrow window attends to other keys: the run's records say which method ran
    _run(["run", "method=toy-window", *common, "run_name=narrow"])
    prov = json.loads((out / "narrow" / "provenance.json").read_text())
    assert prov["method"]["name"] == "toy-window" and prov["method"]["n_local"] == 64
    n_tokens = wide[0]["n_input_tokens"]
    assert n_tokens > 64  # the narrow window really drops keys

    # plan: the method's own memory model, not full attention's
    cfg = compose(["model=tiny-llama", "method=toy-window", "task=toy-echo"])
    from infllm_eval.commands.plan import estimate, plan_cells

    full_cfg = compose(["model=tiny-llama", "method=full", "task=toy-echo"])
    toy = [estimate(cfg, n, "cpu")["kv_device"] for n in (16384, 65536)]
    full = [estimate(full_cfg, n, "cpu")["kv_device"] for n in (16384, 65536)]
    per_token = full[1] - full[0]  # full attention keeps every token: its growth prices 49152 tokens
    assert toy[0] == toy[1] == (64 - 1 + 8192) * per_token // 49152  # window + one chunk, at any length
    rows = plan_cells([["model=tiny-llama", "method=toy-window", "task=toy-echo"]], budget_gb=1)
    assert [(r["method"], r["task"], r["samples"]) for r in rows] == [("toy-window", "toy-echo", 2)]

    # bench: each cell in a fresh process; K/V held = what the toy keeps (n_local - 1 tokens), per layer
    from infllm_eval.commands.bench import run_bench

    df, _ = run_bench(["model=tiny-llama", "bench.methods=[toy-window,full]", "bench.lengths=[256]",
                       "bench.decode_tokens=2", "bench.warmup_tokens=32", "bench.peak_matmul_size=128",
                       "chunk_size=64", "bench.prompt_build_length=0", "bench.peer=false", f"bench.output_dir={plugin / 'bench'}"])
    assert list(df["method"]) == ["toy-window", "full"] and set(df["status"]) == {"ok"}
    kv = df.set_index("method")["kv_device_mb"]
    assert kv["toy-window"] < kv["full"] / 3  # 63 kept tokens against 256 + 2 decoded


def test_plugin_names_are_listed_and_typos_get_did_you_mean(plugin):
    def cli(*args):  # a fresh process finds the plugin by itself (entry point + INFLLM_EVAL_PATH)
        return subprocess.run([sys.executable, "-m", "infllm_eval.cli", *args], capture_output=True, text=True)

    listed = cli("ls")
    assert listed.returncode == 0 and "toy-window" in listed.stdout and "toy-echo" in listed.stdout
    bad = cli("run", "model=tiny-llama", "method=toy-windw", "task=toy-echo")
    assert bad.returncode == 2 and "Did you mean 'toy-window'" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("run", "model=tiny-llama", "task=toy-echo", "task.profile=plane")
    assert bad.returncode == 2 and "task.profile must be plain" in bad.stderr  # the task's own profiles


def test_a_plugin_that_fails_to_import_is_one_sentence(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "bad_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "bad_plugin.py").write_text("raise RuntimeError('boom')\n")
    (site / "bad_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugin\nVersion: 0.1\n")
    (site / "bad_plugin-0.1.dist-info" / "entry_points.txt").write_text("[infllm_eval]\nbad = bad_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    from infllm_eval.errors import UserError

    with pytest.raises(UserError, match="plugin 'bad' .* failed to import: RuntimeError: boom"):
        registry.load_plugins()
