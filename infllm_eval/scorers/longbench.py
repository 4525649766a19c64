"""LongBench v1 scorers, rule for rule as THUDM/LongBench `metrics.py` + `eval.py` (v1: now `LongBench/`).

Per answer, one of nine metrics (token F1, Chinese F1, ROUGE-L from the `rouge` package, its jieba variant,
classification, paragraph retrieval (en/zh), paragraph count, code similarity). Per sample (`eval.py`): for
trec, triviaqa, samsum and lsht the prediction is first cut to its first line
(`lstrip('\\n').split('\\n')[0]`), then the score is the max over the gold answers, starting from 0.
Per dataset: `round(100 * mean, 2)`; LongBench-E splits by `length` (words) into 0-4k / 4-8k / 8k+.

Kept as the original does, on purpose (scores stay comparable with published LongBench numbers):
- `classification_score` removes items from the list it is iterating over, so a match right after a removed
  one is never checked for removal; its difflib fallback never runs (`em_match_list != 0` is always true).
- `code_sim_score` is fuzzywuzzy's `fuzz.ratio` with python-Levenshtein: equal strings score 100 (even two
  empty ones), otherwise an empty side scores 0, otherwise `int(round(100 * indel_ratio))` (Python 3 rounds
  half to even). Computed here with rapidfuzz, which python-Levenshtein >= 0.21 itself wraps.
- `rouge_score` is `Rouge().get_scores(...)["rouge-l"]["f"]` of the `rouge` package and 0 on any exception
  (an empty prediction raises there).
Where the original crashes, these return 0 instead (documented per function): a gold answer without
"Paragraph N" / "段落N" (retrieval) and a classification sample without `all_classes`.

jieba, rouge and rapidfuzz are imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from infllm_eval.metrics import METRICS

#: the registered metric names are `longbench_<dataset>`.
PREFIX = "longbench_"

#: Chinese punctuation removed by LongBench's (and ∞-Bench's) `normalize_zh_answer`, plus string.punctuation.
CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGITS = re.compile(r"\d+")

#: eval.py cuts these datasets' predictions to their first line before scoring.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the words a/an/the, collapse whitespace (`normalize_answer`)."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, delete all whitespace (`normalize_zh_answer`)."""
    text = "".join(ch for ch in text.lower() if ch not in _ZH_PUNCT)
    return "".join(text.split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists; 0 without overlap (`f1_score`)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def _jieba_cut(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading banner goes to stderr otherwise
    return list(jieba.cut(text, cut_all=False))


def qa_f1_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """Token F1 after `normalize_answer`, whitespace tokens (`qa_f1_score`)."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """F1 over jieba words, each `normalize_zh_answer`-ed, empty ones dropped (`qa_f1_zh_score`)."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_cut(text)) if w]

    return token_f1(words(prediction), words(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """ROUGE-L F of the `rouge` package (`Rouge().get_scores([p], [g], avg=True)`); 0 on any exception."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - the original catches everything (empty hypothesis, recursion depth)
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """`rouge_score` over jieba words joined by spaces (`rouge_zh_score`)."""
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """1/len(matches) if the gold class is among the class names found in the prediction, else 0.

    `classification_score`: matches = classes of `all_classes` that are substrings of the prediction; then a
    match that is a substring of the gold class but not equal to it is removed, while iterating over the same
    list (so the element after a removed one is skipped, as in the original). No `all_classes`: 0.
    """
    matches = [name for name in (fields.get("all_classes") or []) if name in prediction]
    i = 0
    while i < len(matches):  # a for loop over a list that shrinks under it: same index arithmetic
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
    """Share of the digit runs in the prediction that equal `target`; 0 when it has none."""
    numbers = _DIGITS.findall(prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """Share of the numbers in the prediction equal to the gold count (`count_score`)."""
    return _number_share(prediction, str(ground_truth))


def _paragraph_score(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    return _number_share(prediction, found[0]) if found else 0.0  # the original raises IndexError


def retrieval_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """Share of numbers in the prediction equal to N of the gold "Paragraph N" (`retrieval_score`)."""
    return _paragraph_score(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """As `retrieval_score` with the gold pattern "段落N" (`retrieval_zh_score`)."""
    return _paragraph_score(prediction, ground_truth, r"段落(\d+)")


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy `fuzz.ratio` backed by python-Levenshtein: 0-100, an int rounded half to even."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    from rapidfuzz.distance import Indel

    return round(100 * Indel.normalized_similarity(a, b))  # fuzzywuzzy intr(): int(round(x)), half to even


def code_sim_score(prediction: str, ground_truth: str, **fields: Any) -> float:
    """fuzz.ratio / 100 between the gold line and the prediction's first line without "`", "#" or "//".

    `code_sim_score`: lines of `prediction.lstrip('\\n')`; no such line means the empty string.
    """
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz_ratio(first, ground_truth) / 100


PerAnswer = Callable[..., float]

#: eval.py's dataset2metric.
DATASET_METRIC: dict[str, PerAnswer] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
DATASETS: tuple[str, ...] = tuple(DATASET_METRIC)


def score_sample(dataset: str, prediction: str, answers: Sequence[str], **fields: Any) -> float:
    """One sample as eval.py's `scorer`: first-line rule for 4 datasets, then max over answers from 0."""
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, **fields))
    return float(best)


def make_metric(dataset: str) -> PerAnswer:
    """The registered metric `longbench_<dataset>`: `(prediction, answers, **fields) -> float`."""

    def metric(prediction: str, answers: list[str], **fields: Any) -> float:
        return score_sample(dataset, prediction, answers, **fields)

    inner = DATASET_METRIC[dataset]
    rule = " on the first line" if dataset in FIRST_LINE_DATASETS else ""
    metric.__name__ = f"{PREFIX}{dataset}".replace("-", "_")
    metric.__doc__ = f"LongBench {dataset}: max over answers of `{inner.__name__}`{rule} (eval.py)."
    return metric


def aggregate(scores: Sequence[float]) -> float:
    """eval.py's dataset score: `round(100 * sum / n, 2)`."""
    total = 0.0
    for s in scores:
        total += s
    return round(100 * total / len(scores), 2)


def length_buckets(scores: Sequence[float], lengths: Sequence[int]) -> dict[str, float]:
    """eval.py's LongBench-E split (`scorer_e`): round(100 * np.mean, 2) per 0-4k / 4-8k / 8k+ (or NaN)."""
    import numpy as np

    groups: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for score, length in zip(scores, lengths):
        groups["0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"].append(score)
    return {k: round(100 * float(np.mean(v)), 2) if v else float("nan") for k, v in groups.items()}


for _dataset in DATASETS:
    METRICS.add(PREFIX + _dataset, make_metric(_dataset))
