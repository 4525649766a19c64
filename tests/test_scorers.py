"""Official LongBench v1 and ∞-Bench scorers, by hand-written cases worked out from the original code.

Each expected value is derived in the comment next to it from THUDM/LongBench metrics.py + eval.py or
OpenBMB/InfiniteBench src/compute_scores.py @88b3daa (and thunlp/InfLLM's variant where named).
"""

from __future__ import annotations

import random

import pytest

from infllm_eval.metrics import METRICS, get_metric
from infllm_eval.scorers import infbench, longbench, metric_name_for, missing_field

LB_DATASETS = [
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
]
IB_TASKS = [
    "passkey",
    "number_string",
    "kv_retrieval",
    "longbook_sum_eng",
    "longbook_choice_eng",
    "longbook_qa_eng",
    "longbook_qa_chn",
    "longdialogue_qa_eng",
    "math_find",
    "math_calc",
    "code_run",
    "code_debug",
]


def lb(dataset: str):
    return get_metric(f"longbench_{dataset}")


def ib(task: str):
    return get_metric(f"infbench_{task}")


# -- registry ------------------------------------------------------------------------------------------------
def test_every_dataset_and_task_is_registered_with_the_original_metric() -> None:
    for d in LB_DATASETS:
        assert f"longbench_{d}" in METRICS
    for t in IB_TASKS:
        assert f"infbench_{t}" in METRICS
    assert "infbench_code_debug_infllm" in METRICS
    assert len([m for m in METRICS if m.startswith("longbench_")]) == 21
    # eval.py's dataset2metric, spot checks
    assert longbench.DATASET_METRIC["multifieldqa_zh"] is longbench.qa_f1_zh_score
    assert longbench.DATASET_METRIC["dureader"] is longbench.rouge_zh_score
    assert longbench.DATASET_METRIC["triviaqa"] is longbench.qa_f1_score
    assert longbench.DATASET_METRIC["repobench-p"] is longbench.code_sim_score
    assert metric_name_for("trec") == "longbench_trec" == metric_name_for("longbench_trec")
    assert metric_name_for("passkey") == "infbench_passkey"
    assert metric_name_for("nope") is None


def test_importing_metrics_does_not_load_jieba_or_rouge() -> None:
    import subprocess
    import sys

    mods = "('jieba', 'rouge', 'rapidfuzz')"
    code = f"import sys, infllm_eval.metrics; print(any(m in sys.modules for m in {mods}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- LongBench: QA F1 ----------------------------------------------------------------------------------------
def test_normalize_answer_drops_punctuation_articles_and_spaces() -> None:
    # lower -> "the cat's  hat, a-ok!" -> no punctuation "the cats  hat aok" -> articles out -> collapse
    assert longbench.normalize_answer("The Cat's  hat, a-ok!") == "cats hat aok"
    assert longbench.normalize_answer("An apple and THE pear") == "apple and pear"


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The quick brown fox.", ["a quick fox"], 0.8),  # [quick brown fox] vs [quick fox]: P 2/3, R 1
        ("Paris, France", ["London", "Paris"], 2 / 3),  # best answer: P 1/2, R 1
        ("", ["Paris"], 0.0),
        ("the a an", ["Paris"], 0.0),  # normalizes to nothing
        ("Paris", [], 0.0),  # no gold answer: eval.py's max starts at 0
    ],
)
def test_qa_f1(prediction: str, answers: list[str], expected: float) -> None:
    assert lb("narrativeqa")(prediction, answers) == pytest.approx(expected)


def test_first_line_rule_only_for_trec_triviaqa_samsum_lsht() -> None:
    pred = "\n\nParis\nLondon is wrong"
    assert lb("triviaqa")(pred, ["Paris"]) == 1.0  # cut to "Paris"
    # hotpotqa scores all of it: [paris london is wrong] vs [paris]: P 1/4, R 1 -> 0.4
    assert lb("hotpotqa")(pred, ["Paris"]) == pytest.approx(0.4)


def test_qa_f1_zh_uses_jieba_words() -> None:
    # jieba: 北京/是/中国/的/首都/。 ; "。" normalizes to "" and is dropped -> 5 words vs [北京]: P 1/5, R 1 -> 1/3
    assert lb("multifieldqa_zh")("北京是中国的首都。", ["北京"]) == pytest.approx(1 / 3)
    assert lb("multifieldqa_zh")("北京。", ["北京"]) == 1.0
    assert lb("multifieldqa_zh")("", ["北京"]) == 0.0


# -- LongBench: ROUGE ----------------------------------------------------------------------------------------
def test_rouge_l_of_the_rouge_package() -> None:
    # rouge 1.0.1 summary-level ROUGE-L counts distinct words: ref {the cat is on mat}, LCS union
    # {the cat on mat} -> R = P = 4/5, F = 0.8 (less its 1e-12 smoothing)
    assert lb("gov_report")("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(
        0.8, abs=1e-6
    )
    assert lb("qmsum")("", ["the cat is on the mat"]) == 0.0  # "Hypothesis is empty" -> 0
    assert lb("multi_news")("...", ["the cat"]) == 0.0


def test_samsum_scores_the_first_line_only() -> None:
    pred = "the cat sat on the mat\ncompletely unrelated words follow here"
    assert lb("samsum")(pred, ["the cat is on the mat"]) == pytest.approx(0.8, abs=1e-6)
    assert lb("gov_report")(pred, ["the cat is on the mat"]) < 0.7  # same text, no cut: precision drops


def test_rouge_zh_joins_jieba_words() -> None:
    assert lb("dureader")("今天天气很好", ["今天天气很好"]) == pytest.approx(1.0, abs=1e-6)
    # jieba: 今天天气/很/好 vs 今天天气/不好 -> LCS 今天天气: R 1/2, P 1/3 -> F 0.4
    assert lb("vcsum")("今天天气很好", ["今天天气不好"]) == pytest.approx(0.4, abs=1e-6)


# -- LongBench: classification -------------------------------------------------------------------------------
TREC_CLASSES = ["Abbreviation", "Entity", "Human being", "Location", "Numeric value"]


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Location", "Location", 1.0),
        ("Location or Human being", "Location", 0.5),  # two classes found, gold among them
        ("Entity", "Location", 0.0),
        ("location", "Location", 0.0),  # case-sensitive substring test
        ("\nLocation\nHuman being", "Location", 1.0),  # trec reads the first line only
        ("", "Location", 0.0),
    ],
)
def test_trec_classification(prediction: str, gold: str, expected: float) -> None:
    assert lb("trec")(prediction, [gold], all_classes=TREC_CLASSES) == expected


def test_classification_keeps_the_remove_while_iterating_quirk() -> None:
    classes = ["Human", "Being", "Human Being", "Location"]
    # matches [Human, Being, Human Being]; "Human" (substring of the gold) is removed, which makes the loop
    # skip "Being"; "Human Being" equals the gold and stays -> [Being, Human Being] -> 1/2 (not 1.0)
    assert longbench.classification_score("Human Being", "Human Being", all_classes=classes) == 0.5
    # gold first: [Human Being, Human, Being] -> Human removed,
    # Being skipped -> [Human Being, Being] -> 1/2
    assert (
        longbench.classification_score(
            "Human Being", "Human Being", all_classes=["Human Being", "Human", "Being"]
        )
        == 0.5
    )
    assert longbench.classification_score("Human Being", "Human Being", all_classes=["Human Being"]) == 1.0


def test_lsht_chinese_classes_and_missing_all_classes() -> None:
    classes = ["体育", "财经", "娱乐"]
    assert lb("lsht")("财经\n体育", ["财经"], all_classes=classes) == 1.0  # first line only
    assert lb("lsht")("财经或体育", ["财经"], all_classes=classes) == 0.5
    assert lb("lsht")("财经", ["财经"]) == 0.0  # no all_classes: nothing can match (the original raises)
    assert missing_field("longbench_lsht", ["财经"], {}) == "all_classes"
    assert missing_field("longbench_lsht", ["财经"], {"all_classes": classes}) is None


# -- LongBench: retrieval, count -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Paragraph 3", 1.0),
        ("Paragraph 3 and Paragraph 13", 0.5),  # numbers [3, 13]
        ("The answer is Paragraph 30", 0.0),  # "30" != "3"
        ("I do not know", 0.0),  # no number at all
        ("3", 1.0),
    ],
)
def test_passage_retrieval_en(prediction: str, expected: float) -> None:
    assert lb("passage_retrieval_en")(prediction, ["Paragraph 3"]) == expected


def test_passage_retrieval_zh_and_count() -> None:
    assert lb("passage_retrieval_zh")("段落5", ["段落5"]) == 1.0
    assert lb("passage_retrieval_zh")("答案是段落5，不是段落12", ["段落5"]) == 0.5
    assert lb("passage_retrieval_en")("Paragraph 3", ["no id here"]) == 0.0  # the original raises IndexError
    assert lb("passage_count")("There are 12 unique paragraphs out of 20.", ["12"]) == 0.5
    assert lb("passage_count")("12", ["12"]) == 1.0
    assert lb("passage_count")("twelve", ["12"]) == 0.0


# -- LongBench: code similarity ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("# set x\n    x = foo(1)\n", "    x = foo(1)", 1.0),  # comment line skipped
        ("```python\n// note\nreturn a+b;", "return a+b;", 1.0),  # backtick and // lines skipped
        ("\n\nreturn a+b;\nmore", "return a+b;", 1.0),  # leading newlines stripped first
        ("print(x)  # show", "print(x)", 0.0),  # the only line has '#': empty prediction scores 0
        ("", "", 1.0),  # fuzzywuzzy: equal strings are 100 before the empty-string check
        ("abcdexyz", "abcde123", 0.62),  # indel ratio 10/16 = 62.5 -> Python round half to even -> 62
        ("abcxyzuv", "abc12345", 0.38),  # 6/16 = 37.5 -> 38 (even)
    ],
)
def test_code_sim(prediction: str, gold: str, expected: float) -> None:
    assert lb("lcc")(prediction, [gold]) == expected
    assert lb("repobench-p")(prediction, [gold]) == expected


def test_fuzz_ratio_is_an_int_percentage() -> None:
    assert longbench.fuzz_ratio("abcd", "abce") == 75  # indel distance 2 over 8 characters
    assert longbench.fuzz_ratio("abc", "") == 0


# -- LongBench: aggregation ----------------------------------------------------------------------------------
def test_aggregate_and_longbench_e_buckets() -> None:
    assert longbench.aggregate([1.0, 0.0, 0.5]) == 50.0
    assert longbench.aggregate([1 / 3] * 3) == 33.33
    b = longbench.length_buckets([1.0, 0.0, 1.0, 0.5], [3999, 4000, 9000, 8000])
    assert b == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 75.0}
    assert (
        longbench.length_buckets([1.0], [100])["8k+"] != longbench.length_buckets([1.0], [100])["8k+"]
    )  # NaN


# -- ∞-Bench: retrieval --------------------------------------------------------------------------------------
def test_passkey_and_number_string_read_the_first_number_against_the_first_answer() -> None:
    for task in ("passkey", "number_string"):
        assert ib(task)("The pass key is 12345. Remember it.", ["12345"]) == 1.0
        assert ib(task)("Step 1: 12345", ["12345"]) == 0.0
        assert ib(task)("123456", ["12345"]) == 0.0
        assert ib(task)("12345", ["11111", "12345"]) == 0.0  # label[0] only
        assert ib(task)("", ["12345"]) == 0.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ('The value is "a1b2-c3".', 1.0),  # quotes and the period become spaces
        ("{key: a1b2-c3}", 1.0),
        ("a1b2-c3x", 0.0),  # must be a whole word
        ("a1b2-c3;", 0.0),  # ';' is not in the replaced set
        ("A1B2-C3", 0.0),  # case-sensitive
        ("", 0.0),
    ],
)
def test_kv_retrieval(prediction: str, expected: float) -> None:
    assert ib("kv_retrieval")(prediction, ["a1b2-c3"]) == expected


# -- ∞-Bench: QA, dialogue -----------------------------------------------------------------------------------
def test_longbook_qa_eng_is_max_f1_over_answers() -> None:
    # [answer is paris] vs [paris] -> P 1/3, R 1 -> 0.5 ; vs [city of paris] -> 1/3 ; max 0.5
    assert ib("longbook_qa_eng")("The answer is Paris.", ["Paris", "the city of Paris"]) == pytest.approx(0.5)
    assert ib("longbook_qa_eng")("", ["Paris"]) == 0.0


def test_longbook_qa_chn_is_character_f1() -> None:
    # chars 答案是北京 vs 北京: P 2/5, R 1 -> 4/7 (characters, not jieba words)
    assert ib("longbook_qa_chn")("答案是北京。", ["北京"]) == pytest.approx(4 / 7)
    assert ib("longbook_qa_chn")("北 京", ["北京"]) == 1.0  # whitespace removed


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("JOHN", ["JOHN"], 1.0),
        ("It is John.", ["JOHN"], 1.0),  # words upper-cased
        ("STAMP PAID", ["STAMP PAID"], 0.0),  # a two-word name is never one word (issue #18)
        ("Commander Bill Ecker", ["ECKER", "COMMANDER BILL ECKER"], 1.0),
        ("Ecker", ["BILL", "ECKER"], 0.0),  # first answer only
        ("Johnson", ["JOHN"], 0.0),
    ],
)
def test_longdialogue_qa_eng(prediction: str, answers: list[str], expected: float) -> None:
    assert ib("longdialogue_qa_eng")(prediction, answers) == expected


# -- ∞-Bench: multiple choice --------------------------------------------------------------------------------
BOOK_OPTIONS = ["Walking Georgie", "Swimming", "Reading books", "Dancing"]  # gold "Reading books" is C


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("C", 1.0),
        (" C. Reading books", 1.0),
        ("B", 0.0),
        ("The answer is C", 1.0),  # prefix "answer is" + one character, then "C"
        ("Answer: C", 0.0),  # starts with 'A', which is taken as the letter
        ("Reading books", 1.0),  # the option text itself
        ("the option is reading books", 0.0),  # after the prefix: neither "Reading books" nor "C" (case)
        ("I pick the correct one, which is C", 1.0),  # last resort: first word that is one of A-D
        ("Is it B or C?", 0.0),  # first such word is B
        ("My answer is:", 0.0),  # ends with the prefix
        ("", 0.0),  # InfLLM's scorer crashes here; the official one returns False
    ],
)
def test_longbook_choice_eng(prediction: str, expected: float) -> None:
    assert ib("longbook_choice_eng")(prediction, ["Reading books"], options=BOOK_OPTIONS) == expected


def test_choice_label_as_get_answer() -> None:
    assert infbench.choice_label(["Reading books"], BOOK_OPTIONS) == ["Reading books", "C"]
    assert infbench.choice_label(["Reading books", "C"], None) == [
        "Reading books",
        "C",
    ]  # InfLLM pred.py form
    assert ib("longbook_choice_eng")("C", ["Reading books", "C"]) == 1.0
    with pytest.raises(ValueError):
        ib("longbook_choice_eng")("C", ["Not an option"], options=BOOK_OPTIONS)
    assert missing_field("infbench_longbook_choice_eng", ["Reading books"], {}) == "options"
    assert missing_field("infbench_longbook_choice_eng", ["Reading books", "C"], {}) is None


CODE_OPTIONS = ["func_a", "func_b", "func_c", "func_d"]  # gold func_b is B


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B.", 1.0),
        ("B: func_b", 1.0),
        ("B", 0.0),  # a bare letter has no prefix: official scores 0
        ("The answer is: B", 1.0),
        ("The answer is B", 0.0),  # no colon: none of the official prefixes
        ("The correct option is: func_b", 1.0),  # "option" blanked, then "is:" + " " + "func_b"
        ("**answer:** B", 1.0),  # '*' blanked -> "answer: B"
        ("**Answer:** B", 0.0),  # prefixes are case-sensitive
        ("Option B", 0.0),
        ("The answer is: C", 0.0),
        ("The answer is:", 0.0),  # ends with the prefix
        ("", 0.0),
    ],
)
def test_code_debug_official(prediction: str, expected: float) -> None:
    assert ib("code_debug")(prediction, ["func_b"], options=CODE_OPTIONS) == expected


def test_code_debug_infllm_variant() -> None:
    infllm = get_metric("infbench_code_debug_infllm")
    assert infllm("The answer is B", ["func_b", "B"]) == 1.0  # its second prefix family
    assert infllm("The answer is: B", ["func_b", "B"]) == 1.0
    # no prefix: random.seed(fn_name); random.choice("ABCD"). "load_config" draws B, "parse_args" draws B too.
    opts = ["parse_args", "load_config", "x", "y"]
    state = random.getstate()
    assert infllm("no idea", ["load_config"], options=opts) == 1.0  # gold B, draw B
    assert infllm("no idea", ["parse_args"], options=opts) == 0.0  # gold A, draw B
    assert infllm("A", ["parse_args"], options=opts) == 0.0  # a bare correct letter still gets the draw
    assert random.getstate() == state  # the global generator is left alone
    # the first family cuts the text; "answer is:" at the very end -> that cut leaves "" -> False overall
    assert infllm("The answer is B, so the answer is:*", ["func_b", "B"]) == 0.0


# -- ∞-Bench: math and code ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The answer is 7.", ["7"], 1.0),
        ("The answer is 7.", [7], 1.0),  # raw int answers too
        ("7.5", ["7"], 0.0),  # int label, decimal first number: the original raises, here 0
        ("7.5", ["7.5"], 1.0),
        ("7.50 then 3", ["7.5"], 1.0),  # float compare
        ("-7", ["-7"], 0.0),  # no sign in the pattern: 7 != -7
        ("no number", ["7"], 0.0),
    ],
)
def test_math_find(prediction: str, answers: list, expected: float) -> None:
    assert ib("math_find")(prediction, answers) == expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("1, 3, -1, 5", [[1, 3, -1, 5]], 0.5),  # digit runs 1 3 1 5: third value -1 read as 1 -> stop after 2
        ("[1, 3, 5]", ["1", "3", "4"], 2 / 3),
        ("[1, 3, 5]", ["[1, 3, 4]"], 2 / 3),  # one string holding the list
        ("1 3 4 5 6", [1, 3, 4], 1.0),  # extra values are ignored
        ("3 1 4", [1, 3, 4], 0.0),  # the first value is wrong: nothing counts after it
        ("", [1, 3, 4], 0.0),
    ],
)
def test_math_calc(prediction: str, answers: list, expected: float) -> None:
    assert ib("math_calc")(prediction, answers) == pytest.approx(expected)


def test_math_calc_rejects_non_integer_answers() -> None:
    with pytest.raises(ValueError):
        infbench.math_calc_label(["1", "x"])


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The return value is -12.", ["-12"], 1.0),  # last word "-12" (sign kept, '.' blanked)
        ("The return value is -12.", [-12], 1.0),
        ("-12 is the answer", ["-12"], 0.0),  # last word "answer" is no int
        ("`7`", ["7"], 1.0),
        ("", ["7"], 0.0),
    ],
)
def test_code_run(prediction: str, answers: list, expected: float) -> None:
    assert ib("code_run")(prediction, answers) == expected


# -- ∞-Bench: summary ----------------------------------------------------------------------------------------
def test_rouge_lsum_union_lcs_by_hand() -> None:
    ref = "the cat sat on the mat\nit was happy"
    pred = "The cat was on the mat!\nit sat"
    # ref sentences [the cat sat on the mat] [it was happy] (m = 9), candidate [the cat was on the mat]
    # [it sat] (n = 8). Sentence 1: LCS with c1 = the cat on the mat, with c2 = sat -> union of all 6 tokens,
    # all counted.
    # Sentence 2: "was" (c1) and "it" (c2) -> 2 hits. hits 8: R = 8/9, P = 1, F = 16/17.
    assert infbench.rouge_lsum(pred, ref) == pytest.approx(16 / 17)
    assert ib("longbook_sum_eng")(pred, ["something else entirely", ref]) == pytest.approx(16 / 17)  # max
    assert ib("longbook_sum_eng")("", [ref]) == 0.0


def test_rouge_lsum_splits_sentences_on_newlines_only() -> None:
    # one line each: plain LCS "a b" of [a b c] and [c a b] -> R = P = 2/3
    assert infbench.rouge_lsum("c a b", "a b c") == pytest.approx(2 / 3)
    # on two lines the candidate's "c" matches the reference's "c" by the union -> all 3 hit
    assert infbench.rouge_lsum("c\na b", "a b c") == pytest.approx(1.0)
    # no double counting: the reference has one "a", the candidate two sentences with "a"
    assert infbench.rouge_lsum("a\na", "a") == pytest.approx(2 * 0.5 * 1 / 1.5)


# -- contract ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n in METRICS if n.startswith(("longbench_", "infbench_"))))
def test_every_scorer_returns_a_float_in_range_and_ignores_unknown_fields(name: str) -> None:
    fields = {"all_classes": ["x"], "options": ["x", "y", "z", "w"], "length": 123, "whatever": object()}
    answers = ["12"] if name == "infbench_math_calc" else ["x"]  # math_calc needs integer answers
    for pred in ("", "x", "A. x\nsecond line 12", "答案 12"):
        score = METRICS[name](pred, answers, **fields)
        assert isinstance(score, float) and 0.0 <= score <= 1.0
