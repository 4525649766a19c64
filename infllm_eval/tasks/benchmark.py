"""∞-Bench and LongBench tasks: one prompt per row of the benchmark's own jsonl file.

Everything a task is lives in its definition yaml (tasks/infbench_*.yaml, tasks/longbench_*.yaml): the dataset
file, the prompt template and max new tokens of each profile (`infllm`: InfLLM's benchmark/config/*.json;
`official`: the benchmark's own), the metric, the chat-template rule, extra stop strings and an answer prefix.
Python only does what needs code, as named `recipes` that add template fields from a row, as InfLLM's
`load_infinite_bench` does:

- `question`: {question} = the row's `input`;
- `options`: {OPTION_A}..{OPTION_D} = `options[0..3]`;
- `kv_key`: {key} = `input[6:44]`, the quoted UUID of "\\nKey: \\"<uuid>\\"..." (InfLLM's kv_retrieval prompt);
- `code_run`: {func_call} = the first `func_<n>(<x>)` in `input`, {func} = its name;
- `math_find`: {prefix} = "What is <target> in the following list?", <target> found by the profile's regex
  (InfLLM: `The .+ of` minus the trailing "of"; ∞-Bench: `The \\w+ number`).

Building a sample: the template is filled with a placeholder for the context, passed through the model's chat
template (unless the task's rule says no, as LongBench's pred.py for trec/triviaqa/samsum/lsht/lcc/repobench-p),
the answer prefix is appended when the model config asks for it, the context goes in and the text is tokenized
once (BOS added unless the rendered text starts with it). The run's truncation policy then cuts the ids
(infllm_eval/tasks/truncation.py), so `n_input_tokens` is what the model really reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import torch

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.tasks import TASK_BUILDERS, data
from infllm_eval.tasks.base import Render, Sample, max_new_tokens, pick_profile
from infllm_eval.tasks.truncation import check_policy, truncate

#: Bump when prompts or ids are assembled differently, so old results no longer match the fingerprint.
RECIPE_VERSION = 1

#: Stand-in for the context while the prompt skeleton goes through the chat template.
CONTEXT_PLACEHOLDER = "<<<INFLLM_EVAL_CONTEXT>>>"

_FUNC_CALL = re.compile(r"func_[0-9]+\(\-?[0-9]+\)")


def _question(row: dict, inst: dict, profile: dict) -> None:
    inst["question"] = row["input"]


def _options(row: dict, inst: dict, profile: dict) -> None:
    options = row.get("options")
    if not isinstance(options, list) or len(options) < 4:
        raise ValueError("options", "must be a list of 4 options")
    inst.update({f"OPTION_{letter}": options[i] for i, letter in enumerate("ABCD")})


def _kv_key(row: dict, inst: dict, profile: dict) -> None:
    text = row["input"]
    if len(text) < 44 or text[6] != '"' or text[43] != '"':
        raise ValueError("input", 'must start with \\nKey: "<36-character key>" (∞-Bench kv_retrieval)')
    inst["key"] = text[6:44]


def _code_run(row: dict, inst: dict, profile: dict) -> None:
    found = _FUNC_CALL.findall(row["input"])
    if not found:
        raise ValueError("input", "has no call like func_12(-3) (∞-Bench code_run)")
    inst["func_call"] = found[0]
    inst["func"] = found[0].split("(")[0]


def _math_find(row: dict, inst: dict, profile: dict) -> None:
    rule = profile["math_find"]
    found = re.findall(rule["pattern"], row["input"])
    if not found:
        raise ValueError("input", f"does not match {rule['pattern']!r} (∞-Bench math_find)")
    target = found[0].lower()
    target = target[: len(target) - int(rule["cut"])]
    inst["prefix"] = rule["prefix"].format(target=target)


RECIPES: dict[str, Callable[[dict, dict, dict], None]] = {
    "question": _question,
    "options": _options,
    "kv_key": _kv_key,
    "code_run": _code_run,
    "math_find": _math_find,
}


@TASK_BUILDERS.register("benchmark")
class BenchmarkTask:
    """One ∞-Bench or LongBench task (see the module docstring)."""

    def __init__(
        self, task_cfg: dict, definition: dict, tokenizer: Any, render: Render, *, answer_prefix: bool, seed: int
    ) -> None:
        self.name: str = str(task_cfg["name"])
        self.definition = definition
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.metric: str = definition["metric"]
        self.profile, profile = pick_profile(definition, task_cfg["profile"])
        self._profile = profile
        self.template: str = profile["template"]
        self.max_new_tokens = max_new_tokens(task_cfg["max_new_tokens"], profile)
        self.truncation = check_policy(task_cfg["truncation"])
        self.max_length = _optional_positive(task_cfg["max_length"], "task.max_length")
        self.head_tokens = int(definition["head_tail_init_tokens"])
        if self.truncation != "none" and self.max_length is None:
            raise UserError(f"task.truncation={self.truncation} needs task.max_length (the model's window in tokens).")
        if self.truncation != "none" and self.max_length <= self.max_new_tokens:
            raise UserError(f"task.max_length ({self.max_length}) must exceed the {self.max_new_tokens} new tokens of "
                            f"{self.name}, or nothing of the prompt fits; raise it or lower task.max_new_tokens.")
        self.limit = _optional_positive(task_cfg["limit"], "task.limit")
        self.render: Render = render if definition["chat_template"] else (lambda text: text)
        self.answer_prefix: str = (definition.get("answer_prefix") or "") if answer_prefix else ""
        self.extra_stop_token_ids = [
            int(tokenizer.encode(s, add_special_tokens=False)[-1]) for s in definition.get("extra_stop") or []
        ]
        self.recipes = [RECIPES[r] if r in RECIPES else _unknown_recipe(r) for r in definition.get("recipes") or []]

        loaded = data.load_rows(definition, task_cfg["data_dir"])
        self.origin, self.data_sha256 = loaded.origin, loaded.sha256
        rows = loaded.rows[: self.limit] if self.limit else loaded.rows
        self._instances = [self._instance(row) for row in rows]  # every row checked before any model work
        self._rows = rows
        self._specs = self._make_specs(rows)

    # ---- the Task protocol ---------------------------------------------------------------------------
    @staticmethod
    def plan_samples(task_cfg: dict, max_context: int) -> tuple[list[int], int, str]:
        """For `infllm-eval plan` (no data read): (lengths, samples per length, note): one length, the truncation
        window (`max_length`, else the model's context), with `limit` samples or, without a limit, an unknown
        count (0)."""
        truncated = task_cfg["truncation"] != "none"
        length = int(task_cfg["max_length"]) if truncated else max_context
        note = "prompts <= max_length" if truncated else "untruncated prompts may be longer"
        return [length], int(task_cfg["limit"] or 0), note

    def sample_specs(self) -> list[dict]:
        return [dict(s) for s in self._specs]

    def build(self, spec: dict) -> Sample:
        index = int(spec["index"])
        row, inst = self._rows[index], self._instances[index]
        head, tail = self._head_tail(inst)
        ids, context = self._tokenize(head, inst["context"], tail)
        budget = None if self.max_length is None else self.max_length - self.max_new_tokens
        kept, dropped = truncate(ids, context, self.truncation, budget, self.head_tokens)
        score_fields = {f: row.get(f) for f in self.definition.get("score_fields") or []}
        meta = {"dataset": self.definition["dataset"], "line": row["_line"], "row_id": _row_id(row, index),
                "n_context_tokens": context[1] - context[0], "n_words": len(inst["context"].split())}
        return Sample(
            sample_id=spec["sample_id"],
            input_ids=torch.tensor(kept, dtype=torch.long),
            answers=data.answers_of(row, self.definition["answer_field"]),
            length=spec["length"],
            depth=spec["depth"],
            meta=meta,
            score_fields=score_fields,
            n_input_tokens=len(kept),
            truncated=dropped > 0,
            n_dropped=dropped,
        )

    def data_fingerprint(self) -> str:
        """sha256 over the data file's bytes and everything that turns a row into ids and a score. `limit` is left
        out: it picks rows, it does not change them (a larger limit reuses the rows already run)."""
        head, tail = self._head_tail({k: "{" + k + "}" for k in ("question", "input", "key", "func", "func_call",
                                                                   "prefix", *[f"OPTION_{c}" for c in "ABCD"])})
        payload = {
            "builder": "benchmark", "recipe_version": RECIPE_VERSION, "definition": self.definition,
            "profile": self.profile, "max_new_tokens": self.max_new_tokens, "truncation": self.truncation,
            "max_length": self.max_length if self.truncation != "none" else None,
            "answer_prefix": self.answer_prefix, "data_sha256": self.data_sha256, "rendered": [head, tail],
            "extra_stop_token_ids": self.extra_stop_token_ids,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    # ---- rows -> prompts -----------------------------------------------------------------------------
    def _instance(self, row: dict) -> dict:
        """Template fields of one row (context, input and what the recipes add); bad rows are UserErrors."""
        inst = {"context": row.get("context", row.get("content")), "input": row.get("input", "")}
        for recipe in self.recipes:
            try:
                recipe(row, inst, self._profile)
            except ValueError as e:
                field, problem = e.args if len(e.args) == 2 else ("input", str(e))
                raise data.field_error(self.origin, row, field, problem) from None
            except (KeyError, TypeError) as e:
                raise data.field_error(self.origin, row, str(e).strip("'"), "is missing or of the wrong type") from None
        try:
            self.template.format(**{**inst, "context": ""})
        except KeyError as e:
            raise UserError(f"The {self.profile} template of task {self.name} uses {{{e.args[0]}}}, which no recipe "
                            "fills; add the recipe to the task's definition.") from None
        return inst

    def _head_tail(self, inst: dict) -> tuple[str, str]:
        """The rendered prompt before and after the context (chat template and answer prefix applied)."""
        skeleton = self.template.format(**{**inst, "context": CONTEXT_PLACEHOLDER})
        rendered = self.render(skeleton)
        if self.answer_prefix:  # plain prompt: after a space (or the prefix's own leading newlines); chat: the
            prefix = self.answer_prefix  # assistant's turn starts with it
            plain_sep = "" if prefix[:1].isspace() else " "
            rendered += plain_sep + prefix if rendered == skeleton else prefix.lstrip()
        if rendered.count(CONTEXT_PLACEHOLDER) != 1:
            raise UserError(f"The chat template altered the {self.name} prompt so its context can no longer be "
                            "located; use a model config with a standard chat template.")
        head, tail = rendered.split(CONTEXT_PLACEHOLDER)
        return head, tail

    def _tokenize(self, head: str, context: str, tail: str) -> tuple[list[int], tuple[int, int]]:
        """Ids of head + context + tail tokenized as one text, and the [start, end) of the context's tokens."""
        tok = self.tokenizer
        text = head + context + tail
        bos = getattr(tok, "bos_token", None)
        special = not (bos and text.startswith(str(bos)))
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
            c0, c1 = len(head), len(head) + len(context)
            start = next((i for i, (s, e) in enumerate(offsets) if s >= c0 and e > s), len(ids))
            end = start
            while end < len(ids) and offsets[end][1] <= c1 and offsets[end][1] > offsets[end][0]:
                end += 1
            return ids, (start, end)
        head_ids = list(tok.encode(head, add_special_tokens=special))
        ctx_ids = list(tok.encode(context, add_special_tokens=False))
        tail_ids = list(tok.encode(tail, add_special_tokens=False))
        return head_ids + ctx_ids + tail_ids, (len(head_ids), len(head_ids) + len(ctx_ids))

    def _make_specs(self, rows: list[dict]) -> list[dict]:
        buckets = self.definition.get("length_buckets")
        specs, seen = [], set()
        for i, row in enumerate(rows):
            sid = f"{self.name}-{_row_id(row, i)}"
            if sid in seen:
                sid = f"{self.name}-{i}"
            seen.add(sid)
            specs.append({"sample_id": sid, "index": i, "length": _length_of(row, buckets),
                          "depth": row.get("depth") if isinstance(row.get("depth"), (int, float)) else None})
        return specs


def _row_id(row: dict, index: int) -> str:
    value = row.get("_id", row.get("id"))
    return str(index) if value is None else str(value)


def _length_of(row: dict, buckets: list[int] | None) -> int:
    """The summary's length axis: the LongBench-E bucket (lower bound) of the row's `length`, the target token
    length of a synthetic row (`data make` writes it), or 0 ("the benchmark as released")."""
    length = row.get("length")
    if not isinstance(length, int) or isinstance(length, bool):
        return 0
    if buckets:
        return max(b for b in buckets if b <= length) if any(b <= length for b in buckets) else 0
    return length if "depth" in row else 0


def _unknown_recipe(name: str) -> Callable:
    raise unknown_name("task recipe", name, list(RECIPES))


def _optional_positive(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} must be a positive integer or null; got {value!r}.")
    return value
