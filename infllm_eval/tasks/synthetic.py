"""Synthetic ∞-Bench retrieval data sized in the model's tokens: passkey, number_string, kv_retrieval.

The recipes are ∞-Bench's (OpenBMB/InfiniteBench `data/construct_synthetic_dataset.py`):

- passkey, number_string: the recipe is data, tasks/passkey.yaml and tasks/number_string.yaml (noise line `filler`,
  `needle`, `question`, `key_digits`, `key_duplications`; keys drawn by `passkey.draw_key`), the same the
  exact-length tasks of those names build from; context = noise*j + needle + noise*(N-j).
- kv_retrieval: "JSON data:\\n{" + '"<uuid>": "<uuid>", '... + "}" (UUID4 keys and values, as the lost-in-the-middle
  KV data), input '\\nKey: "<uuid>"\\nThe value associated with the specified key is: ', answer the value.

Where ∞-Bench fixes the number of noise lines / pairs for a 128K Llama-ish tokenizer, here a row of length L is
sized so that the task's InfLLM-profile prompt (no chat template; BOS included) is L tokens of the *given*
tokenizer: counts are computed from the pieces' token lengths, the prompt is tokenized to measure, and corrected
if it is off (passkey / number_string: exactly L in practice, a partial noise line fills the rest; kv_retrieval:
within half a key-value pair, since pairs are whole). Rows record the measurement (`n_tokens`) next to the target (`length`) and the needle
`depth`. Each row is seeded from `f"{seed}-{task}-{length}-{depth}-{index}"`, so adding lengths never changes
other rows. Rows use the benchmark's own schema (id, context, input, answer, options) and run with
`task=infbench_<task> task.data_dir=<folder>`.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from typing import Any

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.tasks.passkey import draw_key

KV_INPUT = '\nKey: "{key}"\nThe value associated with the specified key is: '
GENERATORS = ("passkey", "number_string", "kv_retrieval")
MAX_LENGTH = 1_048_576


def make_rows(
    task: str, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int
) -> list[dict]:
    """Rows for every (length, depth, index), lengths outermost, in ∞-Bench's jsonl schema."""
    check_request(task, lengths, depths, samples)
    from infllm_eval.tasks import load_definition

    template = load_definition(f"infbench_{task}")["profiles"]["infllm"]["template"]
    sizer = _Sizer(tokenizer, template)
    recipe = None if task == "kv_retrieval" else load_definition(task)  # tasks/passkey.yaml, number_string.yaml
    shortest = _shortest_prompt(recipe, sizer, seed)
    if min(lengths) < shortest:
        raise UserError(f"--lengths {min(lengths)} is shorter than the shortest {task} prompt this tokenizer gives "
                        f"({shortest} tokens: template, question and needle alone); use lengths >= {shortest}.")
    rows = []
    for length in lengths:
        for depth in depths:
            for index in range(samples):
                rng = random.Random(f"{seed}-{task}-{int(length)}-{float(depth)}-{index}")
                if recipe is None:
                    row = _kv_row(sizer, int(length), float(depth), rng)
                else:
                    row = _needle_row(recipe, sizer, int(length), float(depth), rng)
                rows.append({"id": len(rows), **row, "options": [], "length": int(length), "depth": float(depth)})
    return rows


def check_request(task: str, lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    """Everything about a request that needs no tokenizer: the generator, lengths, depths and samples."""
    if task not in GENERATORS:
        raise unknown_name("synthetic task", task, list(GENERATORS))
    if not lengths:
        raise UserError("--lengths names no length; give comma-separated prompt lengths, e.g. 4096,131072.")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= MAX_LENGTH:
            raise UserError(f"--lengths values must be integers in 1..{MAX_LENGTH}; got {length!r}.")
    if not depths:
        raise UserError("--depths names no depth; give comma-separated depths in [0, 1], e.g. 0,0.5,1.")
    for depth in depths:
        if not 0 <= float(depth) <= 1:
            raise UserError(f"--depths values must be within [0, 1]; got {depth!r}.")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"--samples must be a positive number of rows per length and depth; got {samples!r}.")


def _shortest_prompt(recipe: dict | None, sizer: "_Sizer", seed: int) -> int:
    """Tokens of the shortest prompt the template gives: no noise (needle tasks) or one key-value pair, the most
    over a few keys (keys tokenize to different lengths; each row is checked again as it is built)."""
    rng = random.Random(f"{seed}-shortest")
    if recipe is None:
        key, value = _uuid(rng), _uuid(rng)
        context = "JSON data:\n{" + f'"{key}": "{value}"' + "}"
        return sizer.prompt_tokens(context, KV_INPUT.format(key=key), key=f'"{key}"')
    keys = [draw_key(rng, int(recipe["key_digits"]), int(recipe["key_duplications"])) for _ in range(16)]
    return max(sizer.prompt_tokens(recipe["needle"].format(key=key), recipe["question"]) for key in keys)


class _Sizer:
    """Token counts of prompt pieces with one tokenizer (the prompt is the task's InfLLM template, no chat)."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tok = tokenizer
        self.template = template

    def ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special))

    def prompt_tokens(self, context: str, inp: str, key: str = "") -> int:
        return len(self.ids(self.template.format(context=context, input=inp, key=key), special=True))

    def after(self, left: str, piece: str) -> int:
        """Tokens `piece` adds when it follows `left` (seams merge differently than pieces on their own)."""
        return len(self.ids(left + piece)) - len(self.ids(left))


def _needle_row(recipe: dict, sizer: _Sizer, length: int, depth: float, rng: random.Random) -> dict:
    noise, question = recipe["filler"], recipe["question"]
    key = draw_key(rng, int(recipe["key_digits"]), int(recipe["key_duplications"]))
    needle = recipe["needle"].format(key=key)
    noise_ids = sizer.ids(noise + noise)[len(sizer.ids(noise)) :]  # a noise line as it tokenizes mid-text
    fixed = sizer.prompt_tokens("", question) + sizer.after(noise, needle)

    def build(budget: int) -> tuple[str, int]:
        n_lines, rest = divmod(max(budget, 0), len(noise_ids))
        j = round(depth * n_lines)
        partial = sizer.tok.decode(noise_ids[:rest]) if rest else ""
        return noise * j + needle + noise * (n_lines - j) + partial, len(noise_ids) * (n_lines - j) + rest

    budget = length - fixed
    context, after = build(budget)
    measured = sizer.prompt_tokens(context, question)
    if measured != length:  # one correction: seams at the template and the partial line
        budget += length - measured
        context, after = build(budget)
        measured = sizer.prompt_tokens(context, question)
    if measured > length and budget <= 0:  # this key's needle alone is longer than the row may be
        raise UserError(f"--lengths {length} is shorter than this needle's prompt with no filler ({measured} tokens "
                        "with this tokenizer); use longer lengths.")
    return {"context": context, "input": question, "answer": [key], "len": after, "n_tokens": measured}


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_row(sizer: _Sizer, length: int, depth: float, rng: random.Random) -> dict:
    probe_key = _uuid(rng)
    fixed = sizer.prompt_tokens("JSON data:\n{}", KV_INPUT.format(key=probe_key), key=f'"{probe_key}"')
    per_pair = max(1, sizer.after('"a": "b", ', f'"{probe_key}": "{_uuid(rng)}", '))
    pairs: list[tuple[str, str]] = []

    def build(n_pairs: int) -> tuple[str, str, str]:
        while len(pairs) < n_pairs:
            pairs.append((_uuid(rng), _uuid(rng)))
        used = pairs[: max(n_pairs, 1)]
        key, value = used[round(depth * (len(used) - 1))]
        context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in used) + "}"
        return context, key, value

    n_pairs = max(1, (length - fixed) // per_pair)
    for _ in range(3):  # corrections with the measured tokens per pair; a pair is the unit (~50-80 tokens)
        context, key, value = build(n_pairs)
        measured = sizer.prompt_tokens(context, KV_INPUT.format(key=key), key=f'"{key}"')
        per_pair = max(measured - fixed, 1) / n_pairs
        if abs(measured - length) <= per_pair / 2:
            break
        n_pairs = max(1, round((length - fixed) / per_pair))
    return {"context": context, "input": KV_INPUT.format(key=key), "answer": [value], "n_tokens": measured}


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer of a model config (conf/model/*.yaml) without loading weights where possible
    (`models.load_tokenizer`, which the runner's checks use too)."""
    from infllm_eval.models import load_tokenizer as model_tokenizer

    return model_tokenizer(model_cfg)
