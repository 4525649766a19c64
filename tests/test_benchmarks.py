"""∞-Bench and LongBench as tasks: every definition builds from its fixture, the config contract, the benchmark
facts the definitions carry (templates, lengths, chat rules), truncation policies, and one end-to-end run.

Fixtures (tasks/fixtures/) are a few short rows per task in the benchmarks' real schemas; no test touches the
network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from infllm_eval.config import compose, group_options
from infllm_eval.errors import UserError
from infllm_eval.models import tiny_tokenizer
from infllm_eval.paths import tasks_dir
from infllm_eval.tasks import definition_names, load_definition, make_task
from infllm_eval.tasks.base import SampleSkipped
from infllm_eval.tasks.truncation import truncate

FIXTURES = tasks_dir() / "fixtures"
INFBENCH = ["passkey", "number_string", "kv_retrieval", "longbook_sum_eng", "longbook_choice_eng", "longbook_qa_eng",
            "longbook_qa_chn", "longdialogue_qa_eng", "math_find", "math_calc", "code_run", "code_debug"]
LONGBENCH = ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
             "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
             "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p"]
LONGBENCH_E = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
               "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]
TASKS = ([f"infbench_{t}" for t in INFBENCH] + [f"longbench_{d}" for d in LONGBENCH]
         + [f"longbench_{d}_e" for d in LONGBENCH_E])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(512)


def fixture_dir(name: str) -> str:
    return str(FIXTURES / ("infbench" if name.startswith("infbench_") else "longbench"))


def build_task(name: str, tok, render=lambda s: s, answer_prefix=False, **cfg):
    task_cfg = {"name": name, "definition": name, "profile": "infllm", "data_dir": fixture_dir(name), "limit": None,
                "truncation": "none", "max_length": None, "max_new_tokens": None, **cfg}
    return make_task(task_cfg, tok, render, answer_prefix=answer_prefix, seed=0)


def fixture_rows(name: str) -> list[dict]:
    dataset = load_definition(name)["dataset"]
    lines = (Path(fixture_dir(name)) / f"{dataset}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# -- every task, from its fixture ---------------------------------------------------------------------------------
def test_all_33_tasks_and_13_longbench_e_variants_are_defined():
    names = set(definition_names())
    assert set(TASKS) <= names and len(TASKS) == 46
    assert not any(n.startswith("_") for n in names)  # shared bases are not tasks


@pytest.mark.parametrize("profile", ["infllm", "official"])
@pytest.mark.parametrize("name", TASKS)
def test_every_task_builds_every_fixture_row(name, profile, tok):
    task = build_task(name, tok, profile=profile)
    definition = load_definition(name)
    rows = fixture_rows(name)
    specs = task.sample_specs()
    assert len(specs) == len(rows) and len({s["sample_id"] for s in specs}) == len(rows)
    assert task.max_new_tokens == definition["profiles"][profile]["max_new_tokens"]
    assert task.metric == f"{definition['benchmark']}_{definition['dataset'].removesuffix('_e')}"
    for spec, row in zip(specs, rows):
        sample = task.build(spec)
        ids = sample.input_ids
        assert ids.dim() == 1 and sample.n_input_tokens == ids.numel() > 0
        assert ids[0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum().item() == 1
        assert not sample.truncated and sample.n_dropped == 0
        text = tok.decode(ids, skip_special_tokens=True)
        context = row.get("context", row.get("content"))
        assert context.strip()[:40] in text
        assert sample.answers and all(isinstance(a, str) for a in sample.answers)
        raw = row["answer" if name.startswith("infbench_") else "answers"]
        assert len(sample.answers) == (len(raw) if isinstance(raw, list) else 1)
        expected_fields = {f: row[f] for f in definition.get("score_fields") or []}
        assert sample.score_fields == expected_fields


def test_score_fields_are_all_classes_and_options(tok):
    trec = build_task("longbench_trec", tok)
    assert trec.build(trec.sample_specs()[0]).score_fields["all_classes"][:2] == ["Abbreviation", "Entity"]
    for name in ("infbench_longbook_choice_eng", "infbench_code_debug"):
        task = build_task(name, tok)
        sample = task.build(task.sample_specs()[0])
        assert len(sample.score_fields["options"]) == 4 and sample.answers[0] in sample.score_fields["options"]
    passkey = build_task("infbench_passkey", tok)
    assert passkey.build(passkey.sample_specs()[0]).score_fields == {}


def test_numeric_answers_become_strings(tok):
    calc = build_task("infbench_math_calc", tok)
    sample = calc.build(calc.sample_specs()[0])
    assert sample.answers == [str(v) for v in fixture_rows("infbench_math_calc")[0]["answer"]]
    run = build_task("infbench_code_run", tok)
    assert run.build(run.sample_specs()[1]).answers == ["-7"]


def test_recipes_fill_key_function_question_options_prefix(tok):
    def prompt(name, profile="infllm", i=0):
        task = build_task(name, tok, profile=profile)
        return tok.decode(task.build(task.sample_specs()[i]).input_ids, skip_special_tokens=True)

    key = fixture_rows("infbench_kv_retrieval")[0]["input"][6:44]
    assert prompt("infbench_kv_retrieval").startswith(f"Extract the value corresponding to the specified key {key} in")
    assert prompt("infbench_kv_retrieval", "official").startswith("Extract the value corresponding to the specified key in")
    assert "There is a function called named func_1.\n" in prompt("infbench_code_run")
    assert "the return value of func_1(5). Be concise." in prompt("infbench_code_run")
    assert "Question: Who gave Mary bread?\n" in prompt("infbench_longbook_choice_eng")
    assert "\nA. Tom\nB. Mary\nC. The river\nD. The war" in prompt("infbench_longbook_choice_eng")
    assert prompt("infbench_math_find").startswith("What is the largest number in the following list?\n\n[")
    assert prompt("infbench_math_find", "official", 2).startswith("What is the median number in the following list?")
    assert "问题：磨坊主叫什么名字？\n请尽量简短地回答。" in prompt("infbench_longbook_qa_chn")


# -- the config contract -------------------------------------------------------------------------------------------
CONF_TASKS = sorted(group_options("task"))  # what `task=` accepts: the run configs generated from tasks/*.yaml


@pytest.mark.parametrize("name", CONF_TASKS)
def test_every_task_config_composes_and_names_its_definition(name):
    cfg = compose([f"task={name}", "model=tiny-llama"])
    assert cfg.task.name == name and cfg.task.description
    definition = load_definition(cfg.task.get("definition") or name)
    if definition["builder"] == "benchmark":
        assert cfg.task.profile in definition["profiles"] and cfg.task.truncation == "none"
        assert cfg.task.max_length == cfg.model.max_context and cfg.task.data_dir is None
        assert definition["metric"].startswith(("infbench_", "longbench_"))
        assert set(definition["profiles"]) == {"infllm", "official"}


def test_every_benchmark_task_has_a_run_config():
    assert set(TASKS) <= set(CONF_TASKS)


#: the run config of every benchmark task and of passkey / number_string (the bodies conf/task/*.yaml held)
BENCHMARK_RUN = {"profile": "infllm", "data_dir": None, "limit": None, "truncation": "none",
                 "max_length": "${model.max_context}", "max_new_tokens": None}
SYNTHETIC_RUN = {"profile": "infllm", "lengths": [2048, 4096], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "samples": 1,
                 "max_new_tokens": None}


@pytest.mark.parametrize("name", CONF_TASKS)
def test_the_run_config_is_generated_from_the_task_file(name):
    from omegaconf import OmegaConf

    from infllm_eval.tasks.hydra_group import run_node

    node = run_node(name)
    body = SYNTHETIC_RUN if name in ("passkey", "number_string") else BENCHMARK_RUN
    assert list(node.items()) == [("name", name), ("description", node["description"]), ("definition", name),
                                  *body.items()]  # keys, values and their order
    task = compose([f"task={name}", "model=tiny-llama"]).task
    assert list(task) == list(node) and OmegaConf.to_container(task) == node
    assert group_options("task")[name] == node["description"]


def test_definitions_leave_out_the_task_file_keys():
    """`description` and `run` describe the task to the CLI and Hydra; the benchmark fingerprint hashes the whole
    definition, so they stay out of it (finished runs keep their content keys)."""
    for name in definition_names():
        assert not {"description", "run", "include"} & set(load_definition(name)), name


@pytest.mark.parametrize("key", ["chat_template", "head_tail_init_tokens", "default_profile", "metric"])
def test_a_missing_definition_key_fails_loudly_instead_of_taking_a_default(tok, key, monkeypatch):
    """Defaults live in the task files (`_longbench.yaml`, `_infbench.yaml`), never in code."""
    from infllm_eval import tasks

    definition = load_definition("longbench_trec")
    del definition[key]
    monkeypatch.setattr(tasks, "load_definition", lambda name: definition)
    with pytest.raises(KeyError, match=key):
        build_task("longbench_trec", tok, profile=None)


@pytest.mark.parametrize("key", ["profile", "truncation", "limit", "data_dir", "max_new_tokens"])
def test_a_missing_run_key_fails_loudly(tok, key):
    cfg = {"name": "longbench_trec", "definition": "longbench_trec", "profile": "infllm",
           "data_dir": fixture_dir("longbench_trec"), "limit": None, "truncation": "none", "max_length": None,
           "max_new_tokens": None}
    make_task(cfg, tok, lambda s: s, answer_prefix=False, seed=0)  # complete: builds
    del cfg[key]
    with pytest.raises(KeyError, match=key):
        make_task(cfg, tok, lambda s: s, answer_prefix=False, seed=0)


TREC_FINGERPRINT = "16199a5e7746cabb08ba657f4c88541a7f4cf1230a37a34e80b98535fa93331e"
KV_FINGERPRINT = "c0591b4807d6d4bfdf14b465cbc37b450be1528a2f46861b328196489b55e8d0"


def test_fingerprints_of_finished_runs_are_unchanged(tok):
    """Content keys computed before the task files held their run configs (results resume)."""
    assert build_task("longbench_trec", tok).data_fingerprint() == TREC_FINGERPRINT
    assert build_task("infbench_kv_retrieval", tok, profile="official").data_fingerprint() == KV_FINGERPRINT


def test_a_plugin_folder_task_file_is_a_task(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "my_trec.yaml").write_text('description: "TREC, my way"\ninclude: longbench_trec.yaml\nrun: {limit: 2}\n')
    (folder / "_my_base.yaml").write_text("run: {limit: 3}\n")
    monkeypatch.setenv("INFLLM_EVAL_PATH", str(tmp_path))
    task = compose(["task=my_trec", "model=tiny-llama"]).task
    assert (task.name, task.definition, task.description, task.limit) == ("my_trec", "my_trec", "TREC, my way", 2)
    assert task.truncation == "none" and load_definition("my_trec") == load_definition("longbench_trec")
    assert "my_trec" in group_options("task") and "_my_base" not in group_options("task")
    with pytest.raises(UserError, match="Did you mean 'my_trec'"):
        compose(["task=my_trek"])
    (folder / "longbench_trec.yaml").write_text('description: "again"\ninclude: longbench_trec.yaml\n')
    with pytest.raises(UserError, match="task 'longbench_trec' is defined twice"):
        compose(["task=longbench_trec"])


def test_a_task_file_without_run_or_description_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "no_run.yaml").write_text('description: "no run"\nbuilder: benchmark\n')
    monkeypatch.setenv("INFLLM_EVAL_PATH", str(tmp_path))
    with pytest.raises(UserError, match="Task 'no_run' has no 'run:' section"):
        group_options("task")
    (folder / "no_run.yaml").write_text("include: longbench_trec.yaml\n")
    with pytest.raises(UserError, match="Task 'no_run' has no 'description:'"):
        group_options("task")


@pytest.mark.parametrize("override,needle", [
    ("task.truncation=sideways", "task.truncation"),
    ("task.profile=mine", "task.profile"),
    ("task.max_length=0", "task.max_length"),
    ("task.limit=-1", "task.limit"),
])
def test_bad_task_values_are_one_sentence(override, needle):
    with pytest.raises(UserError, match=needle):
        compose(["task=longbench_trec", override])


def test_truncation_without_max_length_is_refused():
    with pytest.raises(UserError, match="needs task.max_length"):
        compose(["task=longbench_trec", "task.truncation=middle", "task.max_length=null"])


def test_unknown_task_name_suggests_the_closest():
    with pytest.raises(UserError, match="Did you mean 'infbench_kv_retrieval'"):
        compose(["task=infbench_kv_retreival"])


def test_suite_scripts_name_existing_tasks():
    text = "".join((Path(__file__).parent.parent / "runners" / f).read_text() for f in ("infbench.sh", "longbench.sh"))
    named = {t for line in text.splitlines() if "=" in line and "_" in line and not line.startswith("#")
             for t in line.split("=", 1)[1].replace("$PAPER,", "").replace("$PAPER", "").split(",")
             if t.startswith(("infbench_", "longbench_"))}
    assert len(named) == 12 + 21 + 13 and named <= set(CONF_TASKS)


# -- benchmark facts in the definitions ------------------------------------------------------------------------------
def test_generation_lengths_of_both_profiles():
    infllm = {"passkey": 32, "number_string": 32, "kv_retrieval": 100, "longbook_qa_eng": 32,
              "longbook_choice_eng": 32, "longbook_sum_eng": 1536, "longbook_qa_chn": 32, "math_find": 32,
              "math_calc": 64000, "code_run": 32, "code_debug": 32, "longdialogue_qa_eng": 32}
    official = {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_sum_eng": 1200,
                "longbook_choice_eng": 40, "longbook_qa_eng": 40, "longbook_qa_chn": 40, "longdialogue_qa_eng": 40,
                "math_find": 3, "math_calc": 30000, "code_run": 5, "code_debug": 5}
    for t in INFBENCH:
        profiles = load_definition(f"infbench_{t}")["profiles"]
        assert (profiles["infllm"]["max_new_tokens"], profiles["official"]["max_new_tokens"]) == (infllm[t], official[t])
    lb = {"narrativeqa": 128, "qasper": 128, "gov_report": 512, "trec": 64, "triviaqa": 32, "lcc": 64, "samsum": 128}
    for d, n in lb.items():
        assert {p["max_new_tokens"] for p in load_definition(f"longbench_{d}")["profiles"].values()} == {n}


def test_chat_template_rule_and_samsum_stop():
    no_chat = {d for d in LONGBENCH if load_definition(f"longbench_{d}").get("chat_template") is False}
    assert no_chat == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert all(load_definition(f"infbench_{t}")["chat_template"] for t in INFBENCH)
    assert load_definition("longbench_samsum")["extra_stop"] == ["\n"]
    assert load_definition("longbench_samsum_e")["extra_stop"] == ["\n"]  # inherited


def test_profiles_differ_where_the_sources_do():
    nqa = load_definition("longbench_narrativeqa")["profiles"]
    assert nqa["infllm"]["template"].count("asconcisely") == 2 and "asconcisely" not in nqa["official"]["template"]
    qa = load_definition("infbench_longbook_qa_eng")["profiles"]
    assert qa["infllm"]["template"].endswith("Please answer as short as possible. The answer is:")
    assert qa["official"]["template"].endswith("Be very concise.")
    assert load_definition("longbench_lcc")["profiles"]["infllm"]["template"] == (
        "Please complete the code given below. \n{context}Next line of code:\n")


def test_longbench_e_inherits_and_buckets_by_length(tok):
    base, e = load_definition("longbench_qasper"), load_definition("longbench_qasper_e")
    assert e["profiles"] == base["profiles"] and e["metric"] == base["metric"] and e["dataset"] == "qasper_e"
    task = build_task("longbench_qasper_e", tok)
    assert [s["length"] for s in task.sample_specs()] == [0, 4000, 8000]  # fixture lengths 1500, 5200, 9100
    assert {s["length"] for s in build_task("longbench_qasper", tok).sample_specs()} == {0}


def test_chat_template_applied_only_where_the_rule_says(tok):
    def render(text):
        return f"<|user|>\n{text}</s>\n<|assistant|>\n"

    for name, wrapped in (("longbench_qasper", True), ("longbench_trec", False), ("infbench_passkey", True)):
        task = build_task(name, tok, render=render)
        text = tok.decode(task.build(task.sample_specs()[0]).input_ids, skip_special_tokens=True)
        assert text.startswith("<|user|>") is wrapped and text.endswith("<|assistant|>\n") is wrapped


def test_answer_prefix_only_for_models_that_ask(tok):
    def prompt(**kw):
        task = build_task("infbench_passkey", tok, **kw)
        return tok.decode(task.build(task.sample_specs()[0]).input_ids, skip_special_tokens=True)

    assert prompt(answer_prefix=True).endswith("What is the pass key? The pass key is")
    assert prompt(answer_prefix=False).endswith("What is the pass key?")
    choice = build_task("infbench_longbook_choice_eng", tok, answer_prefix=True)
    text = tok.decode(choice.build(choice.sample_specs()[0]).input_ids, skip_special_tokens=True)
    assert text.endswith("D. The war\n\nThe letter of the correct answer is")
    chat = build_task("infbench_longbook_choice_eng", tok, answer_prefix=True, render=lambda t: f"[U]{t}[/U]\n")
    text = tok.decode(chat.build(chat.sample_specs()[0]).input_ids, skip_special_tokens=True)
    assert text.endswith("D. The war[/U]\nThe letter of the correct answer is")
    assert build_task("longbench_qasper", tok, answer_prefix=True).answer_prefix == ""  # templates end in "Answer:"


def test_fingerprint_changes_with_profile_truncation_and_data(tok, tmp_path):
    base = build_task("infbench_passkey", tok).data_fingerprint()
    assert build_task("infbench_passkey", tok).data_fingerprint() == base
    assert build_task("infbench_passkey", tok, profile="official").data_fingerprint() != base
    assert build_task("infbench_passkey", tok, truncation="middle", max_length=500).data_fingerprint() != base
    assert build_task("infbench_passkey", tok, limit=1).data_fingerprint() == base  # picks rows, changes none
    rows = fixture_rows("infbench_passkey")
    rows[0]["answer"] = ["99999"]
    (tmp_path / "passkey.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert build_task("infbench_passkey", tok, data_dir=str(tmp_path)).data_fingerprint() != base


# -- truncation ------------------------------------------------------------------------------------------------------
IDS = list(range(100))  # context = ids[10:90]


def test_truncate_middle_keeps_halves_of_the_context_budget():
    kept, dropped = truncate(IDS, (10, 90), "middle", 61, 128)
    assert len(kept) == 61 and dropped == 39
    # 80 context tokens, 41 fit: first 20 and last 21 of the context, instruction and question untouched
    assert kept == IDS[:10] + IDS[10:30] + IDS[69:90] + IDS[90:]


def test_truncate_head_tail_keeps_first_128_and_the_tail():
    ids = list(range(1000))
    kept, dropped = truncate(ids, (50, 990), "head_tail", 300, 128)
    assert kept == ids[:128] + ids[-172:] and dropped == 700


def test_truncate_none_fits_and_skip():
    assert truncate(IDS, (10, 90), "none", 50, 128) == (IDS, 0)
    assert truncate(IDS, (10, 90), "middle", 100, 128) == (IDS, 0)  # fits exactly: nothing cut
    with pytest.raises(SampleSkipped):
        truncate(IDS, (10, 90), "skip", 99, 128)
    with pytest.raises(ValueError, match="without its context"):
        truncate(IDS, (10, 90), "middle", 15, 128)


@pytest.mark.parametrize("policy", ["middle", "head_tail"])
def test_truncated_prompt_fits_the_window_exactly(policy, tok):
    full = build_task("longbench_gov_report", tok)
    spec = full.sample_specs()[2]
    original = full.build(spec).input_ids.tolist()
    task = build_task("longbench_gov_report", tok, truncation=policy, max_length=1000, max_new_tokens=500)
    sample = task.build(spec)
    ids = sample.input_ids.tolist()
    assert len(original) > 500 and sample.n_input_tokens == len(ids) == 500
    assert sample.truncated and sample.n_dropped == len(original) - 500
    if policy == "head_tail":
        assert ids[:128] == original[:128] and ids[128:] == original[-372:]
    else:  # instruction and question kept whole
        head = tok.encode("You are given a report by a government agency. Write a one-page summary of the report."
                          "\n\nReport:\n")
        assert ids[: len(head) - 1] == original[: len(head) - 1] and ids[-15:] == original[-15:]
        assert tok.decode(ids).endswith("Now, write a one-page summary of the report.\n\nSummary:")


def test_skip_raises_for_long_prompts_only(tok):
    task = build_task("longbench_gov_report", tok, truncation="skip", max_length=700, max_new_tokens=100)
    lengths = [build_task("longbench_gov_report", tok).build(s).n_input_tokens for s in task.sample_specs()]
    for spec, n in zip(task.sample_specs(), lengths):
        if n <= 600:
            assert task.build(spec).n_input_tokens == n
        else:
            with pytest.raises(SampleSkipped, match="over the budget of 600"):
                task.build(spec)
    assert min(lengths) <= 600 < max(lengths)


# -- bad data ---------------------------------------------------------------------------------------------------------
def write_rows(folder: Path, name: str, rows: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_malformed_jsonl_line_names_file_and_line(tok, tmp_path):
    rows = [json.dumps(r) for r in fixture_rows("infbench_passkey")]
    write_rows(tmp_path, "passkey", [rows[0], '{"context": "x", "input": ', rows[1]])
    with pytest.raises(UserError, match=r"passkey\.jsonl line 2 is not valid JSON"):
        build_task("infbench_passkey", tok, data_dir=str(tmp_path))


def test_missing_field_names_file_line_and_field(tok, tmp_path):
    rows = fixture_rows("longbench_trec")
    del rows[2]["answers"]
    write_rows(tmp_path, "trec", rows)
    with pytest.raises(UserError, match=r"trec\.jsonl line 3: field 'answers' is missing"):
        build_task("longbench_trec", tok, data_dir=str(tmp_path))


def test_wrong_schema_file_is_refused(tok, tmp_path):
    write_rows(tmp_path, "kv_retrieval", fixture_rows("longbench_trec"))  # a LongBench file as ∞-Bench data
    with pytest.raises(UserError, match=r"kv_retrieval\.jsonl line 1: field 'answer' is missing"):
        build_task("infbench_kv_retrieval", tok, data_dir=str(tmp_path))


def test_row_a_recipe_cannot_read_is_refused(tok, tmp_path):
    rows = fixture_rows("infbench_code_run")
    rows[1]["input"] = "What does the code return?"
    write_rows(tmp_path, "code_run", rows)
    with pytest.raises(UserError, match=r"code_run\.jsonl line 2: field 'input' has no call like func_12"):
        build_task("infbench_code_run", tok, data_dir=str(tmp_path))
    rows = fixture_rows("infbench_code_debug")
    rows[0]["options"] = ["a", "b"]
    write_rows(tmp_path, "code_debug", rows)
    with pytest.raises(UserError, match=r"code_debug\.jsonl line 1: field 'options' must be a list of 4"):
        build_task("infbench_code_debug", tok, data_dir=str(tmp_path))


def test_data_dir_without_the_file(tok, tmp_path):
    with pytest.raises(UserError, match=r"has no number_string\.jsonl; put the benchmark's number_string\.jsonl"):
        build_task("infbench_number_string", tok, data_dir=str(tmp_path))


def test_offline_and_not_cached_names_the_file_and_data_dir(tok, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"data download passkey.*passkey\.jsonl in a folder and set task\.data_dir"):
        build_task("infbench_passkey", tok, data_dir=None)
    with pytest.raises(UserError, match=r"data\.zip of the dataset THUDM/LongBench.*trec_e\.jsonl"):
        build_task("longbench_trec_e", tok, data_dir=None)


def test_limit_takes_the_first_rows(tok):
    task = build_task("longbench_hotpotqa", tok, limit=2)
    assert [s["index"] for s in task.sample_specs()] == [0, 1]


# -- end to end ---------------------------------------------------------------------------------------------------------
def test_run_cell_on_fixture_tasks(tmp_path):
    from infllm_eval.runner import run_cell, run_dir_of

    for task, extra in (("infbench_longbook_choice_eng", []),
                        ("longbench_trec", ["task.truncation=middle", "task.max_length=300"])):
        cfg = compose(["model=tiny-llama", "method=full", f"task={task}", f"task.data_dir={fixture_dir(task)}",
                       "task.limit=2", "progress=false", f"output_dir={tmp_path}", *extra])
        summary = run_cell(cfg)
        records = [json.loads(x) for x in (run_dir_of(cfg) / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 2 and all(r["status"] == "ok" for r in records), records
        assert all(0.0 <= r["score"] <= 1.0 and r["answers"] and r["prediction"] is not None for r in records)
        assert int(summary["n"].sum()) == 2 and int(summary["n_ok"].sum()) == 2
        if task == "longbench_trec":
            assert all(r["truncated"] and r["n_input_tokens"] == 300 - 64 for r in records)
            assert records[0]["score_fields"]["all_classes"][-1] == "Numeric"
        else:
            assert not any(r["truncated"] for r in records) and records[0]["score_fields"]["options"][0] == "Tom"
