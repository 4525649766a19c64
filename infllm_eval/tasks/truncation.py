"""Truncation policies: fit a tokenized prompt into a token budget, cutting only where the policy says.

Applied to the final ids (chat template, BOS and answer prefix included), so the prompt really fits:

- `none`: keep everything (streaming methods read any length; InfLLM's `truncation: None` with max_len 2^31-1).
- `middle`: LongBench `pred.py` / ∞-Bench `truncate_input(manner="middle")`: keep the first half and the last
  half of the budget. Here the halves are of the *context tokens'* budget, so the instruction before the context
  and the question after it are never cut.
- `head_tail`: InfLLM `pred.py` `truncation: suffix`: the first `head_tokens` (128) tokens of the whole prompt plus
  its last `budget - head_tokens` tokens.
- `skip`: a prompt over budget is not run (InfLLM's `truncation: None` with a finite max_len skips it).

The budget for the prompt is `max_length - max_new_tokens` (InfLLM: `max_len - max_gen`), so the generated
tokens fit the window too.
"""

from __future__ import annotations

from infllm_eval.errors import UserError
from infllm_eval.tasks.base import SampleSkipped

POLICIES = ("none", "middle", "head_tail", "skip")


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise UserError(f"task.truncation must be one of {', '.join(POLICIES)}; got {policy!r}.")
    return str(policy)


def truncate(
    ids: list[int], context: tuple[int, int], policy: str, budget: int | None, head_tokens: int
) -> tuple[list[int], int]:
    """(ids that fit `budget`, number of tokens dropped). `context` = [start, end) of the context tokens.

    Raises SampleSkipped for `skip`, ValueError when even the prompt without its context is over budget.
    """
    if policy == "none" or budget is None or len(ids) <= budget:
        return ids, 0
    over = len(ids) - budget
    if policy == "skip":
        raise SampleSkipped(f"prompt of {len(ids)} tokens is over the budget of {budget} (truncation=skip)")
    if policy == "head_tail":
        if budget <= head_tokens:
            raise ValueError(f"budget {budget} leaves no room after the first {head_tokens} tokens (head_tail)")
        return ids[:head_tokens] + ids[len(ids) - (budget - head_tokens) :], over
    start, end = context
    keep = (end - start) - over  # context tokens that fit
    if keep < 0:
        raise ValueError(
            f"the prompt without its context is {len(ids) - (end - start)} tokens, over the budget of {budget}"
        )
    first = keep // 2
    return ids[: start + first] + ids[end - (keep - first) :], over
