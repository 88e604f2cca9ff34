"""ChatGLM end to end on a local remote-code checkpoint (tests/fixtures/chatglm: our own code, written from the
published interface of THUDM's ChatGLM2/3; tiny random weights written at test time), loaded the way the hub
checkpoints are: ``from_pretrained(dir, trust_remote_code=True)``, offline."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures", "chatglm"))
from write_checkpoint import write_checkpoint  # noqa: E402

from hf_sparse_attn import capture_attention, patch_model, rank_layers, unpatch_model  # noqa: E402
from hf_sparse_attn.cli import main as cli_main  # noqa: E402

LAYOUTS = [("chatglm2", "seq_first"), ("chatglm3", "batch_first")]
# directory names of the official model2maxlen table: the prompt budget then resolves to 31500 by name
DIR_NAMES = {"chatglm2": "chatglm2-6b-32k", "chatglm3": "chatglm3-6b-32k"}
# small enough that both methods serve a tiny model's calls instead of falling back to exact
FORCED = {
    "hyper": dict(block_size=16, sample_size=16, min_seq_len=16, causal_min_seq_len=16, num_sink_tokens=4),
    "sparse_hyper": dict(block_size=16, min_seq_len=16, causal_min_seq_len=16, num_sink_tokens=4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm")
    return {flavor: write_checkpoint(str(root / flavor / DIR_NAMES[flavor]), flavor, layout, initializer_range=0.3)
            for flavor, layout in LAYOUTS}


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def _padded_batch(tokenizer):
    enc = tokenizer(["The quick brown fox jumps over the lazy dog.", "Short one"], return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0  # left padding, as the ChatGLM tokenizers pad
    return enc


@pytest.mark.parametrize("flavor,layout", LAYOUTS)
def test_checkpoint_loads_through_auto_classes_only_with_trust_remote_code(checkpoints, flavor, layout):
    from transformers import AutoModel, AutoModelForCausalLM

    path = checkpoints[flavor]
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(path)
    model, tokenizer = _load(path)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__ == "ChatGLMForConditionalGeneration"
    assert model.config.architectures == ["ChatGLMModel"] and model.config.core_attention_layout == layout
    attention = model.transformer.encoder.layers[1].self_attention
    np_, ng, hn = 4, 2, 16
    assert attention.query_key_value.out_features == (np_ + 2 * ng) * hn  # [q | k | v], multi-query groups
    assert attention.core_attention.num_attention_heads_per_partition == np_
    assert hasattr(tokenizer, "build_prompt") == (flavor == "chatglm2")
    assert hasattr(tokenizer, "build_chat_input") == (flavor == "chatglm3")


@pytest.mark.parametrize("flavor,layout", LAYOUTS)
def test_generate_with_its_own_cache_matches_full_recompute(checkpoints, flavor, layout):
    model, tokenizer = _load(checkpoints[flavor])
    enc = _padded_batch(tokenizer)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        for _ in range(6):  # no cache: every step recomputes the whole sequence
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("flavor,layout", LAYOUTS)
def test_exact_patch_generates_identical_tokens(checkpoints, flavor, layout):
    model, tokenizer = _load(checkpoints[flavor])
    enc = _padded_batch(tokenizer)
    with torch.no_grad():
        logits_before = model(**enc).logits
    ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plan = patch_model(model, method="exact", layers="all")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out, ref)
    assert [layer.served for layer in plan.layers] == [1, 1, 1]  # the padded prefill, through the method
    assert plan.fallback_counts() == {}
    assert [layer.decode_served for layer in plan.layers] == [7, 7, 7]  # the padded decode steps: exact decode
    unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, logits_before)


@pytest.mark.parametrize("method", sorted(FORCED))
@pytest.mark.parametrize("flavor,layout", LAYOUTS)
def test_plan_serves_forced_fast_methods(checkpoints, flavor, layout, method):
    model, tokenizer = _load(checkpoints[flavor])
    ids = torch.randint(3, 150, (1, 1200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
        plan = patch_model(model, method=method, layers=2, select="weight_norm", **FORCED[method])
        fast = model(ids).logits
    assert plan.fallback_counts() == {}
    assert sorted(layer.layer_idx for layer in plan.layers if layer.served == 1) == sorted(rank_layers(model).order[:2])
    assert torch.isfinite(fast).all()
    assert ((fast - exact).norm() / exact.norm()).item() > 1e-4  # the approximation ran, not exact attention
    out = model.generate(input_ids=ids[:, :200], max_new_tokens=3, do_sample=False)  # decode steps fall back
    assert out.shape == (1, 203)
    unpatch_model(model)


@pytest.mark.parametrize("flavor,layout", LAYOUTS)
def test_capture_sees_queries_and_keys_after_the_rotary(checkpoints, flavor, layout):
    model, _ = _load(checkpoints[flavor])
    remote = sys.modules[type(model).__module__]
    ids = torch.randint(3, 150, (1, 40), generator=torch.Generator().manual_seed(1))
    block = model.transformer.encoder.layers[1]
    normed = []
    handle = block.input_layernorm.register_forward_hook(lambda m, a, out: normed.append(out))
    with torch.no_grad(), capture_attention(model, layers=[1]) as captured:
        model(ids)
    handle.remove()
    (call,) = captured[1]
    hidden = normed[0].transpose(0, 1) if layout == "seq_first" else normed[0]  # [b, s, hidden]
    with torch.no_grad():
        q, k, _ = block.self_attention.query_key_value(hidden).split([64, 32, 32], dim=-1)
    q, k = q.view(1, 40, 4, 16).transpose(1, 2), k.view(1, 40, 2, 16).transpose(1, 2)  # [b, heads, s, hn]
    cos, sin = model.transformer.rotary_pos_emb(torch.arange(40)[None])
    q_rot = remote.apply_rotary(q, cos[:, None], sin[:, None])
    k_rot = remote.apply_rotary(k, cos[:, None], sin[:, None]).repeat_interleave(2, dim=1)
    assert call.query.shape == (1, 4, 40, 16) and call.causal
    assert torch.allclose(call.query, q_rot, atol=1e-5) and torch.allclose(call.key, k_rot, atol=1e-5)
    assert torch.equal(call.query[..., 8:], q[..., 8:])  # the second half of each head is not rotated
    assert not torch.allclose(call.query[..., :8], q[..., :8], atol=1e-3)


def _refused_without_opt_in(argv, capsys) -> None:
    """The command fails with transformers' message asking for trust_remote_code (the CLI prints errors, or raises)."""
    try:
        code = cli_main(argv)
    except ValueError as err:
        assert "trust_remote_code" in str(err)
        return
    assert code != 0 and "trust_remote_code" in capsys.readouterr().err


def test_rank_command_needs_the_opt_in(checkpoints, tmp_path, capsys):
    path = checkpoints["chatglm2"]
    _refused_without_opt_in(["rank", path], capsys)
    out = tmp_path / "rank.json"
    assert cli_main(["rank", path, "--trust-remote-code", "--json", str(out)]) == 0
    model, _ = _load(path)
    assert json.loads(out.read_text())["order"] == rank_layers(model).order


@pytest.mark.parametrize("command", ["head-tail", "sparsity"])
def test_attention_audits_run_on_the_remote_checkpoint(checkpoints, tmp_path, capsys, command):
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(f"Sentence number {i} of a small corpus, long enough for a few prefixes." for i in range(3)))
    out = tmp_path / command
    argv = [command, "--model", checkpoints["chatglm3"], "--text", str(text), "--out", str(out), "--max-length", "60"]
    if command == "head-tail":
        argv += ["--min-prefix", "10", "--prefix-step", "10", "--scaling-step", "20"]
    else:
        argv += ["--k", "1", "4"]
    _refused_without_opt_in(argv, capsys)
    assert cli_main(argv + ["--trust-remote-code"]) == 0
    result = json.loads((out / ("head_tail.json" if command == "head-tail" else "sparsity.json")).read_text())
    assert result["sequences"] == 3  # every text, through all 3 layers (4 heads each) of the remote model
    if command == "head-tail":
        assert result["num_layers"] == 3 and result["num_heads"] == 4 and result["token_length"]["max"] == 60
        assert all(0 < ratio < float("inf") for layer in result["max_ratio"] for ratio in layer)
    else:
        assert result["layers"] == [0, 1, 2] and len(result["weight_norm_R"]) == 3


# ------------------------------------------------------------------------------------------------ LongBench
def _sample(task: str, context: str, length: int, index: int) -> dict:
    sample = {"context": context, "input": f"What is item {index}?", "answers": [f"item {index}"], "length": length,
              "all_classes": ["Location", "Number"] if task == "trec" else None, "_id": f"{task}-{index}"}
    return sample


def _long_context(chars: int) -> str:
    """A context of ``chars`` characters (one token per character) with markers at both ends and in the middle."""
    filler = "abcdefghij" * (chars // 10)
    middle = len(filler) // 2
    return "HEADMARK " + filler[:middle] + " MIDDLEMARK " + filler[middle:] + " TAILMARK"


@pytest.mark.parametrize("task", ["qasper", "trec"])
def test_longbench_chatglm2_prompt_official_truncation_at_31500(checkpoints, task):
    from hf_sparse_attn.eval.longbench.predict import build_inputs
    from hf_sparse_attn.eval.longbench.tasks import build_prompt, default_max_length, get_task

    _, tokenizer = _load(checkpoints["chatglm2"])
    budget = default_max_length(checkpoints["chatglm2"], None)
    assert budget == 31500  # official model2maxlen.json of chatglm2-6b-32k
    spec, sample = get_task(task), _sample(task, _long_context(40000), 12000, 0)
    inputs = build_inputs(tokenizer, spec, sample, budget)
    text = tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert "HEADMARK" in text and "TAILMARK" in text and "MIDDLEMARK" not in text
    wrapper = "[Round 1]\n\n问：" if spec.use_chat_template else ""
    closing = "\n\n答：" if spec.use_chat_template else ""
    assert text.startswith(wrapper) and text.endswith(closing)
    # budget counted with the [gMASK] sop prefix (tokenized with special tokens), which decoding drops
    assert inputs["input_ids"].shape[1] == 2 + len(wrapper) + (31500 // 2 - 2) + 31500 // 2 + len(closing)
    assert inputs["input_ids"][0, :2].tolist() == tokenizer.get_prefix_tokens()
    full = tokenizer(build_prompt(spec, sample))["input_ids"]
    kept = tokenizer.decode(full[:15750], skip_special_tokens=True) + tokenizer.decode(full[-15750:], skip_special_tokens=True)
    expected = tokenizer(tokenizer.build_prompt(kept) if spec.use_chat_template else kept)["input_ids"]
    assert inputs["input_ids"][0].tolist() == expected


def test_longbench_chatglm3_prompt_uses_build_chat_input(checkpoints):
    from hf_sparse_attn.eval.longbench.predict import build_inputs
    from hf_sparse_attn.eval.longbench.tasks import get_task

    _, tokenizer = _load(checkpoints["chatglm3"])
    inputs = build_inputs(tokenizer, get_task("qasper"), _sample("qasper", _long_context(40000), 12000, 0), 31500)
    ids = inputs["input_ids"][0].tolist()
    command = tokenizer.get_command
    assert ids[:3] == [command("[gMASK]"), command("sop"), command("<|user|>")] and ids[-1] == command("<|assistant|>")
    # truncation without special tokens (as the official script does for chatglm3): exactly 31500 prompt tokens
    assert len(ids) == 3 + 1 + 31500 + 1  # prefix + <|user|>, "\n", the prompt, <|assistant|>
    body = tokenizer.decode(ids[4:-1], skip_special_tokens=True)
    assert body.count("HEADMARK") == 1 and body.count("TAILMARK") == 1 and "MIDDLEMARK" not in body


def _write_longbench_e(directory, tasks_lengths: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    for task, contexts in tasks_lengths.items():
        with open(os.path.join(directory, f"{task}_e.jsonl"), "w", encoding="utf-8") as f:
            for index, (context, length) in enumerate(contexts):
                f.write(json.dumps(_sample(task, context, length, index), ensure_ascii=False) + "\n")


@pytest.mark.parametrize("flavor", ["chatglm2", "chatglm3"])
def test_longbench_command_runs_chatglm_with_sparse_hyper(checkpoints, tmp_path, capsys, flavor):
    data = tmp_path / "data"
    short = "Paragraph one. " * 80  # ~1200 tokens: no truncation, long enough for the forced method
    qasper = [(short, 9000)] + ([(_long_context(33000), 12000)] if flavor == "chatglm2" else [])  # one 31.5k prefill
    _write_longbench_e(data, {"qasper": qasper, "trec": [(short, 9100)]})
    out = tmp_path / "out"
    argv = ["longbench", "--model", checkpoints[flavor], "--data", str(data), "--e", "--tasks", "qasper,trec",
            "--out", str(out), "--max-new-tokens", "3", "--method", "sparse_hyper", "--layers", "2",
            "--no-progress"] + [f"--param={k}={v}" for k, v in FORCED["sparse_hyper"].items()]
    _refused_without_opt_in(argv, capsys)
    assert cli_main(argv + ["--trust-remote-code"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["max_length"] == 31500  # resolved from the model name, the official table
    records = {t: [json.loads(line) for line in open(out / f"{t}.jsonl")] for t in ("qasper", "trec")}
    _, tokenizer = _load(checkpoints[flavor])
    from hf_sparse_attn.eval.longbench.tasks import build_prompt, get_task

    prompt = build_prompt(get_task("qasper"), _sample("qasper", short, 9000, 0))
    if flavor == "chatglm2":  # the long sample: middle-truncated to the 31500-token budget, then build_prompt
        assert records["qasper"][1]["prompt_tokens"] == 2 + len("[Round 1]\n\n问：") + 15748 + 15750 + len("\n\n答：")
        assert records["qasper"][0]["prompt_tokens"] == len(tokenizer(tokenizer.build_prompt(prompt))["input_ids"])
    else:
        assert records["qasper"][0]["prompt_tokens"] == tokenizer.build_chat_input(prompt)["input_ids"].shape[1]
    assert records["trec"][0]["prompt_tokens"] == len(tokenizer(build_prompt(get_task("trec"), _sample("trec", short, 9100, 0)))["input_ids"])
    served = [layer for layer in summary["plan"]["layers"] if layer.get("method")]
    prefills = 3 if flavor == "chatglm2" else 2
    assert len(served) == 2 and all(layer["served"] == prefills for layer in served)  # every prefill via the method


# ------------------------------------------------------------------------------------------------ Table 1
def test_table1_config_runs_end_to_end_on_the_fixture(checkpoints, tmp_path):
    """The shipped Table 1 config, pointed at the fixture and shrunk: same arms, same selections, same method
    settings except the sizes that let the methods serve a 3-layer toy."""
    from hf_sparse_attn.commands.longbench_grid import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_path = os.path.join(root, "eval", "configs", "chatglm2_longbench_e_table1.toml")
    shipped = load_config(config_path)
    assert shipped["grid"] == {"methods": ["hyper", "sparse_hyper"], "layers": [7, 14, 21, 28],
                               "selections": ["weight_norm", "last"]}
    assert shipped["data"]["min_length"] == 8000 and shipped["predict"]["max_length"] == 31500
    assert len(shipped["data"]["tasks"]) == 13 and shipped["model"]["trust_remote_code"] is True

    data = tmp_path / "data"
    text = "Some words of context. " * 40  # ~900 tokens
    _write_longbench_e(data, {"qasper": [(text, 9000), (text, 3000)], "trec": [(text, 12000)],
                              "passage_count": [(text, 8500)]})
    out = tmp_path / "table1"
    sizes = [f"params.{m}.{k}={v}" for m in ("hyper", "sparse_hyper") for k, v in FORCED[m].items()]
    argv = ["longbench-grid", config_path, "--out", str(out), "--no-progress",
            "--set", f"model.path={checkpoints['chatglm2']}", "--set", "model.dtype=float32",
            "--set", f"data.path={data}", "--set", "data.tasks=['qasper','trec','passage_count']",
            "--set", "grid.layers=[1,3]", "--set", "predict.max_new_tokens_cap=2"]
    for item in sizes:
        argv += ["--set", item]
    assert cli_main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    assert list(rows) == ["exact"] + [f"{m}-{n}-{s}" for m in ("hyper", "sparse_hyper") for n in (1, 3)
                                      for s in ("weight_norm", "last")]
    assert all(row["samples"] == 3 for row in rows.values())  # the 3000-word qasper sample is not 8k+
    assert rows["sparse_hyper-1-last"]["layer_indices"] == [2]
    assert rows["sparse_hyper-1-weight_norm"]["layer_indices"] == rank_layers(_load(checkpoints["chatglm2"])[0]).order[:1]
    assert rows["hyper-3-last"]["same_as"] == "hyper-3-weight_norm"  # all layers: one run serves both selections
    for name, row in rows.items():
        if row["method"] and not row["same_as"]:
            plan = json.loads((out / name / "summary.json").read_text())["plan"]
            assert [layer["served"] for layer in plan["layers"] if layer.get("method")] == [3] * row["layers"]
        assert set(row["table1"]) >= {"single-qa", "few-shot", "synthetic", "Average"}
    markdown = (out / "table.md").read_text()
    assert "| exact |" in markdown and "95.34" in markdown  # the published exact average, next to ours
    assert "92.74" not in markdown  # published hyper numbers belong to 7..28 replaced layers, not to 1 or 3
    assert cli_main(argv) == 0  # the same command again resumes: nothing left to predict, same scores
    again = json.loads((out / "table.json").read_text())["rows"]
    assert all(row["this_invocation"]["predicted"] == 0 for row in again)
    assert [row["table1"] for row in again] == [row["table1"] for row in table["rows"]]


# ------------------------------------------------------------------------------------------------ lm-eval
def test_lm_eval_model_type_loads_the_remote_checkpoint(checkpoints):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from hf_sparse_attn.lm_eval import SparseHFLM
    from hf_sparse_attn.patching import current_plan

    request = [Instance(request_type="loglikelihood", doc={}, idx=0,
                        arguments=("The quick brown fox jumps over the lazy dog. " * 30, "Again"))]
    common = dict(pretrained=checkpoints["chatglm2"], trust_remote_code=True, batch_size=1, device="cpu")
    (unpatched, _), = SparseHFLM(**common, method="exact", layers=0).loglikelihood(request)
    exact_lm = SparseHFLM(**common, method="exact", layers="all")
    (exact, _), = exact_lm.loglikelihood(request)
    assert abs(exact - unpatched) < 1e-4 and [l.served for l in current_plan(exact_lm.model).layers] == [1, 1, 1]
    fast_lm = SparseHFLM(**common, method="sparse_hyper", layers=2, **FORCED["sparse_hyper"])
    (fast, _), = fast_lm.loglikelihood(request)
    plan = current_plan(fast_lm.model)
    assert sorted(l.served for l in plan.layers) == [0, 1, 1] and plan.fallback_counts() == {}
    assert fast != exact and abs(fast - exact) < 0.5 * abs(exact)


# ------------------------------------------------------------------------------------------------ bench model
@pytest.mark.parametrize("flavor,layout", LAYOUTS)
def test_bench_model_runs_chatglm_only_with_the_opt_in(checkpoints, tmp_path, capsys, flavor, layout):
    """`bench model` on the remote checkpoint: its LM head sits at transformer.output_layer and (seq_first) its base
    model returns [s, b, hidden]. Refused without --trust-remote-code; with it, sparse_hyper serves calls, every
    perplexity is finite and the exact cell's loss is the unpatched model's own loss on the same tokens."""
    from hf_sparse_attn.eval.data import wikipedia_articles
    from hf_sparse_attn.eval.bench import read_jsonl

    path, out, tokens = checkpoints[flavor], tmp_path / "bench", 96
    params = [f"sparse_hyper.{name}={value}" for name, value in FORCED["sparse_hyper"].items()]
    argv = ["bench", "model", "--model", path, "--out", str(out), "--tokens", str(tokens), "--articles", "2",
            "--methods", "sparse_hyper", "--layers", "0", "2", "--selections", "weight_norm", "--no-profile",
            "--no-progress", "--calibration-tokens", "32", *sum((["--method-param", p] for p in params), [])]
    _refused_without_opt_in(argv, capsys)
    assert not (out / "results.jsonl").exists() or not read_jsonl(str(out / "results.jsonl"))
    assert cli_main(argv + ["--trust-remote-code"]) == 0
    cells = {r["key"]: r for r in read_jsonl(str(out / "results.jsonl")) if r.get("kind") == "cell"}
    exact = cells[f"exact|N={tokens}|layers=0|none|seed=0"]
    fast = cells[f"sparse_hyper|N={tokens}|layers=2|weight_norm|seed=0"]
    assert all(math.isfinite(c["perplexity"]) and c["perplexity"] > 1 for c in cells.values())
    assert fast["served"] == 2 * 2 and fast["fallbacks"] == {}  # served every call: 2 layers x 2 articles
    assert fast["nll_sum"] != exact["nll_sum"]
    model, tokenizer = _load(path)
    texts = dict(wikipedia_articles())
    with torch.no_grad():
        for article in exact["per_article"]:
            ids = tokenizer(texts[article["title"]], return_tensors="pt").input_ids[:, :tokens]
            loss = model(ids, labels=ids).loss.item()  # mean over the N - 1 predicted tokens
            assert article["tokens"] == tokens - 1
            assert article["nll_sum"] / article["tokens"] == pytest.approx(loss, rel=1e-5)
    assert json.loads((out / "results.json").read_text())["model"] == f"{path} (fp32)"


def test_calibrate_command_runs_on_the_remote_checkpoint_only_with_the_opt_in(checkpoints, tmp_path, capsys):
    """calibrate measures every layer of the remote model through the ChatGLM adapter (each cell served by the
    method, with a finite output error) and writes a plan that patch_model applies to the reloaded model."""
    from hf_sparse_attn import PatchPlan

    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"sentence {i} of the calibration text." for i in range(40)))
    out = tmp_path / "plan.json"
    candidates = {"local": [{"window": 16, "num_sink_tokens": 4, "min_seq_len": 16}]}
    argv = ["calibrate", "--model", checkpoints["chatglm2"], "--text", str(text), "--budget", "0.5", "--tokens", "200",
            "--methods", "local", "--candidates", json.dumps(candidates), "--out", str(out)]
    _refused_without_opt_in(argv, capsys)
    assert cli_main(argv + ["--trust-remote-code"]) == 0
    plan = PatchPlan.load(out)
    cells = plan.calibration["cells"]
    assert sorted(c["layer"] for c in cells) == [0, 1, 2]
    assert all(c["served"] and 0 < c["error"] < float("inf") for c in cells)
    model, _ = _load(checkpoints["chatglm2"])
    applied = patch_model(model, plan=out)
    assert [e.layer_idx for e in applied.layers] == [e.layer_idx for e in plan.layers]
    unpatch_model(model)
