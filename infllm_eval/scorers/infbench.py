"""∞-Bench (InfiniteBench) scorers, rule for rule as OpenBMB/InfiniteBench `src/compute_scores.py` @88b3daa.

Every function takes `(prediction, answers, **fields)`: `answers` is the dataset's `answer` field as a list
(numbers may come as ints/floats or as their strings); the choice tasks (longbook_choice_eng, code_debug)
also take the example's `options` and build the label `[answer text, letter]` as the official `get_answer`
does (answers that already are `[text, letter]`, as InfLLM's pred.py writes them, are kept). The dataset score
is the plain mean of the per-sample scores (the CLI prints `round(100 * mean, 2)`).

Official quirks kept (they define the published numbers):
- passkey, number_string, code_run, math_find, longdialogue_qa_eng read only the first answer.
- longdialogue_qa_eng: the first answer must equal one whole upper-cased word of the prediction, so a
  two-word name ("STAMP PAID") never scores (InfiniteBench issue #18).
- longbook_choice_eng: a prediction starting with A-D is judged by that letter alone; the last resort takes
  the first word that is a substring of "ABCD" ("AB" counts as a word there).
- code_debug: only "X." / "X:" at the start, or a prefix ("answer is:", "is:", "answer:", "correct option
  is:") followed by one character and then the letter or the function name; anything else scores 0.
- math_find and math_calc read unsigned digit runs, so a negative value in a prediction never matches a
  negative answer; math_calc gives the share of leading intermediate values that are right. code_run reads
  the last whitespace word, sign included.
- code_debug replaces "Option"/"option" by spaces before looking for prefixes, so "correct option is:" can
  never match as such (it is caught by "is:").
- longbook_sum_eng: ROUGE-Lsum F as HF `evaluate` ("rouge", use_stemmer=False) computes it with the
  rouge-score package: lowercase, non-[a-z0-9] to spaces, sentences split on newlines, summary-level union
  LCS without double counting, max F over the answers (`score_multi`). Reimplemented here (no download).
Where the original crashes, these return 0 instead: an integer answer whose prediction's first number is a
decimal (math_find `int("3.5")`), an answer that is not a number (math_find, code_run, math_calc).
kv_retrieval: the official check is `label in words`; with a list label (the HF dataset's form) that is
always False, so each answer string is checked instead (the dataset has exactly one).

InfLLM (thunlp/InfLLM `benchmark/infinitebench_eval.py` + `eval.py`) differs, and the official rules are the
default here: its code_debug adds a second prefix family ("answer is", "error is") and, when no prefix
matches, scores `random.seed(fn_name); random.choice("ABCD") == letter` (a pseudo-random 25%) — registered as
`infbench_code_debug_infllm`; its choice scorer compares per answer string (`pred[0] == label`) and crashes
on an empty prediction; its QA scorer iterates the characters of one answer and its Sum scorer raises
NameError (both tasks dropped) — not reproduced.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from infllm_eval.metrics import METRICS, first_int
from infllm_eval.scorers.longbench import normalize_answer, normalize_zh_answer, token_f1

#: the registered metric names are `infbench_<task>`.
PREFIX = "infbench_"

OPTION_LETTERS = "ABCD"
_NON_DIGIT = re.compile(r"[^0-9]")
_FIRST_NUMBER = re.compile(r"\d+\.\d+|\d+")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _blank_out(text: str, chars: Sequence[str]) -> str:
    for c in chars:
        text = text.replace(c, " ")
    return text


def _squeeze_spaces(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _as_int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


# -- retrieval -----------------------------------------------------------------------------------------------
def passkey(prediction: str, answers: list[str], **fields: Any) -> float:
    """First digit run == the first answer (`get_score_one_passkey`, also number_string)."""
    return float(bool(answers) and str(answers[0]) == first_int(prediction))


number_string = passkey


def kv_retrieval(prediction: str, answers: list[str], **fields: Any) -> float:
    """The answer is a whole word once \\n : " ' . , ? ! { } are spaces (`get_score_one_kv_retrieval`)."""
    words = _blank_out(prediction, ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]).split()
    return float(any(str(a) in words for a in answers))


# -- books and dialogue --------------------------------------------------------------------------------------
def longbook_qa_eng(prediction: str, answers: list[str], **fields: Any) -> float:
    """Max token F1 over answers after `normalize_answer` (`qa_f1_score`)."""
    pred = normalize_answer(prediction).split()
    return max((token_f1(pred, normalize_answer(str(a)).split()) for a in answers), default=0.0)


def longbook_qa_chn(prediction: str, answers: list[str], **fields: Any) -> float:
    """Max character-level F1 over answers after `normalize_zh_answer` (`qa_f1_score_zh`; no jieba)."""
    pred = list(normalize_zh_answer(prediction))
    return max((token_f1(pred, list(normalize_zh_answer(str(a)))) for a in answers), default=0.0)


def longdialogue_qa_eng(prediction: str, answers: list[str], **fields: Any) -> float:
    """First answer = a whole upper-cased word in the prediction (`get_score_one_longdialogue_qa_eng`)."""
    if not answers:
        return 0.0
    words = _blank_out(prediction.strip(), ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]).split()
    return float(str(answers[0]) in [w.upper() for w in words])


def choice_label(answers: list[str], options: Sequence[str] | None) -> list[str]:
    """`[answer text, letter]` as the official `get_answer`; without options only what `answers` gives.

    Answers already of the form `[text, "A".."D"]` are kept; one answer is looked up in `options`
    (ValueError when it is not one of them).
    """
    answers = [str(a) for a in answers]
    if len(answers) == 2 and answers[1] in OPTION_LETTERS and len(answers[1]) == 1:
        return answers
    if len(answers) == 1 and options:
        return [answers[0], OPTION_LETTERS[list(options).index(answers[0])]]
    return answers[:1]


def _after_prefix(pred: str, prefixes: Sequence[str]) -> str | None:
    """Text after the first prefix found (in list order) and one more character; "" if it ends there; None if
    no prefix occurs."""
    for prefix in prefixes:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        start = idx + len(prefix) + 1
        return "" if len(pred) < start else pred[start:]
    return None


def longbook_choice_eng(prediction: str, answers: list[str], **fields: Any) -> float:
    """Letter or option text as `get_score_one_longbook_choice_eng` (needs `options` or [text, letter])."""
    label = choice_label(answers, fields.get("options"))
    pred = prediction.strip()
    if pred == "":
        return 0.0
    if pred[0] in OPTION_LETTERS:
        return float(pred[0] in label)
    if pred in label:
        return 1.0
    pred = _squeeze_spaces(_blank_out(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]))
    rest = _after_prefix(pred, ["answer is:", "answer:", "answer is", "option is"])
    if rest is not None:
        return float(bool(rest) and any(rest.startswith(s) for s in label))
    for word in pred.split():
        if word in OPTION_LETTERS:  # substring test, as the original: "AB" counts
            return float(word in label)
    return 0.0


def longbook_sum_eng(prediction: str, answers: list[str], **fields: Any) -> float:
    """ROUGE-Lsum F, max over answers (`evaluate.load("rouge")`, rouge-score semantics, no stemming)."""
    return max((rouge_lsum(prediction, str(a)) for a in answers), default=0.0)


# -- ROUGE-Lsum (google-research rouge-score, as HF evaluate calls it) ---------------------------------------
def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's DefaultTokenizer without stemmer: lowercase, non-[a-z0-9] runs to spaces, split."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """Indices into `ref` of one LCS, backtracked as rouge-score's `_backtrack_norec` (ties: up in ref)."""
    table = [[0] * (len(can) + 1) for _ in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        row, prev, r = table[i], table[i - 1], ref[i - 1]
        for j in range(1, len(can) + 1):
            row[j] = prev[j - 1] + 1 if r == can[j - 1] else max(prev[j], row[j - 1])
    i, j, out = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_lsum(prediction: str, reference: str) -> float:
    """Summary-level LCS F over newline-split sentences (rouge-score `_summary_level_lcs`)."""
    ref_sents = [rouge_tokenize(s) for s in reference.split("\n") if s]
    can_sents = [rouge_tokenize(s) for s in prediction.split("\n") if s]
    m, n = sum(map(len, ref_sents)), sum(map(len, can_sents))
    if not ref_sents or not can_sents or not m or not n:
        return 0.0
    ref_left = Counter(t for s in ref_sents for t in s)
    can_left = Counter(t for s in can_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union = sorted(set().union(*(_lcs_indices(ref, can) for can in can_sents)))
        for token in (ref[i] for i in union):
            if ref_left[token] > 0 and can_left[token] > 0:
                hits += 1
                ref_left[token] -= 1
                can_left[token] -= 1
    recall, precision = hits / m, hits / n
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# -- math ----------------------------------------------------------------------------------------------------
def _number(value: Any) -> int | float | None:
    """An int or float answer from a number or its string ("12" -> 12, "3.5" -> 3.5); None otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None


def math_find(prediction: str, answers: list[str], **fields: Any) -> float:
    """The prediction's first number (`\\d+\\.\\d+|\\d+`) equals the first answer (`get_score_one_math_find`).

    An int answer compares `int(first)` (a decimal first number scores 0 where the original raises); a float
    answer compares `float(first)`.
    """
    label = _number(answers[0]) if answers else None
    found = _FIRST_NUMBER.search(prediction)
    if label is None or found is None:
        return 0.0
    if isinstance(label, int):
        value = _as_int(found.group(0))
        return float(value is not None and value == label)
    return float(float(found.group(0)) == label)


def math_calc_label(answers: Sequence[Any]) -> list[int]:
    """The expected intermediate values as ints.

    Accepted: `[[v1, v2, ...]]` (the raw dataset form, unwrapped as the original does), `[v1, v2, ...]`
    (ints or integer strings), or one string holding the whole list ("[1, 3, -1]" or "1 3 -1"; signs kept).
    Anything that is not an integer raises ValueError.
    """
    values: Sequence[Any] = answers
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    if len(values) == 1 and isinstance(values[0], str) and _as_int(values[0]) is None:
        values = re.findall(r"-?\d+", values[0])
    out = [_as_int(v) for v in values]
    if any(v is None for v in out):
        raise ValueError(f"math_calc answers must be integers, got {list(values)[:5]}")
    return out  # type: ignore[return-value]


def math_calc(prediction: str, answers: list[Any], **fields: Any) -> float:
    """Share of the expected values matched in order by the prediction's digit runs, up to the first miss."""
    label = math_calc_label(answers)
    if not label:
        return 0.0
    got = [int(x) for x in _NON_DIGIT.split(prediction) if x]
    n = 0
    while n < len(label) and n < len(got) and label[n] == got[n]:
        n += 1
    return n / len(label)


# -- code ----------------------------------------------------------------------------------------------------
def code_run(prediction: str, answers: list[Any], **fields: Any) -> float:
    """The last word, as an int, equals the first answer (`get_score_one_code_run`)."""
    label = _as_int(answers[0]) if answers else None
    words = _blank_out(prediction.strip(), ["\n", ".", "`", "'", '"', ":"]).split()
    if label is None or not words:
        return 0.0
    return float(_as_int(words[-1]) == label)


_DEBUG_STRIP = ["\n", "`", "'", '"', "-", "*", "Option", "option"]


def _debug_label(answers: list[str], fields: dict) -> tuple[str, str | None]:
    label = choice_label(answers, fields.get("options"))
    return (label[0] if label else ""), (label[1] if len(label) > 1 else None)


def _starts_with_answer(rest: str, letter: str | None, fn_name: str) -> bool:
    return any(rest.startswith(s) for s in (letter, fn_name) if s is not None)


def code_debug(prediction: str, answers: list[str], **fields: Any) -> float:
    """Letter or function name after an answer prefix (`get_score_one_code_debug`, official @88b3daa)."""
    fn_name, letter = _debug_label(answers, fields)
    pred = prediction.strip()
    if letter is not None and pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = _squeeze_spaces(_blank_out(pred, _DEBUG_STRIP))
    rest = _after_prefix(pred, ["answer is:", "is:", "answer:", "correct option is:"])
    return float(bool(rest) and _starts_with_answer(rest, letter, fn_name))


def _infllm_prefix_check(
    pred: str, prefixes: Sequence[str], letter: str | None, fn: str
) -> tuple[bool | None, str]:
    """One prefix family of InfLLM's code_debug: (verdict, or None when no prefix occurs; the text left).

    As the original, the text is cut after the prefix (and one character) unless the prediction ends before
    that, which is a False verdict on the uncut text; the next family searches what is left.
    """
    for prefix in prefixes:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        start = idx + len(prefix) + 1
        if len(pred) < start:
            return False, pred
        return _starts_with_answer(pred[start:], letter, fn), pred[start:]
    return None, pred


def code_debug_infllm(prediction: str, answers: list[str], **fields: Any) -> float:
    """InfLLM's code_debug: two prefix families, then a `random.seed(fn_name)` guess when neither matches."""
    fn_name, letter = _debug_label(answers, fields)
    if letter is not None and prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = _squeeze_spaces(_blank_out(prediction.strip(), _DEBUG_STRIP))
    first, pred = _infllm_prefix_check(pred, ["answer is:", "is:", "answer:"], letter, fn_name)
    second, _ = _infllm_prefix_check(pred, ["answer is", "error is"], letter, fn_name)
    if first is None and second is None:
        return float(random.Random(fn_name).choice(["A", "B", "C", "D"]) == letter)
    return float(bool(first) or bool(second))


Metric = Callable[..., float]

#: task -> metric, every task of compute_scores.py's ALL_TASKS.
TASK_METRIC: dict[str, Metric] = {
    "passkey": passkey,
    "number_string": number_string,
    "kv_retrieval": kv_retrieval,
    "longbook_sum_eng": longbook_sum_eng,
    "longbook_choice_eng": longbook_choice_eng,
    "longbook_qa_eng": longbook_qa_eng,
    "longbook_qa_chn": longbook_qa_chn,
    "longdialogue_qa_eng": longdialogue_qa_eng,
    "math_find": math_find,
    "math_calc": math_calc,
    "code_run": code_run,
    "code_debug": code_debug,
}
TASKS: tuple[str, ...] = tuple(TASK_METRIC)
#: variants that reproduce InfLLM's own eval where it departs from the official one.
INFLLM_VARIANTS: dict[str, Metric] = {"code_debug_infllm": code_debug_infllm}

for _task, _metric in {**TASK_METRIC, **INFLLM_VARIANTS}.items():
    METRICS.add(PREFIX + _task, _metric)
