"""What every task hands the engine: `Sample`s (one prompt each) built lazily from cheap `sample_specs`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from infllm_eval.errors import UserError, unknown_name

#: `render(text) -> text`: applies the model's chat template to a user message, or returns it unchanged.
Render = Callable[[str], str]


@dataclass
class Sample:
    """One prompt, already tokenized with the model's own tokenizer, plus what scoring needs."""

    sample_id: str  # stable, human-readable: f"{task}-L{length}-d{depth:.2f}-{i}"
    input_ids: torch.Tensor  # 1-D LongTensor [n], the full prompt (chat template and BOS included)
    answers: list[str]
    length: int  # the target length bucket (task.lengths value)
    depth: float | None  # needle depth in [0, 1]; None for tasks without a needle
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serializable extras, e.g. the key
    #: extra keyword arguments for the task's metric (e.g. LongBench `all_classes`, ∞-Bench `options`)
    score_fields: dict[str, Any] = field(default_factory=dict)
    n_input_tokens: int = 0
    truncated: bool = False  # set by the engine when the prompt had to be cut to fit the model
    n_dropped: int = 0  # tokens removed by that truncation


@runtime_checkable
class Task(Protocol):
    """A task as the engine sees it. `sample_specs` is cheap; `build` does the tokenization."""

    name: str
    max_new_tokens: int
    metric: str  # a name in infllm_eval.metrics.METRICS

    def sample_specs(self) -> list[dict]:
        """One dict per sample ({"sample_id", "length", "depth", "index"}); no tokenization."""
        ...

    def build(self, spec: dict) -> Sample:
        """The Sample for one spec; deterministic given the seed."""
        ...

    def data_fingerprint(self) -> str:
        """sha256 hex over everything that determines the prompts and answers, for keying results."""
        ...


class SampleSkipped(Exception):
    """Raised by `Task.build` when the run's truncation policy is `skip` and the prompt is over its budget.

    The sample is recorded (status `skipped`, with the reason) and the run goes on.
    """


def pick_profile(definition: dict, name: Any) -> tuple[str, dict]:
    """The prompt profile `task.profile` names (null: the definition's `default_profile`): (its name, its
    settings)."""
    profiles: dict = definition["profiles"]
    chosen = str(name or definition["default_profile"])
    if chosen not in profiles:
        raise unknown_name("task.profile", chosen, list(profiles))
    return chosen, profiles[chosen]


def max_new_tokens(override: Any, profile: dict) -> int:
    """`task.max_new_tokens` if set, else the profile's."""
    value = profile["max_new_tokens"] if override is None else override
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"task.max_new_tokens must be a positive integer or null; got {value!r}.")
    return value
