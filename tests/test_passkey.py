"""Passkey task: exact token lengths, needle placement, keys, templates, validation, fingerprint.

Uses two tiny tokenizers trained here (no downloads): a GPT-2-style byte-level BPE that adds BOS, and a
SentencePiece-like Metaspace BPE whose first word gets a "▁" only at the start of a text (as Llama's does).
"""

from __future__ import annotations

import json
import random
import string
from typing import Any, Callable

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from infllm_eval.errors import UserError
from infllm_eval.tasks import load_definition, make_task
from infllm_eval.tasks.passkey import PasskeyTask

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n\n"
)


def _corpus() -> list[str]:
    rng = random.Random(0)
    keys = ["".join(str(rng.randint(0, 9)) for _ in range(5)) for _ in range(40)]
    needles = [f"The pass key is {k}. Remember it. {k} is the pass key.\n" for k in keys]
    return [INTRO + FILLER * 3, *needles, "\n\nWhat is the pass key? The pass key is", "<s>[INST] x [/INST]"]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return _wrap(tok)


def _metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Metaspace(prepend_scheme="first")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return _wrap(tok)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return _byte_level()


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def any_tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return _byte_level() if request.param == "byte_level" else _metaspace()


def identity(text: str) -> str:
    return text


def inst(text: str) -> str:
    """A Llama-2-style chat template whose text already starts with the BOS token."""
    return f"<s>[INST] {text} [/INST]"


def make(
    tok: Any,
    render: Callable[[str], str] = identity,
    *,
    answer_prefix: bool = False,
    seed: int = 0,
    **cfg: Any,
) -> PasskeyTask:
    task_cfg = {"name": "passkey", "definition": "passkey", "profile": "infllm", "lengths": [300],
                "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "samples": 1, "max_new_tokens": None}
    task_cfg.update(cfg)
    task = make_task(task_cfg, tok, render, answer_prefix=answer_prefix, seed=seed)
    assert isinstance(task, PasskeyTask)
    return task


def spec(length: int, depth: float, index: int = 0) -> dict:
    return {"sample_id": f"t-{length}-{depth}-{index}", "length": length, "depth": depth, "index": index}


# ---- exact lengths and placement ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [300, 1000, 4096])
def test_exact_length(any_tok: Any, length: int) -> None:
    task = make(any_tok, lengths=[length])
    for s in task.sample_specs():
        sample = task.build(s)
        assert sample.input_ids.dtype == torch.long and sample.input_ids.dim() == 1
        assert len(sample.input_ids) == length == sample.n_input_tokens == sample.length
        assert sample.sample_id == s["sample_id"]
        json.dumps(sample.meta)  # JSON-serializable


def test_exact_length_for_every_remainder(bpe: Any) -> None:
    """Lengths one apart cover every size of the partial noise line, at both ends of the depth range."""
    task = make(bpe, lengths=[400])
    for length in range(400, 440):
        for depth in (0.0, 0.5, 1.0):
            assert len(task.build(spec(length, depth)).input_ids) == length


def test_one_million_tokens(bpe: Any) -> None:
    """Exact length and needle placement at 1M tokens (its build time is measured by `infllm-eval bench`)."""
    target = 1_048_576
    task = make(bpe, lengths=[target], depths=[0.5])
    sample = task.build(task.sample_specs()[0])
    assert len(sample.input_ids) == target
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    needle = bpe.decode(sample.input_ids[at : at + n].tolist())
    key = sample.answers[0]
    assert needle == f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    assert abs(at / target - 0.5) < 0.001


def test_needle_moves_monotonically_with_depth(any_tok: Any) -> None:
    task = make(any_tok, lengths=[2000], depths=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    samples = [task.build(s) for s in task.sample_specs()]
    positions = [s.meta["needle_token_index"] for s in samples]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)

    head_len = len(task._pieces.head_ids)
    tail_len = len(task._pieces.tail_ids)
    first, last = samples[0], samples[-1]
    assert first.meta["needle_token_index"] == head_len  # depth 0: right after the instruction
    end_of_needle = last.meta["needle_token_index"] + last.meta["needle_n_tokens"]
    assert end_of_needle == 2000 - tail_len  # depth 1: right before the question


def test_answer_is_the_key_in_the_needle(any_tok: Any) -> None:
    task = make(any_tok, lengths=[1000])
    for s in task.sample_specs():
        sample = task.build(s)
        key = sample.meta["key"]
        assert sample.answers == [key] and len(key) == 5 and key.isdigit()
        at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
        needle = any_tok.decode(sample.input_ids[at : at + n].tolist())
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in needle
        assert any_tok.decode(sample.input_ids.tolist()).count(key) == 2


def test_decoded_prompt_retokenizes_to_about_the_target(any_tok: Any) -> None:
    """Pieces tokenized separately must match the text tokenized as a whole (within 1%)."""
    for depth in (0.0, 0.5, 1.0):
        task = make(any_tok, lengths=[3000])
        ids = task.build(spec(3000, depth)).input_ids.tolist()
        text = any_tok.decode(ids)
        again = any_tok.encode(text, add_special_tokens=False)
        assert abs(len(again) - 3000) <= 30, (depth, len(again))
        if depth < 1.0:  # seams next to whole lines tokenize exactly as in the full text
            assert again == ids
        assert "\n The grass" not in text  # lines tokenized mid-text, not as text starts ("▁The")


def test_no_partial_line_for_an_exact_fit(bpe: Any) -> None:
    task = make(bpe, lengths=[1000])
    sample = task.build(spec(1000, 0.5))
    assert 0 <= sample.meta["partial_line_tokens"] < len(task._pieces.noise_ids)


# ---- keys -----------------------------------------------------------------------------------------------


def test_same_seed_same_ids_other_seed_other_keys(bpe: Any) -> None:
    a, b = make(bpe, lengths=[500], samples=3, seed=1), make(bpe, lengths=[500], samples=3, seed=1)
    c = make(bpe, lengths=[500], samples=3, seed=2)
    built_a = [a.build(s) for s in a.sample_specs()]
    built_b = [b.build(s) for s in b.sample_specs()]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(built_a, built_b))
    keys_a = [s.answers[0] for s in built_a]
    keys_c = [c.build(s).answers[0] for s in c.sample_specs()]
    assert keys_a != keys_c
    assert len(set(keys_a)) > 1  # samples differ from each other too


def test_adding_lengths_keeps_other_keys(bpe: Any) -> None:
    small = make(bpe, lengths=[500])
    grown = make(bpe, lengths=[500, 800], depths=[0.0, 0.25, 0.5, 0.75, 1.0, 0.6])
    keys_small = {s["sample_id"]: small.build(s).answers[0] for s in small.sample_specs()}
    keys_grown = {s["sample_id"]: grown.build(s).answers[0] for s in grown.sample_specs()}
    assert all(keys_grown[k] == v for k, v in keys_small.items())


def test_key_recipe_is_documented_seed_string(bpe: Any) -> None:
    task = make(bpe, seed=7)
    rng = random.Random("7-300-0.5-0")
    assert task.key_for(300, 0.5, 0) == "".join(str(rng.randint(0, 9)) for _ in range(5))


# ---- templates and answer prefix ------------------------------------------------------------------------


def test_plain_prompt_gets_one_bos(any_tok: Any) -> None:
    ids = make(any_tok).build(spec(300, 0.5)).input_ids.tolist()
    bos = any_tok.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert any_tok.decode(ids, skip_special_tokens=True).startswith(INTRO)


def test_render_is_honoured_without_double_bos(any_tok: Any) -> None:
    task = make(any_tok, inst)
    ids = task.build(spec(600, 0.5)).input_ids.tolist()
    head = any_tok.encode(inst(INTRO + "X").split("X")[0], add_special_tokens=False)
    assert ids[: len(head)] == head
    assert ids[0] == any_tok.bos_token_id and ids.count(any_tok.bos_token_id) == 1
    text = any_tok.decode(ids)
    assert text.startswith("<s>[INST] There is an important info") and text.endswith("pass key? [/INST]")


def test_answer_prefix_only_when_asked(any_tok: Any) -> None:
    def prompt(task: PasskeyTask) -> str:
        return any_tok.decode(task.build(spec(300, 0.5)).input_ids.tolist())

    plain = prompt(make(any_tok))
    with_prefix = prompt(make(any_tok, answer_prefix=True))
    assert plain.endswith("\n\nWhat is the pass key?")
    assert with_prefix.endswith("\n\nWhat is the pass key? The pass key is")
    wrapped = prompt(make(any_tok, inst, answer_prefix=True))
    assert wrapped.endswith("What is the pass key? [/INST]The pass key is")  # prefix opens the answer turn


def test_profiles_set_max_new_tokens(bpe: Any) -> None:
    assert make(bpe).max_new_tokens == 32
    assert make(bpe, profile="official").max_new_tokens == 6
    assert make(bpe, profile=None).max_new_tokens == 32  # default profile: infllm
    assert make(bpe, max_new_tokens=10).max_new_tokens == 10
    assert make(bpe).metric == "first_int_match"


# ---- validation -----------------------------------------------------------------------------------------


def test_too_short_length(bpe: Any) -> None:
    with pytest.raises(UserError, match=r"task.lengths value 50 is too short for passkey: the prompt without "
                                        r"filler is already \d+ tokens\."):
        make(bpe, lengths=[50, 1000])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("depths", [0.5, 1.5], "task.depths"),
        ("depths", [-0.1], "task.depths"),
        ("depths", [], "task.depths"),
        ("depths", ["half"], "task.depths"),
        ("lengths", [0], "task.lengths"),
        ("lengths", [-5], "task.lengths"),
        ("lengths", [1000.5], "task.lengths"),
        ("lengths", None, "task.lengths"),
        ("samples", 0, "task.samples"),
        ("samples", True, "task.samples"),
        ("max_new_tokens", 0, "task.max_new_tokens"),
        ("profile", "offical", "Unknown task.profile 'offical'. Did you mean 'official'"),
        ("depths", [0.333, 0.334], "id 'passkey-L300-d0.33-0'"),
    ],
)
def test_bad_config_is_a_user_error(bpe: Any, key: str, value: Any, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make(bpe, **{key: value})


def test_unknown_definition(bpe: Any) -> None:
    with pytest.raises(UserError, match="task definition 'paskey'"):
        make(bpe, definition="paskey")


def test_sample_specs_grid(bpe: Any) -> None:
    task = make(bpe, lengths=[300, 600], depths=[0.0, 0.25, 0.5, 0.75, 1.0], samples=3)
    specs = task.sample_specs()
    assert len(specs) == 2 * 5 * 3
    assert len({s["sample_id"] for s in specs}) == len(specs)
    assert specs[0] == {"sample_id": "passkey-L300-d0.00-0", "length": 300, "depth": 0.0, "index": 0}
    assert specs[-1]["sample_id"] == "passkey-L600-d1.00-2"


# ---- fingerprint ----------------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive(bpe: Any) -> None:
    base = make(bpe).data_fingerprint()
    assert make(bpe).data_fingerprint() == base
    assert len(base) == 64

    changed = {
        "profile": make(bpe, profile="official").data_fingerprint(),
        "seed": make(bpe, seed=1).data_fingerprint(),
        "answer_prefix": make(bpe, answer_prefix=True).data_fingerprint(),
        "render": make(bpe, inst).data_fingerprint(),
        "tokenizer": make(_metaspace()).data_fingerprint(),
    }
    definition = load_definition("passkey")
    definition["profiles"]["infllm"]["template"] = "Find the key.\n\n{context}\n\n{input}"
    cfg = {"name": "passkey", "profile": "infllm", "lengths": [300], "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
           "samples": 1, "max_new_tokens": None}
    other_template = PasskeyTask(cfg, definition, bpe, identity, answer_prefix=False, seed=0)
    changed["template"] = other_template.data_fingerprint()
    for what, fp in changed.items():
        assert fp != base, what
    assert len(set(changed.values())) == len(changed)
    # the grid selects samples without changing them: a larger grid keeps the fingerprint (and so reuses results)
    assert make(bpe, lengths=[300, 600], depths=[0.5], samples=2).data_fingerprint() == base


@pytest.mark.parametrize("where,key", [
    ("definition", "key_digits"), ("definition", "key_duplications"), ("definition", "default_profile"),
    ("definition", "metric"), ("task", "samples"), ("task", "profile"), ("task", "name"),
])
def test_a_missing_setting_fails_loudly_instead_of_taking_a_default(bpe, where, key):
    """Defaults live in tasks/passkey.yaml (definition and run:), never in code."""
    definition = load_definition("passkey")
    cfg = {"name": "passkey", "profile": None, "lengths": [300], "depths": [0.5], "samples": 1, "max_new_tokens": None}
    PasskeyTask(cfg, definition, bpe, identity, answer_prefix=False, seed=0)  # complete: builds
    del (definition if where == "definition" else cfg)[key]
    with pytest.raises(KeyError, match=key):
        PasskeyTask(cfg, definition, bpe, identity, answer_prefix=False, seed=0)
