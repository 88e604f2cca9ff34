"""LongBench harness: data formats (JSONL dir, data.zip, parquet), middle truncation, the chat-template rule, crash
safety (a real SIGKILL mid-run, then resume), shard merge, scoring a directory, and the offline suite generator.

Models are tiny random Llamas (2 layers, hidden 64) with a small byte-level BPE tokenizer trained here."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from hf_sparse_attn.eval.longbench.data import load_task
from hf_sparse_attn.eval.longbench.predict import (
    DuplicatePredictionError, PredictionWriter, build_inputs, merge_shards, pending_samples, predict_tasks,
    read_predictions, task_prediction_files, truncate_middle,
)
from hf_sparse_attn.eval.longbench.score import score_directory
from hf_sparse_attn.eval.longbench.tasks import TASKS, build_prompt, offline_task
from longbench_tiny import cli_env, samples, sentence, tiny_llama, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_sentence, _samples, _write_jsonl = sentence, samples, write_jsonl


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """(model_dir, model, tokenizer): tiny random Llama + byte-level BPE tokenizer with a chat template."""
    model_dir = str(tmp_path_factory.mktemp("tiny_llama"))
    model, tokenizer = tiny_llama(model_dir)
    return model_dir, model, tokenizer


# ------------------------------------------------------------------------------------------------ data formats
def test_load_jsonl_dir_zip_and_parquet_agree(tmp_path):
    rows = _samples("hotpotqa", 4)
    e_rows = _samples("hotpotqa", 3, seed=1)
    _write_jsonl(str(tmp_path / "dir" / "data" / "hotpotqa.jsonl"), rows)
    _write_jsonl(str(tmp_path / "dir" / "data" / "hotpotqa_e.jsonl"), e_rows)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        archive.writestr("data/hotpotqa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    from datasets import Dataset

    (tmp_path / "pq" / "hotpotqa").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "hotpotqa" / "test-00000-of-00001.parquet"))

    from_dir = load_task(str(tmp_path / "dir"), "hotpotqa")
    from_zip = load_task(str(tmp_path / "data.zip"), "hotpotqa")
    from_parquet = load_task(str(tmp_path / "pq"), "hotpotqa")
    assert from_dir == from_zip == rows
    assert [r["_id"] for r in from_parquet] == [r["_id"] for r in rows]
    assert [r["context"] for r in from_parquet] == [r["context"] for r in rows]
    assert load_task(str(tmp_path / "dir"), "hotpotqa", longbench_e=True) == e_rows
    assert len(load_task(str(tmp_path / "dir"), "hotpotqa", max_samples=2)) == 2
    with pytest.raises(FileNotFoundError, match="trec"):
        load_task(str(tmp_path / "dir"), "trec")


def test_samples_without_id_get_stable_unique_ids(tmp_path):
    rows = [{"input": "q", "context": "c", "answers": ["a"], "length": 1}] * 2
    _write_jsonl(str(tmp_path / "x" / "trec.jsonl"), rows)
    ids = [r["_id"] for r in load_task(str(tmp_path / "x"), "trec")]
    assert len(set(ids)) == 2 and ids == [r["_id"] for r in load_task(str(tmp_path / "x"), "trec")]


# ------------------------------------------------------------------------------------------------ prompts
def test_middle_truncation_keeps_both_ends(tiny_lm):
    _, _, tokenizer = tiny_lm
    prompt = " ".join(f"w{i}" for i in range(400))
    n_tokens = len(tokenizer(prompt)["input_ids"])
    assert truncate_middle(tokenizer, prompt, n_tokens) == prompt  # fits: untouched
    cut = truncate_middle(tokenizer, prompt, 100)
    assert cut.startswith("w0 w1 w2") and cut.endswith("w398 w399")
    assert " w200 " not in cut
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 100 + 2  # ~2 tokens merge at the seam
    head = tokenizer.decode(tokenizer(prompt)["input_ids"][:50], skip_special_tokens=True)
    assert cut.startswith(head)


def test_chat_template_rule(tiny_lm):
    _, _, tokenizer = tiny_lm
    sample = _samples("x", 1)[0]
    chat = tokenizer.decode(build_inputs(tokenizer, TASKS["hotpotqa"], sample, 10_000)["input_ids"][0])
    plain = tokenizer.decode(build_inputs(tokenizer, TASKS["triviaqa"], sample, 10_000)["input_ids"][0])
    assert "[USER]" in chat and chat.rstrip().endswith("[BOT]")
    assert "[USER]" not in plain and plain.startswith("<s>Answer the question based on the given passage.")
    no_chat = tokenizer.decode(build_inputs(tokenizer, TASKS["hotpotqa"], sample, 10_000, chat_template=False)["input_ids"][0])
    assert "[USER]" not in no_chat


# ------------------------------------------------------------------------------------------------ crash safety
def test_partial_last_line_is_repaired(tmp_path):
    path = str(tmp_path / "hotpotqa.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"pred": "a", "answers": ["a"], "_id": "1"}) + "\n" + '{"pred": "b", "ans')
    assert [r["_id"] for r in read_predictions(path)] == ["1"]  # the cut line is ignored by readers
    with PredictionWriter(path) as writer:  # and cut off before appending
        writer.write({"pred": "c", "answers": ["c"], "_id": "2"})
    with open(path) as f:
        assert [json.loads(line)["_id"] for line in f] == ["1", "2"]


def _run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hf_sparse_attn.cli", "longbench", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill(tiny_lm, tmp_path):
    model_dir, _, _ = tiny_lm
    data_dir, out = str(tmp_path / "data"), str(tmp_path / "out")
    hotpot, samsum = _samples("hotpotqa", 16), _samples("samsum", 3, seed=3)
    _write_jsonl(os.path.join(data_dir, "hotpotqa.jsonl"), hotpot)
    _write_jsonl(os.path.join(data_dir, "samsum.jsonl"), samsum)
    args = ["--model", model_dir, "--data", data_dir, "--tasks", "hotpotqa,samsum", "--out", out,
            "--method", "exact", "--layers", "1", "--max-length", "300", "--max-new-tokens", "6", "--no-progress"]
    pred_file = os.path.join(out, "hotpotqa.jsonl")

    proc = _run_cli(args)
    deadline = time.time() + 300
    lines = 0
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(pred_file):
            with open(pred_file, "rb") as f:
                lines = f.read().count(b"\n")
            if lines >= 3:
                break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0][-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(pred_file, "rb") as f:
        killed_lines = f.read().count(b"\n")
    assert 3 <= killed_lines < len(hotpot)

    from hf_sparse_attn.cli import main  # the rerun, in this process (saves a second interpreter start)

    assert main(["longbench", *args]) == 0
    for task, task_samples in (("hotpotqa", hotpot), ("samsum", samsum)):
        with open(os.path.join(out, f"{task}.jsonl"), encoding="utf-8") as f:
            raw = f.read()
        assert raw.endswith("\n")
        records = [json.loads(line) for line in raw.splitlines()]  # every line parses
        ids = [r["_id"] for r in records]
        assert ids == [s["_id"] for s in task_samples]  # all present, no duplicates, dataset order
        assert all(set(r) >= {"pred", "answers", "all_classes", "length"} for r in records)
    result = json.load(open(os.path.join(out, "result.json")))
    assert set(result) == {"hotpotqa", "samsum"} and all(0 <= v <= 100 for v in result.values())
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["plan"]["method"] == "exact" and summary["meta"]["layers"] and os.path.exists(os.path.join(out, "report.md"))


# ------------------------------------------------------------------------------------------------ sharding
def test_shards_merge_into_one_file_in_dataset_order(tiny_lm, tmp_path):
    _, model, tokenizer = tiny_lm
    samples = _samples("hotpotqa", 5)
    task_samples = {"hotpotqa": (dataclasses.replace(TASKS["hotpotqa"], max_new_tokens=6), samples)}
    out = str(tmp_path / "out")
    single = str(tmp_path / "single")
    predict_tasks(model, tokenizer, task_samples, single, 300, progress=False)
    pending = pending_samples(task_samples, out)  # computed once, before any process writes
    with pytest.raises(ValueError, match="pending"):
        predict_tasks(model, tokenizer, task_samples, out, 300, process_index=0, num_processes=2, progress=False)
    for rank in (1, 0):
        counts = predict_tasks(model, tokenizer, task_samples, out, 300, process_index=rank, num_processes=2,
                               progress=False, pending=pending)
        assert counts["predicted"] == (3 if rank == 0 else 2)
    files = task_prediction_files(out)["hotpotqa"]
    assert sorted(os.path.basename(p) for p in files) == ["hotpotqa.hfsa-part00-of-02.unset.jsonl",
                                                          "hotpotqa.hfsa-part01-of-02.unset.jsonl"]
    before = score_directory(out, write=False)  # the scorer merges parts itself
    merge_shards(out, "hotpotqa", order=[s["_id"] for s in samples])
    assert os.listdir(out) == ["hotpotqa.jsonl"]
    merged = read_predictions(os.path.join(out, "hotpotqa.jsonl"))
    reference = read_predictions(os.path.join(single, "hotpotqa.jsonl"))
    assert [r["_id"] for r in merged] == [s["_id"] for s in samples]
    assert [r["pred"] for r in merged] == [r["pred"] for r in reference]  # sharding does not change predictions
    assert score_directory(out, write=False) == before == score_directory(single, write=False)
    # a rerun with all ids done predicts nothing
    assert predict_tasks(model, tokenizer, task_samples, out, 300, progress=False)["predicted"] == 0


def test_resume_with_another_process_count_deals_out_only_the_missing_samples(tiny_lm, tmp_path):
    _, model, tokenizer = tiny_lm
    samples = _samples("hotpotqa", 7)
    task_samples = {"hotpotqa": (dataclasses.replace(TASKS["hotpotqa"], max_new_tokens=4), samples)}
    out = str(tmp_path / "out")
    pending = pending_samples(task_samples, out)
    predict_tasks(model, tokenizer, task_samples, out, 300, process_index=1, num_processes=2, pending=pending,
                  progress=False)  # process 0 of the 2 never ran: samples 0, 2, 4, 6 missing
    pending = pending_samples(task_samples, out)
    assert [sample_id for _, sample_id in pending] == [samples[i]["_id"] for i in (0, 2, 4, 6)]
    counts = [predict_tasks(model, tokenizer, task_samples, out, 300, process_index=r, num_processes=3,
                            pending=pending, progress=False) for r in range(3)]
    assert [c["predicted"] for c in counts] == [2, 1, 1]  # the 4 missing ones dealt out over 3 processes, 0 redone
    merge_shards(out, "hotpotqa", order=[s["_id"] for s in samples])
    assert [r["_id"] for r in read_predictions(os.path.join(out, "hotpotqa.jsonl"))] == [s["_id"] for s in samples]


def test_an_id_predicted_twice_is_refused_naming_it(tmp_path):
    first = {"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 1, "_id": "q-1", "seconds": 0.1}
    part0, part1 = "hotpotqa.hfsa-part00-of-02.abc.jsonl", "hotpotqa.hfsa-part01-of-02.abc.jsonl"
    _write_jsonl(str(tmp_path / part0), [first])
    _write_jsonl(str(tmp_path / part1), [dict(first, pred="b", seconds=0.2)])
    with pytest.raises(DuplicatePredictionError, match=rf"'q-1' in {part0}, {part1}"):
        score_directory(str(tmp_path), write=False)
    with pytest.raises(DuplicatePredictionError, match="q-1"):
        merge_shards(str(tmp_path), "hotpotqa")
    # two runs appending different predictions to one file are refused the same way
    _write_jsonl(str(tmp_path / "dup" / "trec.jsonl"), [dict(first, all_classes=["a"]),
                                                         dict(first, pred="Rome", all_classes=["a"], seconds=0.3)])
    with pytest.raises(DuplicatePredictionError, match="'q-1' in trec.jsonl"):
        score_directory(str(tmp_path / "dup"), write=False)
    # the same prediction twice (only its time differs) is harmless: counted once
    _write_jsonl(str(tmp_path / "same" / "trec.jsonl"), [dict(first, all_classes=["a"]),
                                                          dict(first, all_classes=["a"], seconds=0.3)])
    assert score_directory(str(tmp_path / "same"), write=False) == {"trec": 0.0}
    # an identical copy (a merge killed after writing <task>.jsonl, before removing the parts) counts once
    _write_jsonl(str(tmp_path / "copy" / "hotpotqa.jsonl"), [first])
    _write_jsonl(str(tmp_path / "copy" / part0), [first])
    assert score_directory(str(tmp_path / "copy"), write=False) == {"hotpotqa": 100.0}


def test_score_cli_on_official_layout(tmp_path):
    from hf_sparse_attn.cli import main

    _write_jsonl(str(tmp_path / "trec.jsonl"), [
        {"pred": "Entity\nLocation", "answers": ["Entity"], "all_classes": ["Entity", "Location"], "length": 100},
        {"pred": "Location", "answers": ["Entity"], "all_classes": ["Entity", "Location"], "length": 9000}])
    _write_jsonl(str(tmp_path / "passage_count.jsonl"), [{"pred": "3", "answers": ["3"], "all_classes": None, "length": 5000}])
    assert main(["longbench-score", str(tmp_path), "--e"]) == 0
    result = json.load(open(tmp_path / "result.json"))
    assert result == {"passage_count": {"0-4k": None, "4-8k": 100.0, "8k+": None},
                      "trec": {"0-4k": 100.0, "4-8k": None, "8k+": 0.0}}
    assert main(["longbench-score", str(tmp_path)]) == 0
    assert json.load(open(tmp_path / "result.json")) == {"passage_count": 100.0, "trec": 50.0}
    other = tmp_path / "other"
    _write_jsonl(str(other / "trec.jsonl"), [
        {"pred": "Location", "answers": ["Entity"], "all_classes": ["Entity", "Location"], "length": 9000}])
    with open(other / "summary.json", "w") as f:
        json.dump({"meta": {"method": "sparse_hyper", "layers": [3, 5, 7]}}, f)
    assert main(["longbench-score", str(tmp_path), "--e", "--compare", str(other)]) == 0
    table = (tmp_path / "comparison.md").read_text()
    assert "| 0 (exact) | – | – | – | 0.00 | – | – | 0.00 |" in table  # 8k+: trec 0, passage_count empty
    assert "| sparse_hyper-3 | – | – | – | 0.00 | – | – | 0.00 |" in table


# ------------------------------------------------------------------------------------------------ offline suite
def _sources():
    from hf_sparse_attn.eval.longbench.offline import TextSources

    rng = random.Random(1)
    articles = [(f"A{i}", "\n".join(" ".join(_sentence(rng, 8) for _ in range(3)) for _ in range(4))) for i in range(12)]
    chars = "中国人民日报北京新年经济发展城市农村工作会议今天记者报道"
    zh = "\n".join("".join(rng.choice(chars) for _ in range(40)) + "。" + "".join(rng.choice(chars) for _ in range(60)) + "。"
                   for _ in range(60))
    return TextSources(articles, zh, min_en_chars=100)


def test_offline_suite_is_deterministic_fits_its_budget_and_is_answerable(tiny_lm):
    from hf_sparse_attn.eval.longbench.offline import PROMPT_MARGIN, build_offline_suite
    from hf_sparse_attn.eval.longbench.score import sample_score

    _, _, tokenizer = tiny_lm
    sources = _sources()
    suite = build_offline_suite(tokenizer, (1,), num_samples=2, seed=0, sources=sources)
    assert suite == build_offline_suite(tokenizer, (1,), num_samples=2, seed=0, sources=sources)
    assert suite != build_offline_suite(tokenizer, (1,), num_samples=2, seed=1, sources=sources)
    assert set(suite) == {f"{k}_1k" for k in ("retrieval_en", "retrieval_zh", "count", "needle_start",
                                             "needle_middle", "needle_end")}
    for name, suite_samples in suite.items():
        spec = offline_task(name)
        for s in suite_samples:
            prompt_tokens = len(tokenizer(build_prompt(spec, s), add_special_tokens=False)["input_ids"])
            assert 1024 * 0.5 < prompt_tokens <= 1024 - PROMPT_MARGIN, (name, prompt_tokens)
            assert sample_score(name, s["answers"][0], s["answers"]) == 1.0  # the gold answer scores 100
            if name.startswith("retrieval"):
                marker = "Paragraph " if name == "retrieval_en_1k" else "段落"
                k = s["answers"][0].replace(marker, "")
                sep = ": " if marker == "Paragraph " else "："
                paragraph = s["context"].split(f"{marker}{k}{sep}")[1].split("\n\n")[0]
                assert s["input"] in paragraph
            elif name.startswith("count"):
                paragraphs = [p.split(": ", 1)[1] for p in s["context"].split("\n\n")]
                assert int(s["answers"][0]) == len(set(paragraphs)) < len(paragraphs)
            else:
                assert s["answers"][0] in s["context"]
                target = {"needle_start_1k": 0.05, "needle_middle_1k": 0.5, "needle_end_1k": 0.95}[name]
                assert abs(s["needle_depth"] - target) < 0.12
