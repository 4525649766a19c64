"""Passkey retrieval, sized to an exact token count with the model's own tokenizer.

The recipe is ∞-Bench's (OpenBMB/InfiniteBench `data/construct_synthetic_dataset.py`), which the InfLLM
paper evaluates on: a needle line "The pass key is {key}. Remember it. {key} is the pass key." sits among
repeated noise lines, context = noise*j + needle + noise*(N-j), and the model is asked "What is the pass
key?". Prompt template and max new tokens come from the chosen profile in tasks/passkey.yaml (InfLLM's
benchmark/config/dataset2prompt.json and dataset2maxlen.json, or ∞-Bench's src/prompt.py / eval_utils.py).

Where ∞-Bench sizes the context in noise *lines*, this builder sizes the whole prompt in *tokens* so that a
sample of length L is exactly L ids after the chat template (BOS included):

    ids = head + noise*j + needle + noise*(N-j) + noise[:r] + tail,   len(ids) == L

`head`/`tail` are the rendered prompt (chat template applied) before/after the context; N whole noise lines
plus a partial line of r tokens fill what is left; j = round(depth * N) (Python `round`). When the needle
lands after the last whole line (j == N) the partial line goes right after the head instead, as a line
*suffix*, so depth 1.0 puts the needle directly before the question. Pieces are tokenized once, as they
appear next to a noise line (lines end in "\\n", so merges across seams are rare) and the noise ids are
repeated, so a 1,048,576-token prompt takes well under a second. Decoding the ids and tokenizing the text
again gives the same ids in the common case; with GPT-2-style pre-tokenizers the seams next to the head and
tail can differ by a token or two when the needle sits at depth 1.0 (measured with SmolLM2's tokenizer).

Keys: sample (length, depth, index) draws its 5 digits from
`random.Random(f"{seed}-{length}-{depth}-{index}")` (depth as a Python float, e.g. "0.5"), so adding
lengths or depths never changes the other samples' keys.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.tasks import TASK_BUILDERS
from infllm_eval.tasks.base import Render, Sample, max_new_tokens, pick_profile

#: Stand-in for the context while the prompt skeleton goes through the chat template.
CONTEXT_PLACEHOLDER = "<<<INFLLM_EVAL_CONTEXT>>>"

#: Bump when the way ids are assembled changes, so old results no longer match the fingerprint.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class _Pieces:
    """Rendered prompt around the context, and the token ids every sample reuses."""

    head_text: str
    tail_text: str
    head_ids: list[int]
    noise_ids: list[int]
    tail_ids: list[int]


@TASK_BUILDERS.register("passkey")
class PasskeyTask:
    """∞-Bench passkey retrieval at exact token lengths (see the module docstring for the recipe)."""

    def __init__(
        self,
        task_cfg: dict,
        definition: dict,
        tokenizer: Any,
        render: Render,
        *,
        answer_prefix: bool,
        seed: int,
    ) -> None:
        self.name: str = str(task_cfg["name"])
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.use_answer_prefix = bool(answer_prefix)

        self.filler: str = definition["filler"]
        self.needle: str = definition["needle"]
        self.question: str = definition["question"]
        self.answer_prefix: str = definition["answer_prefix"]
        self.key_digits: int = int(definition["key_digits"])
        self.key_duplications: int = int(definition["key_duplications"])
        self.metric: str = definition["metric"]

        self.profile, profile = pick_profile(definition, task_cfg["profile"])
        self.template: str = profile["template"]
        self.max_new_tokens: int = max_new_tokens(task_cfg["max_new_tokens"], profile)

        self.lengths = _validate_lengths(task_cfg["lengths"], int(definition["max_prompt_tokens"]))
        self.depths = _validate_depths(task_cfg["depths"])
        self.samples = _validate_samples(task_cfg["samples"])
        self._specs = self._make_specs()

        self._pieces = self._tokenize_pieces(render)
        self._check_shortest_fits()

    # ---- the Task protocol ---------------------------------------------------------------------------

    @staticmethod
    def plan_samples(task_cfg: dict, max_context: int) -> tuple[list[int], int, str]:
        """For `infllm-eval plan`: (lengths, samples per length, note); exact, a grid of lengths x depths x
        samples."""
        return [int(x) for x in task_cfg["lengths"]], len(task_cfg["depths"]) * int(task_cfg["samples"]), ""

    def sample_specs(self) -> list[dict]:
        """One spec per (length, depth, index), lengths outermost; no tokenization."""
        return [dict(spec) for spec in self._specs]

    def build(self, spec: dict) -> Sample:
        """Token ids for one spec: exactly `spec["length"]` ids, needle at `spec["depth"]`."""
        length, depth, index = int(spec["length"]), float(spec["depth"]), int(spec["index"])
        key = self.key_for(length, depth, index)
        needle_ids = self._needle_ids(key)
        ids, needle_at, layout = self._assemble(length, depth, needle_ids)
        return Sample(
            sample_id=spec.get("sample_id") or self._sample_id(length, depth, index),
            input_ids=ids,
            answers=[key],
            length=length,
            depth=depth,
            meta={
                "key": key,
                "needle_token_index": needle_at,
                "needle_n_tokens": len(needle_ids),
                **layout,
            },
            n_input_tokens=int(ids.numel()),
        )

    def data_fingerprint(self) -> str:
        """sha256 over the definition, the run settings, the rendered head/tail and the pieces' ids.

        The grid (`lengths`, `depths`, `samples`) is left out: it picks which samples run, it does not change any
        sample (each one is fixed by its id and the seed), so growing the grid reuses every finished sample and
        runs over different grids stay comparable cell by cell.

        The piece ids make the fingerprint change with the tokenizer too, while staying stable across
        machines and paths for the same tokenizer.
        """
        p = self._pieces
        ids_digest = hashlib.sha256(json.dumps([p.head_ids, p.noise_ids, p.tail_ids]).encode()).hexdigest()
        payload = {
            "builder": "passkey",
            "recipe_version": RECIPE_VERSION,
            "template": self.template,
            "filler": self.filler,
            "needle": self.needle,
            "question": self.question,
            "key_digits": self.key_digits,
            **({"key_duplications": self.key_duplications} if self.key_duplications else {}),
            "profile": self.profile,
            "max_new_tokens": self.max_new_tokens,
            "metric": self.metric,
            "seed": self.seed,
            "answer_prefix": self.answer_prefix if self.use_answer_prefix else None,
            "head": p.head_text,
            "tail": p.tail_text,
            "piece_ids_sha256": ids_digest,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()

    # ---- keys and ids ----------------------------------------------------------------------------

    def key_for(self, length: int, depth: float, index: int) -> str:
        """The sample's key: `key_digits` digits, each str(randint(0, 9)) as in ∞-Bench (leading zeros ok).

        With `key_duplications: n` (number_string), n times a random digit is repeated in place afterwards.
        Seeded per sample from f"{seed}-{length}-{depth}-{index}" (str seeds hash with sha512, so this is
        stable across Python runs and PYTHONHASHSEED), so other samples never shift when the grid grows.
        """
        rng = random.Random(f"{self.seed}-{int(length)}-{float(depth)}-{int(index)}")
        return draw_key(rng, self.key_digits, self.key_duplications)

    def _sample_id(self, length: int, depth: float, index: int) -> str:
        return f"{self.name}-L{length}-d{depth:.2f}-{index}"

    def _make_specs(self) -> list[dict]:
        specs = [
            {"sample_id": self._sample_id(length, depth, i), "length": length, "depth": depth, "index": i}
            for length in self.lengths
            for depth in self.depths
            for i in range(self.samples)
        ]
        _check_unique_ids(specs)
        return specs

    def _assemble(self, length: int, depth: float, needle_ids: list[int]) -> tuple[torch.Tensor, int, dict]:
        """head + noise*j + needle + noise*(N-j) + partial + tail, exactly `length` ids.

        The partial line (r < len(noise) tokens) sits before the tail as a line prefix, or, when the
        needle is after the last whole line, right after the head as a line suffix.
        """
        p = self._pieces
        fixed = self._fixed_tokens_for(needle_ids)
        self._check_fits(length, fixed)
        budget = length - fixed
        n_lines, rest = divmod(budget, len(p.noise_ids))
        j = round(depth * n_lines)

        noise = torch.tensor(p.noise_ids, dtype=torch.long)
        partial_first = j == n_lines and rest > 0
        lead = noise[len(noise) - rest :] if partial_first else noise[:0]
        trail = noise[:0] if partial_first else noise[:rest]
        parts = [
            torch.tensor(p.head_ids, dtype=torch.long),
            lead,
            noise.repeat(j),
            torch.tensor(needle_ids, dtype=torch.long),
            noise.repeat(n_lines - j),
            trail,
            torch.tensor(p.tail_ids, dtype=torch.long),
        ]
        ids = torch.cat(parts)
        assert ids.numel() == length, (ids.numel(), length)
        needle_at = len(p.head_ids) + len(lead) + j * len(p.noise_ids)
        layout = {"noise_lines": n_lines, "needle_line": j, "partial_line_tokens": rest}
        return ids, needle_at, layout

    def _check_shortest_fits(self) -> None:
        """Fail at startup, not hours into a run, if the shortest length cannot hold its samples' needles."""
        shortest = min(self.lengths)
        specs = [s for s in self._specs if s["length"] == shortest]
        keys = {self.key_for(s["length"], s["depth"], s["index"]) for s in specs}
        fixed = max(self._fixed_tokens_for(self._needle_ids(key)) for key in keys)
        self._check_fits(shortest, fixed)

    def _fixed_tokens_for(self, needle_ids: list[int]) -> int:
        return len(self._pieces.head_ids) + len(needle_ids) + len(self._pieces.tail_ids)

    def _check_fits(self, length: int, fixed: int) -> None:
        if length < fixed:
            raise UserError(
                f"task.lengths value {length} is too short for {self.name}: "
                f"the prompt without filler is already {fixed} tokens."
            )

    # ---- tokenization ----------------------------------------------------------------------------

    def _tokenize_pieces(self, render: Render) -> _Pieces:
        head_text, tail_text = self._render_skeleton(render)
        noise_ids = self._ids_after(self.filler, self.filler)
        return _Pieces(
            head_text=head_text,
            tail_text=tail_text,
            head_ids=self._head_ids(head_text, noise_ids),
            noise_ids=noise_ids,
            tail_ids=self._ids_after(self.filler, tail_text),
        )

    def _render_skeleton(self, render: Render) -> tuple[str, str]:
        """Fill the template with a placeholder context, apply `render`, split at the placeholder."""
        skeleton = self.template.replace("{context}", CONTEXT_PLACEHOLDER).replace("{input}", self.question)
        rendered = render(skeleton)
        if self.use_answer_prefix and self.answer_prefix:
            # plain prompt: "... What is the pass key? The pass key is"; with a chat template the prefix opens the
            # assistant's turn (after the generation prompt), where the model's answer starts
            rendered += f" {self.answer_prefix}" if rendered == skeleton else self.answer_prefix
        if rendered.count(CONTEXT_PLACEHOLDER) != 1:
            raise UserError(
                f"The chat template altered the {self.name} prompt so its context can no longer be located; "
                "use a model config with a standard chat template or prompt rendering off."
            )
        head, tail = rendered.split(CONTEXT_PLACEHOLDER)
        return head, tail

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def _head_ids(self, head_text: str, noise_ids: list[int]) -> list[int]:
        """Head ids with the tokenizer's leading special tokens (BOS), unless the rendered text has them.

        A chat template that already starts with the BOS text (e.g. "<s>[INST]") would otherwise get a
        second BOS; InfLLM's pred.py avoids the same by tokenizing mistral-inst prompts without specials.
        The head is tokenized as it appears before a noise line (GPT-2-style pre-tokenizers split the
        head's trailing "\n\n" differently when text follows).
        """
        ids = self._ids_before(head_text, self.filler, noise_ids)
        prefix = self._special_prefix()
        bos_text = getattr(self.tokenizer, "bos_token", None)
        already = ids[: len(prefix)] == prefix or (bool(bos_text) and head_text.startswith(str(bos_text)))
        return ids if already else prefix + ids

    def _special_prefix(self) -> list[int]:
        """The ids `add_special_tokens=True` puts before the text (usually [BOS] or nothing)."""
        probe = "a"
        plain, full = self._encode(probe), self._encode(probe, special=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def _needle_ids(self, key: str) -> list[int]:
        return self._ids_after(self.filler, self.needle.format(key=key))

    def _ids_before(self, piece: str, right: str, right_ids: list[int]) -> list[int]:
        """Ids of `piece` as it tokenizes right before `right` (whose in-context ids are `right_ids`).

        Falls back to the piece on its own when the two merge across the seam.
        """
        joint = self._encode(piece + right)
        if right_ids and joint[-len(right_ids) :] == right_ids:
            return joint[: -len(right_ids)]
        return self._encode(piece)

    def _ids_after(self, left: str, piece: str) -> list[int]:
        """Ids of `piece` as it tokenizes right after `left` (no special tokens).

        Tokenizing a line on its own can differ from the same line mid-text (SentencePiece adds a leading
        "▁" to the first word), so tokenize left+piece and drop left's ids. If the two merge across the seam
        (left's ids are not a prefix), fall back to the piece on its own: off by a token at most.
        """
        base, joint = self._encode(left), self._encode(left + piece)
        if joint[: len(base)] == base:
            return joint[len(base) :]
        return self._encode(piece)


def draw_key(rng: random.Random, digits: int, duplications: int) -> str:
    """∞-Bench's key: `digits` times str(randint(0, 9)), then `duplications` times a random digit repeated in place
    (number_string). The definition's `key_digits` / `key_duplications` say how many."""
    keys = [str(rng.randint(0, 9)) for _ in range(digits)]
    for k in range(duplications):
        pos = rng.randint(0, digits + k - 1)
        keys.insert(pos, keys[pos])
    return "".join(keys)


# ---- config validation ---------------------------------------------------------------------------------


def _as_list(value: Any) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _validate_lengths(value: Any, longest: int) -> list[int]:
    """Positive token counts up to the definition's `max_prompt_tokens` (`longest`)."""
    lengths = _as_list(value)
    bad = [v for v in lengths if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if value is None or not lengths or bad:
        shown = bad[0] if bad else value
        raise UserError(f"task.lengths must be a list of positive integers (token counts); got {shown!r}.")
    if max(lengths) > longest:
        raise UserError(f"task.lengths value {max(lengths):,} is over this task's maximum of {longest:,} tokens "
                        "(max_prompt_tokens in its task file).")
    return [int(v) for v in lengths]


def _validate_depths(value: Any) -> list[float]:
    depths = _as_list(value)
    bad = [v for v in depths if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1]
    if value is None or not depths or bad:
        shown = bad[0] if bad else value
        raise UserError(f"task.depths must be a list of numbers within [0, 1]; got {shown!r}.")
    return [float(v) for v in depths]


def _validate_samples(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"task.samples must be an integer of at least 1; got {value!r}.")
    return value


def _check_unique_ids(specs: list[dict]) -> None:
    """Sample ids key saved results, so two grid points may not share one (e.g. depths 0.333 and 0.334)."""
    seen: dict[str, dict] = {}
    for spec in specs:
        other = seen.setdefault(spec["sample_id"], spec)
        if other is not spec:
            raise UserError(
                f"task.lengths/depths give two samples the id '{spec['sample_id']}' "
                f"(depths {other['depth']} and {spec['depth']}); list each value once, depths differing at "
                "two decimals."
            )
