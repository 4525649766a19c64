"""Benchmark data plumbing: synthetic ∞-Bench generators (sizes in the model's tokens, seeds, schema), the
`data make` / `data download` commands, and `include:` inheritance of task definitions. No network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from infllm_eval.errors import UserError
from infllm_eval.models import tiny_tokenizer
from infllm_eval.tasks import load_definition, make_task
from infllm_eval.tasks.synthetic import make_rows


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(512)


def prompt_len(tok, task: str, row: dict) -> int:
    template = load_definition(f"infbench_{task}")["profiles"]["infllm"]["template"]
    key = row["input"][6:44] if task == "kv_retrieval" else ""
    return len(tok.encode(template.format(context=row["context"], input=row["input"], key=key)))


@pytest.mark.parametrize("task", ["passkey", "number_string"])
@pytest.mark.parametrize("length", [300, 1000, 4099, 20000])
def test_needle_rows_are_exactly_the_target_length(task, length, tok):
    rows = make_rows(task, tok, [length], [0.0, 0.5, 1.0], 1, 0)
    for row in rows:
        assert row["n_tokens"] == length == prompt_len(tok, task, row)


def test_kv_rows_are_within_half_a_pair_and_one_percent(tok):
    for length in (2000, 30000):
        for row in make_rows("kv_retrieval", tok, [length], [0.0, 1.0], 1, 0):
            measured = prompt_len(tok, "kv_retrieval", row)
            per_pair = len(tok.encode('"' + row["answer"][0] + '": "' + row["answer"][0] + '", ', add_special_tokens=False))
            assert measured == row["n_tokens"] and abs(measured - length) <= per_pair
            assert length < 20000 or abs(measured - length) <= 0.01 * length


def test_one_million_token_passkey_builds_in_seconds_within_one_percent(tok):
    start = time.perf_counter()
    (row,) = make_rows("passkey", tok, [1_048_576], [0.5], 1, 0)
    elapsed = time.perf_counter() - start
    measured = prompt_len(tok, "passkey", row)  # an independent tokenization of the whole prompt
    assert abs(measured - 1_048_576) <= 10_486 and measured == row["n_tokens"]
    assert elapsed < 30, elapsed


def test_schema_keys_and_needles(tok):
    rows = make_rows("number_string", tok, [800], [0.0, 1.0], 2, 0)
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert set(row) >= {"id", "context", "input", "answer", "options", "length", "depth"}
        (key,) = row["answer"]
        assert len(key) == 10 and key.isdigit() and row["input"] == "What is the sequence of digits?"
        assert f"The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n" in row["context"]
    first, last = rows[0]["context"], rows[2]["context"]
    needle = "The sequence of digits is"
    assert first.index(needle) == 0 and last.index(needle) > 0.9 * len(last)
    (kv,) = make_rows("kv_retrieval", tok, [1500], [0.5], 1, 0)
    pairs = json.loads(kv["context"].removeprefix("JSON data:\n"))
    key = kv["input"][7:43]
    assert kv["input"].startswith('\nKey: "') and pairs[key] == kv["answer"][0]
    assert list(pairs).index(key) == round(0.5 * (len(pairs) - 1))


def test_seeds_and_stable_rows_when_lengths_are_added(tok):
    a = make_rows("passkey", tok, [500, 900], [0.5], 2, seed=0)
    b = make_rows("passkey", tok, [900], [0.5], 2, seed=0)
    c = make_rows("passkey", tok, [500, 900], [0.5], 2, seed=1)
    assert [r["answer"] for r in a] == [r["answer"] for r in make_rows("passkey", tok, [500, 900], [0.5], 2, seed=0)]
    assert [r["answer"] for r in a[2:]] == [r["answer"] for r in b]
    assert [r["answer"] for r in a] != [r["answer"] for r in c]


def test_bad_generator_arguments(tok):
    with pytest.raises(UserError, match="Did you mean 'passkey'"):
        make_rows("passkeys", tok, [100], [0.5], 1, 0)
    with pytest.raises(UserError, match="--lengths"):
        make_rows("passkey", tok, [2_000_000], [0.5], 1, 0)
    with pytest.raises(UserError, match="--depths"):
        make_rows("passkey", tok, [500], [1.5], 1, 0)


def test_synthetic_rows_run_as_the_infbench_task(tok, tmp_path):
    rows = make_rows("kv_retrieval", tok, [900, 1800], [0.0, 1.0], 1, 0)
    (tmp_path / "kv_retrieval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"name": "infbench_kv_retrieval", "definition": "infbench_kv_retrieval", "profile": "infllm",
           "data_dir": str(tmp_path), "limit": None, "truncation": "none", "max_length": None, "max_new_tokens": None}
    task = make_task(cfg, tok, lambda s: s, answer_prefix=False, seed=0)
    specs = task.sample_specs()
    assert [(s["length"], s["depth"]) for s in specs] == [(900, 0.0), (900, 1.0), (1800, 0.0), (1800, 1.0)]
    sample = task.build(specs[3])
    assert sample.answers == rows[3]["answer"] and sample.n_input_tokens == rows[3]["n_tokens"]


# -- the commands -------------------------------------------------------------------------------------------------------
def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "infllm_eval.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, check=False)


def test_data_make_writes_benchmark_jsonl(tmp_path):
    out = tmp_path / "passkey.jsonl"
    r = cli("data", "make", "passkey", "--lengths", "400,800", "--depths", "0,1", "--samples", "2",
            "--model", "tiny-llama", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8 and {r["n_tokens"] for r in rows} == {400, 800}
    assert f"task.data_dir={tmp_path}" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["data", "make", "passkeyy", "--lengths", "100"], "Did you mean 'passkey'"),
    (["data", "make", "passkey", "--lengths", "4k"], "--lengths must be comma-separated numbers"),
    (["data", "download", "longbenh"], "Did you mean 'longbench'"),
])
def test_data_commands_bad_input_exit_2(args, needle):
    r = cli(*args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_data_download_offline_says_what_to_do(tmp_path):
    r = cli("data", "download", "trec_e", env_extra={"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "data.zip" in r.stderr and "trec_e.jsonl" in r.stderr and "task.data_dir" in r.stderr


def test_download_names_resolve_groups_tasks_and_datasets():
    from infllm_eval.commands.data import resolve

    assert len(resolve(["infbench"])) == 12 and len(resolve(["longbench"])) == 21
    assert len(resolve(["longbench_e"])) == 13
    assert resolve(["kv_retrieval", "longbench_trec", "trec_e"]) == [
        "infbench_kv_retrieval", "longbench_trec", "longbench_trec_e"]


# -- include: ------------------------------------------------------------------------------------------------------------
def test_include_merges_and_refuses_cycles(tmp_path, monkeypatch):
    from infllm_eval import tasks

    (tmp_path / "_base.yaml").write_text("builder: benchmark\nprofiles:\n  infllm: {template: a, max_new_tokens: 3}\n")
    (tmp_path / "child.yaml").write_text("include: _base.yaml\nprofiles:\n  infllm: {max_new_tokens: 5}\n")
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    monkeypatch.setattr(tasks, "tasks_dirs", lambda: [tmp_path])
    assert tasks.load_definition("child") == {
        "builder": "benchmark", "profiles": {"infllm": {"template": "a", "max_new_tokens": 5}}}
    assert tasks.definition_names() == ["child", "loop"]
    with pytest.raises(UserError, match="include chain"):
        tasks.load_definition("loop")


@pytest.mark.slow
def test_smollm2_one_million_token_passkey_within_one_percent():
    from infllm_eval.config import compose
    from infllm_eval.tasks.synthetic import load_tokenizer

    tok = load_tokenizer(compose(["model=smollm2"]).model)
    (row,) = make_rows("passkey", tok, [1_048_576], [0.5], 1, 0)
    assert abs(prompt_len(tok, "passkey", row) - 1_048_576) <= 10_486


def test_number_string_grid_task_is_exact_and_seeded(tok):
    cfg = {"name": "number_string", "definition": "number_string", "profile": "official", "lengths": [256, 1000],
           "depths": [0.0, 1.0], "samples": 2, "max_new_tokens": None}
    task = make_task(cfg, tok, lambda s: s, answer_prefix=False, seed=0)
    assert task.max_new_tokens == 12 and task.metric == "infbench_number_string"
    keys = []
    for spec in task.sample_specs():
        sample = task.build(spec)
        (key,) = sample.answers
        text = tok.decode(sample.input_ids, skip_special_tokens=True)
        assert sample.n_input_tokens == spec["length"] and len(key) == 10 and key.isdigit()
        assert f"The sequence of digits is {key}. Remember it. {key} is the sequence of digits." in text
        assert text.endswith("What is the sequence of digits?")
        keys.append(key)
    again = make_task(cfg, tok, lambda s: s, answer_prefix=False, seed=0)
    assert [again.key_for(s["length"], s["depth"], s["index"]) for s in again.sample_specs()] == keys
    assert len(set(keys)) == len(keys)


def test_hub_paths_read_the_archive_member_and_copy_for_offline_use(tmp_path, monkeypatch):
    """The hub code paths with a stand-in for hf_hub_download (no network): LongBench rows come from data.zip."""
    import zipfile

    import huggingface_hub

    from infllm_eval.paths import tasks_dir
    from infllm_eval.tasks import data

    fixtures = tasks_dir() / "fixtures"
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(fixtures / "longbench" / "trec.jsonl", "data/trec.jsonl")
    calls = []

    def fake_download(repo_id, filename, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(archive if filename == "data.zip" else fixtures / "infbench" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    rows = data.load_rows(load_definition("longbench_trec"), None)
    assert rows.origin.endswith("data.zip:data/trec.jsonl") and len(rows.rows) == 3
    out = data.download(load_definition("longbench_trec"), str(tmp_path / "offline"))
    assert (tmp_path / "offline" / "trec.jsonl").read_bytes() == (fixtures / "longbench" / "trec.jsonl").read_bytes()
    assert out.endswith("trec.jsonl")
    data.download(load_definition("infbench_code_run"), str(tmp_path / "offline"))
    assert (tmp_path / "offline" / "code_run.jsonl").is_file()
    assert calls[-1] == ("xinrongzhang2022/InfiniteBench", "code_run.jsonl", "dataset")
    with pytest.raises(UserError, match="no member data/qasper_e.jsonl"):
        data.download(load_definition("longbench_qasper_e"), None)


def test_jsonl_is_streamed_with_the_file_hash_and_the_same_rows_and_errors(tmp_path, monkeypatch):
    """load_rows reads the file line by line (never its whole bytes): same rows, line numbers and sha256."""
    import hashlib
    import pathlib

    from infllm_eval.paths import tasks_dir
    from infllm_eval.tasks import data

    raw = (tasks_dir() / "fixtures" / "infbench" / "kv_retrieval.jsonl").read_bytes() + b"\n\n"
    (tmp_path / "kv_retrieval.jsonl").write_bytes(raw)
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    loaded = data.load_rows(load_definition("infbench_kv_retrieval"), str(tmp_path))
    assert loaded.sha256 == hashlib.sha256(raw).hexdigest()
    lines = raw.decode("utf-8").splitlines()
    assert loaded.rows == [dict(json.loads(line), _line=n) for n, line in enumerate(lines, 1) if line.strip()]
    # a file that is not UTF-8 says so first (with the file's byte offset), even after a bad line
    bad = b'{"a": 1}\r\n{"a": \n\n\xff\n'
    at = bad.index(b"\xff")
    with pytest.raises(UserError, match=rf"F is not UTF-8 text \(byte {at}\)"):
        data.parse_jsonl(bad, "F")
    with pytest.raises(UserError, match="F line 2 is not valid JSON"):
        data.parse_jsonl(bad.replace(b"\xff", b"{}"), "F")


def test_cli_sweep_over_both_benchmarks_from_one_data_dir(tmp_path):
    from infllm_eval.paths import tasks_dir

    r = cli("run", "-m", "task=infbench_passkey,longbench_trec_e", "model=tiny-llama", "method=full",
            f"task.data_dir={tasks_dir() / 'fixtures'}", "task.limit=2", "progress=false", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    for task, lengths in (("infbench_passkey", {0}), ("longbench_trec_e", {0, 4000})):
        records = [json.loads(x) for x in (tmp_path / "tiny-llama" / "full" / task / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 2 and {r["status"] for r in records} == {"ok"}
        assert {r["length"] for r in records} == lengths
        assert (tmp_path / "tiny-llama" / "full" / task / "summary.csv").is_file()


def test_task_builders_register_themselves_and_an_unknown_one_gets_a_suggestion():
    from infllm_eval.tasks import TASK_BUILDERS
    from infllm_eval.tasks.benchmark import BenchmarkTask
    from infllm_eval.tasks.passkey import PasskeyTask

    assert TASK_BUILDERS.names() == ["benchmark", "passkey"]
    assert TASK_BUILDERS.get("passkey") is PasskeyTask and TASK_BUILDERS.get("benchmark") is BenchmarkTask
    with pytest.raises(UserError, match="Did you mean 'passkey'"):
        TASK_BUILDERS.get("paskey")


@pytest.mark.parametrize("task,sha256", [
    ("passkey", "848dd0d8a4ae64ca0ba6bfbef7d3b6a3910e12b1206696015fcc431fe47b865b"),
    ("number_string", "edf443982eeba44493a13893ffa17970c1f3422d8f01c5ca9990a3b07ac66e17"),
])
def test_synthetic_rows_are_those_of_before_the_recipe_moved_to_the_task_files(tok, task, sha256):
    import hashlib

    rows = make_rows(task, tok, [300, 700], [0.0, 0.5, 1.0], 2, 7)
    assert hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest() == sha256


def test_synthetic_needle_rows_follow_the_task_file(tok, monkeypatch):
    """One recipe: `data make passkey` reads tasks/passkey.yaml (needle, question, filler, key length)."""
    from infllm_eval import tasks

    real = tasks.load_definition

    def edited(name: str) -> dict:
        d = real(name)
        return {**d, "needle": "KEY={key}\n", "question": "Key?", "key_digits": 7} if name == "passkey" else d

    monkeypatch.setattr(tasks, "load_definition", edited)
    (row,) = make_rows("passkey", tok, [400], [0.5], 1, 0)
    (key,) = row["answer"]
    assert len(key) == 7 and f"KEY={key}\n" in row["context"] and row["input"] == "Key?"
    assert row["context"].startswith(real("passkey")["filler"])


def test_the_tokenizer_of_an_uncached_hub_model_is_a_user_error(tmp_path, monkeypatch):
    """synthetic.load_tokenizer asks models.hub_tokenizer, which names the model and what to do."""
    from infllm_eval.config import compose
    from infllm_eval.tasks.synthetic import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = compose(["model=qwen2"]).model
    with pytest.raises(UserError, match=f"Model '{model.id}' is not in the local Hugging Face cache"):
        load_tokenizer(model)
    with pytest.raises(UserError, match="is not a model directory"):
        load_tokenizer(compose(["model=qwen2", f"model.path={tmp_path}"]).model)


# -- issue 24: lengths the template cannot meet, empty requests, an unwritable --out ----------------------------
@pytest.mark.parametrize("task", ["passkey", "number_string", "kv_retrieval"])
def test_a_length_the_template_cannot_meet_is_refused_never_mislabelled(tok, task):
    with pytest.raises(UserError, match="--lengths 10 is shorter than the shortest"):
        make_rows(task, tok, [400, 10], [0.5], 1, 0)
    if task != "kv_retrieval":  # each row checks again: a key may tokenize longer than the ones probed
        import random

        from infllm_eval.tasks.synthetic import _needle_row, _Sizer

        sizer = _Sizer(tok, load_definition(f"infbench_{task}")["profiles"]["infllm"]["template"])
        with pytest.raises(UserError, match="shorter than this needle's prompt"):
            _needle_row(load_definition(task), sizer, 10, 0.5, random.Random(0))
    for length in range(60, 140):  # around the shortest prompt: every row written is its label's length
        try:
            rows = make_rows(task, tok, [length], [0.0, 0.5, 1.0], 3, 0)
        except UserError as e:
            assert "shorter than" in str(e)
            continue
        slack = 0 if task != "kv_retrieval" else 60  # kv rows: within half a pair, at most ~1 pair here
        assert all(abs(r["n_tokens"] - r["length"]) <= slack for r in rows), (length, rows[0]["n_tokens"])


@pytest.mark.parametrize("lengths,depths,samples,needle", [
    ([], [0.5], 1, "--lengths names no length"), ([400], [], 1, "--depths names no depth"),
    ([400], [0.5], 0, "--samples must be a positive"), ([400], [0.5], -2, "--samples must be a positive"),
])
def test_empty_requests_are_refused(tok, lengths, depths, samples, needle):
    with pytest.raises(UserError, match=needle):
        make_rows("passkey", tok, lengths, depths, samples, 0)


@pytest.mark.parametrize("args,needle", [
    (["--lengths", "10"], "shorter than the shortest passkey prompt"),
    (["--lengths", ","], "--lengths names no length"),
    (["--lengths", "400", "--samples", "0"], "--samples must be a positive"),
    (["--lengths", "400", "--depths", ","], "--depths names no depth"),
    (["--lengths", "400", "--out", "/proc/x/y.jsonl"], "Cannot write --out '/proc/x/y.jsonl'"),
    (["--lengths", "400", "--out", "{tmp}"], "is a folder"),
])
def test_data_make_bad_requests_exit_2_and_write_nothing(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "p.jsonl")]
    r = cli("data", "make", "passkey", "--model", "tiny-llama", *args, *out)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_failed_write_is_one_sentence_and_leaves_nothing(tmp_path):
    from infllm_eval.commands.data import _write_rows

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="Cannot write --out"):
        _write_rows(tmp_path / "file" / "rows.jsonl", [{"id": 0}])
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("to,needle", [("/proc/x", "'/proc' is not a writable folder"),
                                       ("{tmp}/file", "is a file, not a folder")])
def test_data_download_to_an_unwritable_folder_is_refused_before_any_download(tmp_path, to, needle):
    (tmp_path / "file").write_text("x")
    r = cli("data", "download", "trec_e", "--to", to.replace("{tmp}", str(tmp_path)))
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
