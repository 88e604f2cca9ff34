"""RULER's synthetic tasks, generated offline, and a pass key at a controlled depth.

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?": every sample is
generated, so the benchmark runs offline once its word lists and a haystack text are at hand. This module writes its
own generators from the published task definitions (the official release's ``synthetic.yaml`` arguments, templates,
answer prefixes and output lengths; see docs/ruler.md):

- ``niah_*`` (eight needle-in-a-haystack variants), ``vt`` (variable tracking), ``cwe`` (common words), ``fwe``
  (frequent coded words). qa_1 / qa_2 need SQuAD / HotpotQA, which cannot be downloaded here: left out.
- The official essay haystack (Paul Graham's essays, downloaded by a script) is replaced by the offline English
  Wikipedia articles (:func:`hf_sparse_attn.eval.data.wikipedia_articles`); every report names the substitution.
- Word lists (adjectives, nouns, verbs) come from the ``wonderwords`` package, as in the official release.
- ``passkey``: the classic pass-key retrieval test (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access
  Infinite Context Length for Transformers"): a 5-digit key in the repeated filler "The grass is green. ...", at a
  depth chosen by the caller (0-100 %), for depth x length heatmaps.

Length: a sample of length L is token-exact for the tokenizer it is given: the haystack is the largest (in units:
noise lines, words, list entries) for which ``tokens(model input) + max_new_tokens <= L``, found by binary search;
one more unit would exceed L. The model input is counted as :func:`encode_prompt` builds it (chat template or not),
so the sequence the model sees never exceeds L positions.

A sample is deterministic in (task, length, seed, index): every random draw comes from one ``random.Random`` seeded
by a hash of those four values, re-created for every haystack size tried, so the keys, values and answers do not
depend on the search.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = [
    "TASKS",
    "RULER_TASKS",
    "TASK_SPECS",
    "TaskSpec",
    "RulerSample",
    "PASSKEY_DEPTHS",
    "NOISE",
    "generate_sample",
    "sample_id",
    "encode_prompt",
    "minimum_length",
    "LengthTooShortError",
    "require_wonderwords",
    "needs_wonderwords",
    "essay_words",
]

WONDERWORDS_HINT = 'pip install "hf_sparse_attn[ruler]"'
# Raised whenever a change here changes the samples: run directories record it, so that a resume never mixes samples
# of two generator versions.
GENERATOR_VERSION = 2

# ----------------------------------------------------------------------------------------------- templates (official)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# Mohtashami & Jaggi 2023: the task description, the filler before the key, the key line, the filler after it and the
# question, one per line (the filler repeated with spaces between the repetitions)
PASSKEY_TEMPLATE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.\n{context}\nWhat is the pass key?")
PASSKEY_PREFIX = " The pass key is"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_DEPTHS = tuple(float(d) for d in range(0, 101, 10))  # 0, 10, ..., 100 %

# the 40 evenly spaced insertion depths of the essay haystack (official: np.round(np.linspace(0, 100, 40)))
ESSAY_DEPTHS = tuple(int(math.floor(100 * i / 39 + 0.5)) for i in range(40))


@dataclass(frozen=True)
class TaskSpec:
    """One task: its kind, generation arguments (RULER's synthetic.yaml) and output length."""

    name: str
    kind: str  # niah, vt, cwe, fwe, passkey
    max_new_tokens: int
    metric: str = "string_match_all"
    haystack: str = ""  # niah: noise, essay, needle
    type_k: str = ""  # niah key type: words, uuids
    type_v: str = ""  # niah value type: numbers, uuids
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    has_depth: bool = False  # a needle whose depth the heatmap shows


def _niah(name: str, haystack: str, type_k: str, type_v: str, num_k: int = 1, num_v: int = 1, num_q: int = 1) -> TaskSpec:
    return TaskSpec(name, "niah", 128, haystack=haystack, type_k=type_k, type_v=type_v, num_k=num_k, num_v=num_v,
                    num_q=num_q, has_depth=True)


TASK_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", num_k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", num_v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", num_k=4, num_q=4),
    TaskSpec("vt", "vt", 30),
    TaskSpec("cwe", "cwe", 120),
    TaskSpec("fwe", "fwe", 50),
    TaskSpec("passkey", "passkey", 16, has_depth=True),
)}

RULER_TASKS: tuple[str, ...] = tuple(n for n in TASK_SPECS if n != "passkey")  # the 11 official tasks without QA
TASKS: tuple[str, ...] = tuple(TASK_SPECS)  # those and passkey


@dataclass
class RulerSample:
    """One generated sample.

    ``prompt``: the full text fed to the model (task template with its context, then the answer prefix);
    ``answers``: the reference strings (string_match_all: every one must appear in the prediction);
    ``depth``: the needle depth in percent of the context (passkey: the depth asked for; niah: the depth of the
    first answer's needle; None for vt / cwe / fwe); ``answer_depths``: the depth of each answer's needle (niah,
    passkey). ``answer_prefix`` is the tail of ``prompt`` that follows the user turn when a chat template is
    applied; ``prompt_tokens`` counts the model input as :func:`encode_prompt` builds it with ``chat_template``."""

    id: str
    task: str
    length: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    depth: Optional[float]
    answer_prefix: str = ""
    answer_depths: Optional[list[float]] = None
    prompt_tokens: int = 0
    haystack_units: int = 0
    chat_template: bool = False
    index: int = 0
    seed: int = 0

    @property
    def user_text(self) -> str:
        """The prompt without its answer prefix (the user turn of a chat template)."""
        return self.prompt[: len(self.prompt) - len(self.answer_prefix)] if self.answer_prefix else self.prompt

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class LengthTooShortError(ValueError):
    """The length asked for cannot hold the task's template with the smallest haystack."""

    def __init__(self, task: str, length: int, minimum: int):
        self.task, self.length, self.minimum = task, length, minimum
        super().__init__(f"length {length} is too short for {task}: its template with the smallest haystack and "
                         f"{TASK_SPECS[task].max_new_tokens} output tokens needs at least {minimum} tokens with this "
                         f"tokenizer; use --lengths >= {minimum}")


# ----------------------------------------------------------------------------------------------- word lists and text
def needs_wonderwords(task: str) -> bool:
    """Tasks whose keys or word lists come from wonderwords."""
    spec = TASK_SPECS[task]
    return spec.kind == "cwe" or (spec.kind == "niah" and "words" in (spec.type_k, spec.type_v))


def require_wonderwords() -> Any:
    """The ``wonderwords.random_word`` module, or SystemExit naming the extra that installs it."""
    try:
        from wonderwords import random_word
    except ImportError:
        raise SystemExit("RULER's word lists come from the wonderwords package, which is not installed: "
                         f"{WONDERWORDS_HINT}") from None
    return random_word


@functools.lru_cache(maxsize=None)
def _wonderwords_list(name: str) -> tuple[str, ...]:
    random_word = require_wonderwords()
    return tuple(sorted(set(random_word._get_words_from_text_file(f"{name}list.txt"))))


def _cwe_words() -> tuple[str, ...]:
    """Nouns, adjectives and verbs of wonderwords, de-duplicated and sorted (official: the cwe word pool)."""
    return tuple(sorted(set(_wonderwords_list("noun") + _wonderwords_list("adjective") + _wonderwords_list("verb"))))


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay haystack's words: the offline English Wikipedia articles (standing in for Paul Graham's essays),
    prose lines only (lists, tables and headings dropped), in corpus order, split on whitespace as the official
    generator splits the essays."""
    from ..data import wikipedia_articles

    words: list[str] = []
    for _title, text in wikipedia_articles():
        for line in text.split("\n"):
            line = line.strip()
            if not line or line.startswith(("*", "|", "{", "=", "!", "#", ":", ";")):
                continue
            words.extend(line.split())
    return tuple(words)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _sentences(text: str) -> list[str]:
    """Sentences of plain text (a split after ., ! or ? followed by a capital, digit or quote)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


# ----------------------------------------------------------------------------------------------- random values
def _seed_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def sample_id(task: str, length: int, seed: int, index: int) -> str:
    return f"{task}/{length}/{seed}/{index}"


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return f"{rng.choice(_wonderwords_list('adjective'))}-{rng.choice(_wonderwords_list('noun'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


# ----------------------------------------------------------------------------------------------- builders
# A builder maps a haystack size n (in units) to (user text, answer prefix, answers, answer depths); it draws from the
# rng it is given, always in the same order, so that everything but the haystack is the same for every n.
Built = tuple[str, str, list[str], Optional[list[float]]]


def _niah_builder(spec: TaskSpec, depth: Optional[float]) -> tuple[Callable[[random.Random, int], Built], int, float]:
    def build(rng: random.Random, n: int) -> Built:
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[tuple[str, str]] = []  # (sentence, value)
        for _ in range(spec.num_k):
            key = _random_value(rng, spec.type_k)
            while key in keys:  # distinct keys, so that a query has one answer set
                key = _random_value(rng, spec.type_k)
            keys.append(key)
            vals = []
            for _ in range(spec.num_v):
                vals.append(_random_value(rng, spec.type_v))
                needles.append((NEEDLE.format(type_needle_v=spec.type_v, key=key, value=vals[-1]), vals[-1]))
            values.append(vals)
        rng.shuffle(needles)
        chosen = sorted(rng.sample(range(spec.num_k), spec.num_q))
        queries = [keys[i] for i in chosen]
        answers = [v for i in chosen for v in values[i]]
        value_depth: dict[str, float] = {}
        if spec.haystack == "essay":
            sents = _sentences(" ".join(essay_words()[:n]))
            if depth is None:
                positions = sorted(int(len(sents) * d / 100) for d in rng.sample(ESSAY_DEPTHS, len(needles)))
            else:
                positions = [int(len(sents) * depth / 100)] * len(needles)
            pieces, last = [], 0
            for (sentence, value), pos in zip(needles, positions):
                pieces.append(" ".join(sents[last:pos]))
                pieces.append(sentence)
                value_depth[value] = 100.0 * pos / max(len(sents), 1)
                last = pos
            pieces.append(" ".join(sents[last:]))
            context = " ".join(p for p in pieces if p)
        else:
            if spec.haystack == "noise":
                lines = [NOISE] * n
            else:  # needle: every line a distractor needle with its own random key and value
                lines = [NEEDLE.format(type_needle_v=spec.type_v, key=_random_value(rng, spec.type_k),
                                       value=_random_value(rng, spec.type_v)) for _ in range(n)]
            if depth is None:
                indexes = sorted(rng.sample(range(n), len(needles)), reverse=True)
            else:
                indexes = [min(n, int(round(n * depth / 100)))] * len(needles)
            for (sentence, value), index in zip(needles, indexes):
                lines.insert(index, sentence)
                value_depth[value] = 100.0 * index / n
            context = "\n".join(lines)
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, spec.type_v
        if spec.num_q * spec.num_v == 1:  # official singular rewrite (template and answer prefix alike)
            template, prefix = _singular(template), _singular(prefix)
            type_v = type_v[:-1]
        text = template.format(type_needle_v=type_v, context=context, query=query)
        return text, prefix.format(type_needle_v=type_v, query=query), answers, [value_depth[a] for a in answers]

    minimum = 1 if spec.haystack == "essay" else spec.num_k * spec.num_v
    per_unit = {"noise": 21.0, "needle": 22.0, "essay": 1.4}[spec.haystack]
    return build, minimum, per_unit


def _singular(template: str) -> str:
    """RULER's rewrite for one query x one value: Some -> A, are all -> is, are -> is, answers -> answer."""
    return (template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer"))


def _vt_text(rng: random.Random, n: int, name_len: int, num_hops: int = 4) -> tuple[str, str, list[str]]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    lines = [NOISE + "\n"] * n
    positions = sorted(rng.sample(range(len(lines)), len(chain)))
    for j, (pos, line) in enumerate(zip(positions, chain)):
        lines.insert(pos + j, line)
    context = "\n".join(lines).replace(". \n", ".\n")
    text = VT_TEMPLATE.format(context=context, query=value)
    return text, VT_PREFIX.format(num_v=num_hops + 1, query=value), names


def _vt_builder(spec: TaskSpec, tokenizer, icl_seed: int) -> tuple[Callable[[random.Random, int], Built], int, float]:
    example = _vt_example(tokenizer, icl_seed)

    def build(rng: random.Random, n: int) -> Built:
        text, prefix, names = _vt_text(rng, n, 5)
        return example + "\n\n" + text, prefix, names, None

    return build, 5, 22.0


def _vt_example(tokenizer, icl_seed: int) -> str:
    """The one-shot example the official generator puts before a vt question: a chain of 3-letter names in about
    500 tokens, its answer appended."""
    def build(n: int) -> str:
        text, prefix, names = _vt_text(random.Random(icl_seed), n, 3)
        return text + prefix + " " + " ".join(names)

    n = _largest_fit(lambda n: len(tokenizer(build(n), add_special_tokens=False)["input_ids"]), 500 - 30, 5, 16)
    return build(n)


def _cwe_list(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int,
              num_common: int = 10) -> tuple[str, list[str]]:
    words = rng.sample(_cwe_words(), num_words)
    common, uncommon = words[:num_common], words[num_common:]
    items = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common


def _cwe_builder(spec: TaskSpec, length: int) -> tuple[Callable[[random.Random, int], Built], int, float]:
    # official: below 4096 tokens fewer repeats (common 6, uncommon 1; example 20 words x 3 / 1), else 30 / 3
    # (example 40 words x 10 / 3)
    small = length < 4096
    repeats, example_args = ((6, 1), (20, 3, 1)) if small else ((30, 3), (40, 10, 3))

    def build(rng: random.Random, n: int) -> Built:
        example_context, example_answer = _cwe_list(rng, *example_args)
        example = (CWE_TEMPLATE.format(context=example_context) + CWE_PREFIX + " "
                   + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer)))
        context, answer = _cwe_list(rng, n, *repeats)
        return example + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer, None

    return build, 11, 4.0 * repeats[1]


def _zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus Euler-Maclaurin tail)."""
    n = 1000
    return sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha


def _fwe_builder(spec: TaskSpec, alpha: float = 2.0, vocab_size: int = 2000,
                 word_len: int = 6) -> tuple[Callable[[random.Random, int], Built], int, float]:
    z = _zeta(alpha)

    def build(rng: random.Random, n: int) -> Built:
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # the most frequent "word" is noise (the dots the question says to ignore)
        counts = [int(n * (k ** -alpha) / z) for k in range(1, len(words) + 1)]
        text_words = [w for w, c in zip(words, counts) for _ in range(c)]
        rng.shuffle(text_words)
        return FWE_TEMPLATE.format(context=" ".join(text_words)), FWE_PREFIX, words[1:4], None

    return build, 50, 1.2


def _passkey_builder(depth: float) -> tuple[Callable[[random.Random, int], Built], int, float]:
    def build(rng: random.Random, n: int) -> Built:
        key = str(rng.randint(10000, 99999))
        before = int(round(n * depth / 100))
        pieces = [" ".join([NOISE] * before), PASSKEY_NEEDLE.format(key=key), " ".join([NOISE] * (n - before))]
        context = "\n".join(p for p in pieces if p)
        return PASSKEY_TEMPLATE.format(context=context), PASSKEY_PREFIX, [key], [100.0 * before / n]

    return build, 1, 21.0


# ----------------------------------------------------------------------------------------------- length fitting
def encode_prompt(tokenizer, user_text: str, answer_prefix: str = "", chat_template: bool = True) -> list[int]:
    """Token ids of the model input: with ``chat_template`` and a tokenizer that has one, the user turn through
    ``apply_chat_template`` (generation prompt added), then the answer prefix, as the official release puts the
    answer prefix after a chat model's template; otherwise the plain prompt with the tokenizer's special tokens."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"])
    return list(tokenizer(user_text + answer_prefix, add_special_tokens=True)["input_ids"])


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def _largest_fit(count: Callable[[int], int], budget: int, n_min: int, n_guess: int) -> int:
    """The largest n >= n_min with count(n) <= budget (binary search between a fitting and an exceeding n);
    -1 if even n_min exceeds it. The n returned fits and n + 1 does not."""
    if count(n_min) > budget:
        return -1
    lo, hi = n_min, max(n_guess, n_min + 1)
    while count(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _builder(task: str, tokenizer, length: int, seed: int, index: int, depth: Optional[float]):
    spec = TASK_SPECS[task]
    if spec.kind == "niah":
        return _niah_builder(spec, depth)
    if spec.kind == "vt":
        return _vt_builder(spec, tokenizer, _seed_int("vt-example", length, seed, index))
    if spec.kind == "cwe":
        return _cwe_builder(spec, length)
    if spec.kind == "fwe":
        return _fwe_builder(spec)
    if spec.kind == "passkey":
        return _passkey_builder(PASSKEY_DEPTHS[index % len(PASSKEY_DEPTHS)] if depth is None else float(depth))
    raise ValueError(spec.kind)


def _check_task(task: str) -> TaskSpec:
    if task not in TASK_SPECS:
        raise ValueError(f"unknown RULER task {task!r}; the tasks are: {', '.join(TASKS)} (qa_1 / qa_2 are left out: "
                         "SQuAD and HotpotQA cannot be downloaded here)")
    return TASK_SPECS[task]


def generate_sample(task: str, tokenizer, length: int, *, seed: int, index: int = 0, depth: Optional[float] = None,
                    chat_template: bool = True) -> RulerSample:
    """Sample ``index`` of ``task`` at ``length`` tokens for ``tokenizer`` (deterministic in task, length, seed,
    index and depth).

    ``depth``: where the needle goes, in percent of the context (0 = start, 100 = end); None: the official random
    placement for niah, and for passkey the depths 0, 10, ..., 100 % in turn by ``index``. Ignored by vt / cwe /
    fwe. ``chat_template``: count the model input as :func:`predict` builds it with the same flag (the tokenizer's
    chat template applied when it has one), so that input + ``max_new_tokens`` <= ``length`` holds for what the
    model really sees. Raises ValueError for an unknown task, :class:`LengthTooShortError` (a ValueError naming the
    minimum) when ``length`` cannot hold the task at all."""
    spec = _check_task(task)
    if depth is not None and not 0 <= float(depth) <= 100:
        raise ValueError(f"depth {depth}: give a percentage in [0, 100]")
    if needs_wonderwords(task):
        require_wonderwords()
    build, n_min, tokens_per_unit = _builder(task, tokenizer, length, seed, index, depth)
    rng_seed = _seed_int(task, length, seed, index, depth)
    budget = length - spec.max_new_tokens
    cache: dict[int, tuple[Built, int]] = {}

    def count(n: int) -> int:
        if n not in cache:
            built = build(random.Random(rng_seed), n)
            cache[n] = (built, len(encode_prompt(tokenizer, built[0], built[1], chat_template)))
        return cache[n][1]

    n = _largest_fit(count, budget, n_min, max(n_min + 1, int(budget / tokens_per_unit)))
    if n < 0:
        raise LengthTooShortError(task, length, count(n_min) + spec.max_new_tokens)
    (text, prefix, answers, depths), tokens = cache[n]
    if spec.kind == "passkey":
        sample_depth: Optional[float] = PASSKEY_DEPTHS[index % len(PASSKEY_DEPTHS)] if depth is None else float(depth)
    else:
        sample_depth = depths[0] if depths else None
    return RulerSample(id=sample_id(task, length, seed, index), task=task, length=length, prompt=text + prefix,
                       answers=list(answers), max_new_tokens=spec.max_new_tokens, depth=sample_depth,
                       answer_prefix=prefix, answer_depths=depths, prompt_tokens=tokens, haystack_units=n,
                       chat_template=uses_chat_template(tokenizer, chat_template), index=index, seed=seed)


def minimum_length(task: str, tokenizer, *, chat_template: bool = True, length: int = 4096) -> int:
    """The smallest length that holds ``task`` (its template, the smallest haystack and its output tokens), with the
    settings a sample of ``length`` tokens uses (cwe repeats its words less below 4096 tokens), for one draw of the
    random keys and values (with a subword tokenizer another sample's may need a few tokens more or less)."""
    spec = _check_task(task)
    build, n_min, _ = _builder(task, tokenizer, length, 0, 0, None if spec.kind != "passkey" else 50.0)
    text, prefix, _, _ = build(random.Random(0), n_min)
    return len(encode_prompt(tokenizer, text, prefix, chat_template)) + spec.max_new_tokens

