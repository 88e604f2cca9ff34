"""RULER offline (hf_sparse_attn.eval.ruler): the scorer against RULER's published metric definitions, the
generators' templates, token-exact lengths, needle depths, determinism, vt chains, cwe / fwe frequencies.

Most tests use the word-level tokenizer of tests/tiny_checkpoint.py (no real data); those with the SmolLM2 tokenizer
load only its tokenizer files; those with the Wikipedia essay haystack are marked integration (real text)."""

from __future__ import annotations

import random
import re
import sys
from collections import Counter

import pytest

from hf_sparse_attn.eval import ruler
from hf_sparse_attn.eval.ruler import tasks as T
from hf_sparse_attn.eval.ruler.metrics import postprocess, string_match_all, string_match_part
from tiny_checkpoint import build_tokenizer


# ------------------------------------------------------------------------------------------------ reference metric
def _ref_post(s):  # RULER: strip, non-printable [\x00-\x1f] -> newline, strip
    return re.sub(r"[\x00-\x1f]", "\n", s.strip()).strip()


def _ref_all(preds, refs):
    total = sum(sum(1.0 if r.lower() in _ref_post(p).lower() else 0.0 for r in ref) / len(ref)
                for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


def _ref_part(preds, refs):
    total = sum(max(1.0 if r.lower() in _ref_post(p).lower() else 0.0 for r in ref) for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


CASES = [
    (["The answer is ABC and def."], [["abc", "DEF"]]),  # case-insensitive
    (["abc only"], [["abc", "def", "ghi", "jkl"]]),  # partial: 1 of 4
    (["", "   "], [["x"], ["y"]]),  # empty predictions
    (["\x00\x01 1234567 \x1f"], [["1234567"]]),  # non-printable stripped
    (["12\x0034"], [["1234"]]),  # a non-printable inside breaks the match (becomes a newline)
    (["alpha", "beta gamma", "nothing"], [["alpha"], ["gamma", "beta", "delta"], ["zzz", "nothing"]]),
    (["One", "two", "three"], [["one"], ["x"], ["x"]]),  # 1/3 -> 33.33 (rounded)
]


@pytest.mark.parametrize("preds,refs", CASES)
def test_scorer_equals_the_official_definitions(preds, refs):
    assert string_match_all(preds, refs) == _ref_all(preds, refs)
    assert string_match_part(preds, refs) == _ref_part(preds, refs)


def test_scorer_hand_computed_values():
    assert string_match_all(["The answer is ABC and def", "nothing"], [["abc", "DEF"], ["x"]]) == 50.0
    assert string_match_all(["abc"], [["abc", "zzz"]]) == 50.0
    assert string_match_part(["abc"], [["abc", "zzz"]]) == 100.0
    assert string_match_all(["One", "two", "three"], [["one"], ["x"], ["x"]]) == 33.33
    assert string_match_all(["12\x0034"], [["1234"]]) == 0.0
    assert postprocess("  \x07 key 42\tend \n") == "key 42\nend"
    # every generated task is scored with string_match_all
    assert ruler.score("niah_multivalue", ["1 and 2"], [["1", "2", "3", "4"]]) == 50.0
    assert ruler.score("passkey", ["12345"], [["12345"]]) == 100.0
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.score("nope", ["a"], [["a"]])
    with pytest.raises(ValueError):
        string_match_all([], [])
    with pytest.raises(ValueError):
        string_match_all(["a"], ["a"])  # references must be lists


# ------------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _count(tok, task, length, seed, index, depth, n, chat=True):
    build, _, _ = T._builder(task, tok, length, seed, index, depth)
    text, prefix, _, _ = build(random.Random(T._seed_int(task, length, seed, index, depth)), n)
    return len(T.encode_prompt(tok, text, prefix, chat))


def _key_of(prompt):
    return re.search(r"One of the special magic \w+ for (\S+) is:", prompt).group(1)


def test_public_api_shape(tok):
    assert ruler.TASKS == T.RULER_TASKS + ("passkey",)
    assert len(T.RULER_TASKS) == 11 and "qa_1" not in ruler.TASKS
    s = ruler.generate_sample("passkey", tok, 300, seed=1, index=2)
    assert isinstance(s, ruler.RulerSample)
    assert (s.id, s.task, s.length, s.max_new_tokens) == ("passkey/300/1/2", "passkey", 300, 16)
    assert s.prompt.endswith("What is the pass key? The pass key is") and s.depth == 20.0


@pytest.mark.parametrize("task,length", [("niah_single_1", 400), ("niah_multikey_2", 500), ("niah_multikey_3", 600),
                                         ("passkey", 300), ("vt", 900), ("cwe", 800), ("fwe", 400)])
def test_length_is_token_exact(tok, task, length):
    s = ruler.generate_sample(task, tok, length, seed=3, index=1)
    assert s.prompt_tokens + s.max_new_tokens <= length
    assert s.prompt_tokens == len(T.encode_prompt(tok, s.user_text, s.answer_prefix))
    # one more haystack unit would exceed the length
    assert _count(tok, task, length, 3, 1, None, s.haystack_units + 1) + s.max_new_tokens > length


def test_niah_singular_template_exactly(tok):
    s = ruler.generate_sample("niah_single_1", tok, 400, seed=0, index=0)
    key, value = _key_of(s.prompt), s.answers[0]
    assert re.fullmatch(r"\d{7}", value) and re.fullmatch(r"[a-z]+-[a-z]+", key)
    context = s.prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
    expected = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz "
                f"you about the number afterwards.\n{context}\nWhat is the special magic number for {key} mentioned "
                f"in the provided text? The special magic number for {key} mentioned in the provided text is")
    assert s.prompt == expected
    assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    lines = context.split("\n")
    assert lines.count(T.NOISE) == s.haystack_units and len(lines) == s.haystack_units + 1
    # the needle is formatted before the singular rewrite, as in the official generator: plural value type
    assert f"One of the special magic numbers for {key} is: {value}." in lines


def test_niah_plural_templates(tok):
    s = ruler.generate_sample("niah_multikey_3", tok, 600, seed=0, index=0)  # 1 query x 1 value: singular, uuid
    assert s.prompt.startswith("A special magic uuid is hidden") and s.prompt.endswith("provided text is")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answers[0])


def test_niah_multivalue_multiquery_on_an_essay(tok, monkeypatch):
    words = tuple(f"Word{i % 13} w{i}." if i % 7 == 6 else f"word{i % 17}" for i in range(20000))
    monkeypatch.setattr(T, "essay_words", lambda: words)
    s = ruler.generate_sample("niah_multivalue", tok, 900, seed=0, index=0)
    key = _key_of(s.prompt)
    assert s.prompt.startswith("Some special magic numbers are hidden within the following text. Make sure to "
                               "memorize it. I will quiz you about the numbers afterwards.\n")
    assert s.prompt.endswith(f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                             f"The special magic numbers for {key} mentioned in the provided text are")
    assert len(s.answers) == 4 and all(f"for {key} is: {v}." in s.prompt for v in s.answers)
    q = ruler.generate_sample("niah_multiquery", tok, 900, seed=0, index=0)
    keys = re.findall(r"One of the special magic numbers for (\S+) is:", q.prompt)
    assert len(keys) == 4 and len(q.answers) == 4
    query = re.search(r"What are all the special magic numbers for (.+?) mentioned in", q.prompt).group(1)
    assert re.fullmatch(r"\S+, \S+, \S+, and \S+", query) and set(query.replace(", and ", ", ").split(", ")) == set(keys)
    m = ruler.generate_sample("niah_multikey_1", tok, 900, seed=0, index=0)  # 4 keys, one asked
    assert len(re.findall(r"One of the special magic numbers for", m.prompt)) == 4 and len(m.answers) == 1


def test_needle_at_the_requested_depth(tok, monkeypatch):
    for depth in (0.0, 30.0, 70.0, 100.0):
        s = ruler.generate_sample("passkey", tok, 500, seed=0, index=0, depth=depth)
        before = s.prompt.split("The pass key is " + s.answers[0])[0].count(T.NOISE)
        assert abs(100 * before / s.haystack_units - depth) <= 100 / s.haystack_units
        assert s.depth == depth and abs(s.answer_depths[0] - depth) <= 100 / s.haystack_units
        n = ruler.generate_sample("niah_single_1", tok, 500, seed=0, index=0, depth=depth)
        lines = n.prompt.split("\n")
        at = next(i for i, line in enumerate(lines) if line.startswith("One of the special magic"))
        assert abs(100 * (at - 1) / n.haystack_units - depth) <= 100 / n.haystack_units  # line 0 is the intro
    words = tuple(f"Sentence number {i} ends here." for i in range(3000))
    monkeypatch.setattr(T, "essay_words", lambda: tuple(" ".join(words).split()))
    e = ruler.generate_sample("niah_single_2", tok, 900, seed=0, index=0, depth=40.0)
    sents = re.findall(r"Sentence number \d+ ends here\.", e.prompt)
    needle_at = e.prompt.index("One of the special magic")
    before = sum(1 for m in re.finditer(r"Sentence number \d+ ends here\.", e.prompt) if m.start() < needle_at)
    assert abs(before / len(sents) - 0.40) < 0.02
    with pytest.raises(ValueError, match="percentage"):
        ruler.generate_sample("passkey", tok, 500, seed=0, depth=150)


def test_passkey_prompt_exactly(tok):
    s = ruler.generate_sample("passkey", tok, 400, seed=0, index=0, depth=50.0)
    key = s.answers[0]
    half = s.haystack_units // 2
    assert s.haystack_units == 2 * half or s.haystack_units == 2 * half + 1
    before = round(s.haystack_units * 0.5)
    expected = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
                "quiz you about the important information there.\n" + " ".join([T.NOISE] * before)
                + f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
                + " ".join([T.NOISE] * (s.haystack_units - before)) + "\nWhat is the pass key? The pass key is")
    assert s.prompt == expected and s.answer_prefix == " The pass key is"


def test_passkey_cycles_through_the_eleven_depths(tok):
    depths = [ruler.generate_sample("passkey", tok, 300, seed=0, index=i).depth for i in range(12)]
    assert depths == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 0.0]
    keys = {ruler.generate_sample("passkey", tok, 300, seed=0, index=i).answers[0] for i in range(12)}
    assert len(keys) >= 11 and all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)


def test_deterministic_per_seed_and_index(tok):
    for task in ("niah_single_1", "vt", "fwe", "cwe"):
        length = 900
        a = ruler.generate_sample(task, tok, length, seed=5, index=3)
        b = ruler.generate_sample(task, tok, length, seed=5, index=3)
        assert a == b
        c = ruler.generate_sample(task, tok, length, seed=6, index=3)
        d = ruler.generate_sample(task, tok, length, seed=5, index=4)
        assert c.answers != a.answers and d.answers != a.answers


def test_vt_chain_is_correct(tok):
    s = ruler.generate_sample("vt", tok, 1200, seed=2, index=0)
    question = s.prompt.rsplit("Memorize and track the chain(s)", 1)[1]  # after the one-shot example
    value = re.search(r"assigned the value (\d{5}) in the text above", question).group(1)
    assigns = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})", question))
    assert len(assigns) == 5
    chain = [name for name, rhs in assigns.items() if rhs == value]
    while len(chain) < 5:
        chain.append(next(name for name, rhs in assigns.items() if rhs == f"VAR {chain[-1]}"))
    assert chain == s.answers
    assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, 5 "
                               f"variables are assigned the value {value}, they are: ")
    example = s.prompt.rsplit("Memorize and track the chain(s)", 1)[0]
    assert re.search(r"VAR [A-Z]{3} = \d{5}", example)  # the one-shot example: 3-letter names, answered


@pytest.mark.parametrize("length,common,rare", [(1500, 6, 1), (4096, 30, 3)])
def test_cwe_frequencies(tok, length, common, rare):
    s = ruler.generate_sample("cwe", tok, length, seed=0, index=0)
    question = s.prompt.rsplit("Below is a numbered list of words.", 1)[1]
    items = re.findall(r"(\d+)\. ([a-z][a-z' -]*?)(?= \d+\. |\nQuestion)", question)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = Counter(w for _, w in items)
    assert len(s.answers) == 10 and all(counts[w] == common for w in s.answers)
    assert set(counts.values()) == {common, rare} and len(counts) == s.haystack_units
    assert s.prompt.endswith("What are the 10 most common words in the above list? Answer: The top 10 words that "
                             "appear most often in the list are:")


def test_fwe_answers_are_the_three_most_frequent(tok):
    s = ruler.generate_sample("fwe", tok, 1500, seed=0, index=0)
    context = s.prompt.split("three most frequently appeared coded words. ", 1)[1].split("\nQuestion:", 1)[0]
    counts = Counter(context.split()).most_common()
    assert counts[0][0] == "..."
    assert [w for w, _ in counts[1:4]] == s.answers
    assert counts[1][1] > counts[2][1] > counts[3][1] > counts[4][1]


def test_bad_input_errors(tok, monkeypatch):
    with pytest.raises(ValueError, match="niah_single_1, .*passkey"):
        ruler.generate_sample("qa_1", tok, 4096, seed=0)
    with pytest.raises(ruler.LengthTooShortError, match="at least") as err:
        ruler.generate_sample("niah_single_1", tok, 60, seed=0)
    minimum = err.value.minimum
    s = ruler.generate_sample("niah_single_1", tok, minimum, seed=0)  # the minimum named is enough
    assert s.haystack_units == 1 and s.prompt_tokens + s.max_new_tokens <= minimum
    assert ruler.minimum_length("niah_single_1", tok, length=60) == minimum
    monkeypatch.setitem(sys.modules, "wonderwords", None)
    T._wonderwords_list.cache_clear()
    try:
        with pytest.raises(SystemExit, match=re.escape('pip install "hf_sparse_attn[ruler]"')):
            ruler.generate_sample("niah_single_1", tok, 400, seed=0)
        ruler.generate_sample("passkey", tok, 400, seed=0)  # no word lists needed
    finally:
        T._wonderwords_list.cache_clear()


def test_predict_greedy_on_a_tiny_model(tok):
    from tiny_checkpoint import tiny_llama

    model = tiny_llama(len(tok))
    s = ruler.generate_sample("passkey", tok, 200, seed=0)
    out = ruler.predict(model, tok, s)
    assert isinstance(out, str) and out == ruler.predict(model, tok, s)
    assert len(tok(out, add_special_tokens=False)["input_ids"]) <= s.max_new_tokens


# ------------------------------------------------------------------------------------------------ real tokenizer
@pytest.fixture(scope="module")
def smol_tok():
    from conftest import skip_without_real_weights

    skip_without_real_weights()
    from transformers import AutoTokenizer

    from hf_sparse_attn.eval.data import smollm2_path

    return AutoTokenizer.from_pretrained(str(smollm2_path()))


@pytest.mark.parametrize("task", ["niah_single_1", "passkey", "vt", "fwe"])
def test_token_exact_with_the_smollm2_tokenizer_and_its_chat_template(smol_tok, task):
    s = ruler.generate_sample(task, smol_tok, 4096, seed=0, index=5)
    assert s.chat_template
    chat = smol_tok.apply_chat_template([{"role": "user", "content": s.user_text}], tokenize=False,
                                        add_generation_prompt=True) + s.answer_prefix
    assert s.prompt_tokens == len(smol_tok(chat, add_special_tokens=False)["input_ids"])
    assert s.prompt_tokens + s.max_new_tokens <= 4096
    assert _count(smol_tok, task, 4096, 0, 5, None, s.haystack_units + 1) + s.max_new_tokens > 4096
    plain = ruler.generate_sample(task, smol_tok, 4096, seed=0, index=5, chat_template=False)
    assert not plain.chat_template and plain.haystack_units >= s.haystack_units
    assert plain.prompt_tokens + plain.max_new_tokens <= 4096


@pytest.mark.integration
def test_essay_haystack_is_wikipedia_and_token_exact(smol_tok):
    s = ruler.generate_sample("niah_single_2", smol_tok, 4096, seed=0, index=0)
    assert s.prompt_tokens + s.max_new_tokens <= 4096
    assert _count(smol_tok, "niah_single_2", 4096, 0, 0, None, s.haystack_units + 1) + s.max_new_tokens > 4096
    words = T.essay_words()
    assert " ".join(words[:30]) in s.prompt and "The grass is green" not in s.prompt
    assert s.prompt.count("One of the special magic numbers for") == 1
