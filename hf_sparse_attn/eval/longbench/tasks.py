"""The LongBench (v1) task table: metric, category, language, output length, prompt template, chat-template rule,
first-line rule and LongBench-E membership of each of the 21 tasks, plus the offline suite's tasks.

Facts from the official LongBench (v1) release (config/dataset2prompt.json, dataset2maxlen.json, model2maxlen.json,
pred.py, eval.py). The templates, output lengths and prompt budgets equal the release's JSON files byte for byte,
typos included; a copy of those files is kept in tests/data/longbench_official/ and
tests/test_longbench_metrics.py compares them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

CATEGORIES = ("single-doc QA", "multi-doc QA", "summarization", "few-shot", "synthetic", "code")

# Tasks that are scored on the first line of the prediction only (official eval.py).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
# Tasks whose prompt is NOT wrapped in the chat template (official pred.py: chat models do better without it).
NO_CHAT_TEMPLATE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})


@dataclass(frozen=True)
class TaskSpec:
    """One task. ``template`` is a ``str.format`` template over the sample's fields ({context}, {input})."""

    name: str
    metric: str  # key of metrics.METRICS
    category: str  # one of CATEGORIES
    language: str  # "en", "zh" or "code"
    max_new_tokens: int
    template: str
    in_longbench_e: bool = False
    offline: bool = False

    @property
    def use_chat_template(self) -> bool:
        return self.name not in NO_CHAT_TEMPLATE_TASKS

    @property
    def first_line_only(self) -> bool:
        return self.name in FIRST_LINE_TASKS

    @property
    def stop_at_newline(self) -> bool:
        """samsum generation also stops at a newline (the official run otherwise repeats "\\nDialogue")."""
        return self.name == "samsum"


_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)

_TEMPLATES = {
    "narrativeqa": (
        # "asconcisely" (no space, twice) is the official text: fixing it would change every model input
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the '
        "above article as concisely as you can, using a single phrase or sentence if possible. If the question "
        'cannot be answered based on the information in the article, write "unanswerable". If the question is a '
        'yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: '
        "{input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答："
    ),
    "hotpotqa": _QA_PASSAGES,
    "2wikimqa": _QA_PASSAGES,
    "musique": _QA_PASSAGES,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# name: (metric, category, language, max_new_tokens, in LongBench-E)
_TABLE = {
    "narrativeqa": ("qa_f1", "single-doc QA", "en", 128, False),
    "qasper": ("qa_f1", "single-doc QA", "en", 128, True),
    "multifieldqa_en": ("qa_f1", "single-doc QA", "en", 64, True),
    "multifieldqa_zh": ("qa_f1_zh", "single-doc QA", "zh", 64, False),
    "hotpotqa": ("qa_f1", "multi-doc QA", "en", 32, True),
    "2wikimqa": ("qa_f1", "multi-doc QA", "en", 32, True),
    "musique": ("qa_f1", "multi-doc QA", "en", 32, False),
    "dureader": ("rouge_zh", "multi-doc QA", "zh", 128, False),
    "gov_report": ("rouge", "summarization", "en", 512, True),
    "qmsum": ("rouge", "summarization", "en", 512, False),
    "multi_news": ("rouge", "summarization", "en", 512, True),
    "vcsum": ("rouge_zh", "summarization", "zh", 512, False),
    "trec": ("classification", "few-shot", "en", 64, True),
    "triviaqa": ("qa_f1", "few-shot", "en", 32, True),
    "samsum": ("rouge", "few-shot", "en", 128, True),
    "lsht": ("classification", "few-shot", "zh", 64, False),
    "passage_count": ("count", "synthetic", "en", 32, True),
    "passage_retrieval_en": ("retrieval", "synthetic", "en", 32, True),
    "passage_retrieval_zh": ("retrieval_zh", "synthetic", "zh", 32, False),
    "lcc": ("code_sim", "code", "code", 64, True),
    "repobench-p": ("code_sim", "code", "code", 64, True),
}

TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(name, metric, category, language, max_new, _TEMPLATES[name], in_e)
    for name, (metric, category, language, max_new, in_e) in _TABLE.items()
}
LONGBENCH_TASKS: tuple[str, ...] = tuple(TASKS)
LONGBENCH_E_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.in_longbench_e)

# Official prompt budget (tokens) per model, from LongBench v1 config/model2maxlen.json.
MODEL_MAX_LENGTH = {
    "llama2-7b-chat-4k": 3500,
    "longchat-v1.5-7b-32k": 31500,
    "xgen-7b-8k": 7500,
    "internlm-7b-8k": 7500,
    "chatglm2-6b": 31500,
    "chatglm2-6b-32k": 31500,
    "chatglm3-6b-32k": 31500,
    "vicuna-v1.5-7b-16k": 15500,
}
LONGEST_OUTPUT = max(spec.max_new_tokens for spec in TASKS.values())  # 512


def default_max_length(model_name: Optional[str], max_position_embeddings: Optional[int]) -> int:
    """Prompt budget in tokens: the official table when the model name (or the last part of its path) is in it,
    else the model's positions minus the longest output (512), so prompt + generation always fit."""
    if model_name:
        key = model_name.rstrip("/").split("/")[-1].lower()
        for name, length in MODEL_MAX_LENGTH.items():
            if key == name.lower():
                return length
    if not max_position_embeddings:
        raise ValueError("cannot infer the prompt budget: the model config has no max_position_embeddings; "
                         "pass --max-length")
    if max_position_embeddings <= 2 * LONGEST_OUTPUT:
        raise ValueError(f"the model has only {max_position_embeddings} positions, too few for LongBench; "
                         "pass --max-length explicitly")
    return max_position_embeddings - LONGEST_OUTPUT


# ----------------------------------------------------------------------------------------------------------------
# Offline suite tasks: names "<kind>_<K>k" (K = context size in thousands of tokens), e.g. "needle_middle_4k".

OFFLINE_KINDS = ("retrieval_en", "retrieval_zh", "count", "needle_start", "needle_middle", "needle_end")
_OFFLINE_TEMPLATES = {
    "retrieval_en": (
        "Here are {num_paragraphs} paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter "
        'the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", '
        '"Paragraph 2", etc.\n\nThe answer is: '
    ),
    "retrieval_zh": _TEMPLATES["passage_retrieval_zh"],
    "count": _TEMPLATES["passage_count"],
    "needle": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
}
_OFFLINE_NAME = re.compile(r"^(retrieval_en|retrieval_zh|count|needle_start|needle_middle|needle_end)_(\d+)k$")


def offline_task(name: str) -> TaskSpec:
    match = _OFFLINE_NAME.match(name)
    if not match:
        raise ValueError(f"not an offline task name: {name!r} (expected <kind>_<K>k with kind in {OFFLINE_KINDS})")
    kind = match.group(1)
    if kind.startswith("needle"):
        return TaskSpec(name, "qa_f1", "single-doc QA", "en", 32, _OFFLINE_TEMPLATES["needle"], offline=True)
    if kind == "count":
        return TaskSpec(name, "count", "synthetic", "en", 32, _OFFLINE_TEMPLATES["count"], offline=True)
    language = kind.split("_")[1]
    metric = "retrieval" if language == "en" else "retrieval_zh"
    return TaskSpec(name, metric, "synthetic", language, 32, _OFFLINE_TEMPLATES[kind], offline=True)


def get_task(name: str) -> TaskSpec:
    """A LongBench task by name (a trailing "_e" of the LongBench-E files is accepted) or an offline task."""
    if name in TASKS:
        return TASKS[name]
    if name.endswith("_e") and name[:-2] in TASKS:
        return TASKS[name[:-2]]
    if _OFFLINE_NAME.match(name):
        return offline_task(name)
    raise ValueError(f"unknown task {name!r}; LongBench tasks: {', '.join(LONGBENCH_TASKS)}; "
                     f"offline tasks look like 'needle_middle_4k' (kinds: {', '.join(OFFLINE_KINDS)})")


def build_prompt(spec: TaskSpec, sample: dict) -> str:
    """Fill the task's template from the sample's fields (LongBench samples have context, input, ...)."""
    try:
        return spec.template.format(**sample)
    except KeyError as err:
        raise ValueError(f"sample of task {spec.name} lacks field {err} needed by its prompt template; "
                         f"fields present: {sorted(sample)}") from None
