"""LongBench metrics on hand-checked examples (en and zh), the official quirks that change numbers, the fuzzy ratio's
difflib path, LongBench-E buckets, averages and the "Attention is Naturally Sparse" Table 1 convention."""

import difflib
import json
import os
import random

import pytest

from hf_sparse_attn.eval.longbench import metrics as M
from hf_sparse_attn.eval.longbench.score import (
    comparison_table, length_bucket, sample_score, score_task, score_task_e, summarize, table1_row,
)
from hf_sparse_attn.eval.longbench.tasks import (
    LONGBENCH_E_TASKS, MODEL_MAX_LENGTH, TASKS, build_prompt, default_max_length, get_task,
)


def test_task_table_matches_longbench():
    assert len(TASKS) == 21 and len(LONGBENCH_E_TASKS) == 13
    assert {t: TASKS[t].max_new_tokens for t in ("narrativeqa", "multifieldqa_zh", "hotpotqa", "gov_report", "vcsum")} \
        == {"narrativeqa": 128, "multifieldqa_zh": 64, "hotpotqa": 32, "gov_report": 512, "vcsum": 512}
    assert not TASKS["lcc"].use_chat_template and TASKS["qasper"].use_chat_template
    assert TASKS["samsum"].stop_at_newline and TASKS["triviaqa"].first_line_only and not TASKS["hotpotqa"].first_line_only
    assert get_task("hotpotqa_e") is TASKS["hotpotqa"]
    assert default_max_length("THUDM/chatglm2-6b-32k", 32768) == 31500
    assert default_max_length("my-model", 8192) == 8192 - 512
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_normalization():
    assert M.normalize_answer("The  Eiffel-Tower, an icon!") == "eiffeltower icon"
    assert M.normalize_zh_answer("北京，是 首都！") == "北京是首都"


def test_qa_f1_en():
    # "eiffel tower paris" vs "eiffel tower": 2 common, P = 2/3, R = 1, F1 = 0.8
    assert M.qa_f1_score("The Eiffel Tower, Paris.", "Eiffel Tower") == pytest.approx(0.8)
    assert M.qa_f1_score("a the an", "x") == 0.0  # only articles -> no tokens
    assert M.qa_f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)  # multiset: P = 1/2, R = 1


def test_qa_f1_zh():
    # jieba: 北京/是/中国/的/首都/。 -> "。" dropped -> 5 words; gt 北京: P = 1/5, R = 1, F1 = 1/3
    assert M.qa_f1_zh_score("北京是中国的首都。", "北京") == pytest.approx(1 / 3)
    assert M.qa_f1_zh_score("北京", "北京。") == pytest.approx(1.0)


def test_rouge_en_is_the_rouge_package_summary_level():
    # rouge (pip) ROUGE-L: union LCS over unique words. ref {the, cat, on, mat} (4), hyp {the, cat, sat, on, mat}
    # (5), LCS words {the, cat, on, mat}: R = 1, P = 4/5, F = 2PR/(P+R) = 8/9 (rouge-score would give 10/11).
    assert M.rouge_score("the cat sat on the mat", "the cat on the mat") == pytest.approx(8 / 9, abs=1e-6)
    assert M.rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-6)


def test_rouge_exceptions_score_zero_like_the_official_code():
    assert M.rouge_score("", "a summary") == 0.0  # "Hypothesis is empty."
    assert M.rouge_score("...", "a summary") == 0.0  # splits into no sentence
    # rouge rebuilds the LCS recursively: a sentence of ~1000 words exceeds Python's default recursion limit and
    # the official code scores it 0. Same mechanism, cheaper: 400 words under a limit of 300.
    import sys

    long_sentence = " ".join(f"w{i}" for i in range(400))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        assert M.rouge_score(long_sentence, long_sentence) == 0.0  # RecursionError inside rouge -> 0, as official
    finally:
        sys.setrecursionlimit(limit)
    assert M.rouge_score(long_sentence, long_sentence) == pytest.approx(1.0, abs=1e-6)  # fits the default limit


def test_rouge_zh():
    # jieba: 今天天气/很/好 vs 今天天气/不错: LCS 1, P = 1/3, R = 1/2, F = 0.4
    assert M.rouge_zh_score("今天天气很好", "今天天气不错") == pytest.approx(0.4, abs=1e-6)


def test_classification_reproduces_official_quirks():
    classes = ["A", "AB", "ABC"]
    # official loop removes "A" (substring of the gt) and then skips "AB": matches = [AB, ABC] -> 1/2
    assert M.classification_score("ABC", "ABC", all_classes=classes) == 0.5
    assert M.classification_score("Animal or Entity", "Entity", all_classes=["Animal", "Entity", "Location"]) == 0.5
    assert M.classification_score("nothing", "Entity", all_classes=["Animal", "Entity"]) == 0.0  # no difflib fallback
    with pytest.raises(ValueError, match="all_classes"):
        M.classification_score("x", "y")


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert M.retrieval_score("no idea", "Paragraph 3") == 0.0
    assert M.retrieval_zh_score("答案是段落5和段落7", "段落5") == 0.5
    assert M.count_score("There are 12 unique paragraphs, not 13", "12") == 0.5
    with pytest.raises(ValueError, match="Paragraph"):
        M.retrieval_score("1", "3")


def test_code_sim_first_code_line():
    # first line without ` # //: "x = foo(1)"; difflib: 9 matches of 10+10 chars -> 90
    assert M.code_sim_score("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == pytest.approx(0.9)
    assert M.code_sim_score("\n\nreturn a\nreturn b", "return a") == 1.0
    assert M.code_sim_score("// only comments", "x") == 0.0  # empty line -> fuzz 0


def _lcs(a: str, b: str) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_fuzzy_ratio_is_difflib_not_levenshtein():
    # difflib greedily takes the longest block "b" (1 match); Levenshtein's ratio uses the LCS "ab" (2 matches)
    a, b = "bab", "acb"
    levenshtein_ratio = round(100 * 2 * _lcs(a, b) / (len(a) + len(b)))
    assert levenshtein_ratio == 67
    assert M.fuzzy_ratio(a, b) == 33
    # Python's round-half-even, as fuzzywuzzy's intr(): 1 match of 16 chars = 12.5 -> 12
    assert M.fuzzy_ratio("abcdefgh", "hijklmno") == 12
    assert M.fuzzy_ratio("", "") == 100 and M.fuzzy_ratio("", "x") == 0


def test_fuzzy_ratio_equals_fuzzywuzzy_on_its_difflib_path():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("python-Levenshtein installed: fuzzywuzzy no longer matches the official (difflib) numbers")
    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([3, 10, 40, 250])  # 250: difflib's autojunk heuristic kicks in at >= 200 chars
        a = "".join(rng.choice("abcd efg()") for _ in range(n))
        b = "".join(rng.choice("abcd efg()") for _ in range(rng.randint(1, n)))
        assert M.fuzzy_ratio(a, b) == fuzz.ratio(a, b)


def test_sample_and_task_scores():
    # first-line rule (leading newlines stripped) for trec/triviaqa/samsum/lsht only
    assert sample_score("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    assert sample_score("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(2 / 3)
    # max over reference answers
    assert sample_score("hotpotqa", "Paris France", ["Paris", "Paris France"]) == 1.0
    records = [{"pred": "Paris", "answers": ["Paris"]}, {"pred": "x", "answers": ["Paris"]},
               {"pred": "Paris London", "answers": ["Paris"]}]
    assert score_task("hotpotqa", records) == round(100 * (1 + 0 + 2 / 3) / 3, 2) == 55.56


def test_length_buckets():
    assert [length_bucket(x) for x in (0, 3999, 4000, 7999, 8000, 20000)] == \
        ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    records = [{"pred": "Paris", "answers": ["Paris"], "length": 100},
               {"pred": "x", "answers": ["Paris"], "length": 5000},
               {"pred": "Paris", "answers": ["Paris"], "length": 9000},
               {"pred": "y", "answers": ["Paris"], "length": 12000}]
    assert score_task_e("hotpotqa", records) == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}
    assert score_task_e("hotpotqa", records[:1]) == {"0-4k": 100.0, "4-8k": None, "8k+": None}


def test_summary_reproduces_published_english_average():
    # chatglm2-6b-32k published categories; one task per category carrying the category's score
    result = {"narrativeqa": 32.9, "hotpotqa": 33.7, "gov_report": 27.6, "trec": 59.1, "lcc": 52.7,
              "passage_count": 39.2, "dureader": 50.0}
    summary = summarize(result)
    assert summary["average"]["en"] == 40.87  # published 40.9
    assert summary["categories"]["zh"] == {"multi-doc QA": 50.0}


def test_table1_convention_reproduces_the_papers_exact_row():
    # "Attention is Naturally Sparse" Table 1 "0 (exact)": per-category SUMS 80.63 68.14 53.12 186.58 84.00 99.57, Average 95.34
    result = {"qasper": {"8k+": 40.0}, "multifieldqa_en": {"8k+": 40.63}, "hotpotqa": {"8k+": 34.07},
              "2wikimqa": {"8k+": 34.07}, "gov_report": {"8k+": 26.56}, "multi_news": {"8k+": 26.56},
              "trec": {"8k+": 62.19}, "triviaqa": {"8k+": 62.19}, "samsum": {"8k+": 62.2},
              "passage_count": {"8k+": 4.0}, "passage_retrieval_en": {"8k+": 80.0}, "lcc": {"8k+": 49.78},
              "repobench-p": {"8k+": 49.79}}
    row = table1_row(result)
    assert row["few-shot"] == 186.58 and row["code"] == 99.57 and row["Average"] == 95.34
    table = comparison_table([("exact", 0, result), ("sparse_hyper", 7, result)])
    assert "| 0 (exact) | 80.63 | 68.14 | 53.12 | 186.58 | 84.00 | 99.57 | 95.34 |" in table
    assert "| sparse_hyper-7 |" in table


def test_evaluate_metric_loads_from_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    evaluate = pytest.importorskip("evaluate")
    from hf_sparse_attn.eval.longbench.evaluate_metric import METRIC_PATH

    metric = evaluate.load(METRIC_PATH, "hotpotqa")
    out = metric.compute(predictions=["Paris", "the London city"], references=[["Paris", "Paris, France"], ["London"]],
                         lengths=[100, 9000])
    assert out == {"score": 83.33, "0-4k": 100.0, "4-8k": None, "8k+": 66.67}


# ------------------------------------------------------------------------------------------------ official tables
OFFICIAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "longbench_official")


def _official(name: str) -> dict:
    """One of the official release's config files (THUDM/LongBench config/*.json), copied unchanged."""
    with open(os.path.join(OFFICIAL, name), encoding="utf-8") as f:
        return json.load(f)


def test_prompt_templates_equal_the_official_release_byte_for_byte():
    official = _official("dataset2prompt.json")
    assert list(official) == list(TASKS)  # the same 21 tasks, in the release's order
    for task, template in official.items():
        assert TASKS[task].template.encode("utf-8") == template.encode("utf-8"), task
    # the release's typo is kept: "asconcisely" (no space) in both sentences of narrativeqa
    assert TASKS["narrativeqa"].template.count("asconcisely") == 2 and "as concisely" not in TASKS["narrativeqa"].template


def test_output_lengths_and_prompt_budgets_equal_the_official_release():
    assert {t: spec.max_new_tokens for t, spec in TASKS.items()} == _official("dataset2maxlen.json")
    assert MODEL_MAX_LENGTH == _official("model2maxlen.json")
    for model, budget in MODEL_MAX_LENGTH.items():
        assert default_max_length(f"THUDM/{model}", 100_000) == budget


def test_prompt_is_the_template_filled_by_str_format():
    sample = {"context": "C {x}", "input": "Q", "answers": ["a"]}
    prompt = build_prompt(TASKS["repobench-p"], sample)
    assert prompt == "Please complete the code given below. \nC {x}QNext line of code:\n"  # braces in data untouched
    with pytest.raises(ValueError, match="lacks field 'input'"):
        build_prompt(TASKS["hotpotqa"], {"context": "c"})
