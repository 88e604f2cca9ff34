"""Fitting the Transformers ecosystem: attn_implementation="hf_sparse_attn" at load time, plans that travel with the
checkpoint (save_pretrained / hf_sparse_attn.from_pretrained), plan fingerprints and damaged plan files,
pipeline(), and `rank` on a checkpoint without tokenizer files."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import hf_sparse_attn
from hf_sparse_attn import PLAN_FILE_NAME, PlanError, current_plan, from_pretrained, patch_model, unpatch_model
from hf_sparse_attn.plan import model_fingerprint
from tiny_checkpoint import build_tokenizer, save_tiny_checkpoint, tiny_llama

HYPER_SMALL = dict(block_size=16, sample_size=16, min_seq_len=32, causal_min_seq_len=32, window=8, num_sink_tokens=4)  # serves at 64 tokens, approximately


def _padded_batch(vocab: int, n: int = 24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (2, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : n // 3] = 0  # left padding on the second row
    return ids, mask


def _bert_checkpoint(directory):
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4)).eval()
    model.save_pretrained(directory)
    return model


# ---- 1. registered at import ------------------------------------------------------------------------------------

def test_import_registers_attention_and_mask_functions():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hf_sparse_attn.patches.masks import compact_mask

    assert "hf_sparse_attn" in ALL_ATTENTION_FUNCTIONS.valid_keys()
    assert ALL_MASK_ATTENTION_FUNCTIONS["hf_sparse_attn"] is compact_mask  # without one padding would vanish


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attn_implementation_loads_and_is_bit_identical_to_sdpa(tmp_path, family):
    if family == "llama":
        save_tiny_checkpoint(tmp_path)
        auto, vocab = T.AutoModelForCausalLM, len(build_tokenizer())
    else:
        _bert_checkpoint(tmp_path)
        auto, vocab = T.AutoModel, 101
    ours = auto.from_pretrained(tmp_path, attn_implementation="hf_sparse_attn").eval()
    sdpa = auto.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert ours.config._attn_implementation == "hf_sparse_attn"
    ids, mask = _padded_batch(vocab)
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask}, {}):
            a, b = ours(ids, **kwargs), sdpa(ids, **kwargs)
            a = a.logits if family == "llama" else a.last_hidden_state
            b = b.logits if family == "llama" else b.last_hidden_state
            assert torch.equal(a, b), kwargs
    # from_config too
    fresh = auto.from_config(T.AutoConfig.from_pretrained(tmp_path), attn_implementation="hf_sparse_attn")
    assert fresh.config._attn_implementation == "hf_sparse_attn"


def test_model_loaded_with_hf_sparse_attn_patches_and_unpatches(tmp_path):
    save_tiny_checkpoint(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hf_sparse_attn").eval()
    sdpa = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = sdpa(ids).logits
        plan = patch_model(model, method="hyper", layers=[1], **HYPER_SMALL)
        patched = model(ids).logits
        assert plan.layer(1).served == 1 and not torch.equal(patched, before)
        unpatch_model(model)
        assert model.config._attn_implementation == "hf_sparse_attn"
        assert torch.equal(model(ids).logits, before)


# ---- 2. plans travel with the checkpoint -------------------------------------------------------------------------

def _patched_checkpoint(tmp_path):
    src = tmp_path / "plain"
    model, tok = save_tiny_checkpoint(src)
    model = T.AutoModelForCausalLM.from_pretrained(src).eval()
    plan = patch_model(model, method="hyper", layers=[0, 2], **HYPER_SMALL)
    ids = torch.randint(4, len(tok), (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    out = tmp_path / "patched"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return src, out, model, plan, ids, logits


def test_save_pretrained_writes_plan_beside_unchanged_weights(tmp_path):
    src, out, model, plan, _ids, _ = _patched_checkpoint(tmp_path)
    saved = json.loads((out / PLAN_FILE_NAME).read_text())
    assert [l["method"] for l in saved["layers"]] == ["hyper", None, "hyper"]
    assert all(l["served"] == 0 and l["fallbacks"] == {} for l in saved["layers"])  # run-time counters are not saved
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((out / "config.json").read_text())
    assert "hf_sparse_attn" not in json.dumps(config)
    assert T.AutoModelForCausalLM.from_pretrained(out).config._attn_implementation == "sdpa"  # a plain load: unpatched
    unpatch_model(model)
    model.save_pretrained(tmp_path / "after_unpatch")
    assert not (tmp_path / "after_unpatch" / PLAN_FILE_NAME).exists()


@pytest.mark.parametrize("kwargs", [{}, {"dtype": torch.bfloat16}, {"device_map": "cpu"}], ids=["fp32", "bf16", "device_map"])
def test_from_pretrained_reapplies_the_saved_plan(tmp_path, kwargs):
    _src, out, _model, plan, ids, logits = _patched_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plan fits without strict=False whatever the dtype
        reloaded = from_pretrained(out, auto_class=T.AutoModelForCausalLM, **kwargs)
    again = current_plan(reloaded)
    assert again is not None and again.patched_layers == [0, 2]
    assert [l.params for l in again.layers] == [l.params for l in plan.layers]
    if kwargs.get("dtype") == torch.bfloat16:
        assert reloaded.dtype == torch.bfloat16
        assert model_fingerprint(reloaded)["qk_sha256"] == plan.model_fingerprint["qk_sha256"]
    with torch.no_grad():
        new_logits = reloaded(ids).logits
    assert again.layer(0).served == 1 and again.layer(2).served == 1
    if not kwargs:
        assert torch.equal(new_logits, logits)  # same weights, same plan and seed: same hashes, same output


def test_from_pretrained_without_plan_loads_unpatched_with_a_message(tmp_path, caplog):
    save_tiny_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_sparse_attn"):
        model = from_pretrained(tmp_path)
    assert current_plan(model) is None and model.config._attn_implementation == "sdpa"
    assert "loaded unpatched" in caplog.text and PLAN_FILE_NAME in caplog.text


def test_plan_fits_whatever_dtype_and_runtime_config(tmp_path):
    model = tiny_llama(101)
    plan = patch_model(model, method="exact", layers=[1])
    plan.save(tmp_path / "plan.json")
    unpatch_model(model)
    for dtype in (torch.bfloat16, torch.float16):
        other = tiny_llama(101).to(dtype)  # same seed: same weights, stored at another precision
        other.config.use_cache = False
        other.config.output_hidden_states = True
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert patch_model(other, plan=tmp_path / "plan.json").patched_layers == [1]


def test_plan_for_other_weights_or_layout_is_refused_naming_the_difference(tmp_path):
    plan = patch_model(tiny_llama(101, seed=0), method="exact", layers=[1])
    plan.save(tmp_path / "plan.json")
    other = tiny_llama(101, seed=1)
    with pytest.raises(PlanError, match=r"plan\.json.*Q/K weights"):
        patch_model(other, plan=tmp_path / "plan.json")
    with pytest.warns(UserWarning, match="Q/K weights.*strict=False"):
        assert patch_model(other, plan=tmp_path / "plan.json", strict=False).patched_layers == [1]
    unpatch_model(other)
    torch.manual_seed(0)
    mha = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=4)).eval()
    with pytest.raises(PlanError, match="head layout"):
        patch_model(mha, plan=plan)
    torch.manual_seed(0)
    mistral = T.MistralForCausalLM(T.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                   sliding_window=None)).eval()
    with pytest.raises(PlanError, match="architecture: plan 'LlamaForCausalLM', model 'MistralForCausalLM'"):
        patch_model(mistral, plan=plan)
    with pytest.raises(PlanError, match=r"layer index\(es\) \[2\] do not exist .* layers 0..1"):
        patch_model(tiny_llama(101, num_layers=2), plan=plan)
    with pytest.raises(PlanError, match=r"layer\(s\) \[3\] have no entry in the plan"):
        patch_model(tiny_llama(101, num_layers=4), plan=plan, strict=False)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_damaged_plan_files_get_errors_naming_file_and_problem(tmp_path):
    model = tiny_llama(101)
    plan = patch_model(model, method="exact", layers=[1])
    unpatch_model(model)
    good = plan.to_dict()
    text = json.dumps(good)
    cases = {
        "empty.json": ("", "is empty"),
        "truncated.json": (text[: len(text) // 2], "not valid JSON.*truncated"),
        "unknown_key.json": (json.dumps({**good, "methd": "exact"}), r"unknown key\(s\) \['methd'\]"),
        "missing_key.json": (json.dumps({k: v for k, v in good.items() if k != "layers"}), r"lacks the key\(s\) \['layers'\]"),
        "layer_key.json": (json.dumps({**good, "layers": [{k: v for k, v in l.items() if k != "rank"} for l in good["layers"]]}),
                           r"layer entry 0 lacks the key\(s\) \['rank'\]"),
        "layer_missing_index.json": (json.dumps({**good, "layers": [{**l, "layer_idx": 7 if l["layer_idx"] == 2 else l["layer_idx"]}
                                                                   for l in good["layers"]]}), r"layer index\(es\) \[7\] do not exist"),
        "duplicate.json": (json.dumps({**good, "layers": good["layers"] + good["layers"][:1]}), "layer_idx 0 appears twice"),
        "not_object.json": ("[1, 2]", "a plan is a JSON object"),
    }
    for name, (content, problem) in cases.items():
        path = _write(tmp_path / name, content)
        with pytest.raises(PlanError, match=f"{name}.*{problem}|{problem}.*{name}") as err:
            patch_model(model, plan=path)
        assert name in str(err.value), name
        assert current_plan(model) is None  # nothing half-applied


def test_reordered_layer_list_is_matched_by_layer_idx(tmp_path):
    model = tiny_llama(101)
    ids = torch.randint(4, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    plan = patch_model(model, method="hyper", layers=[0], **HYPER_SMALL)
    with torch.no_grad():
        expected = model(ids).logits
    unpatch_model(model)
    data = plan.to_dict()
    data["layers"] = data["layers"][::-1]  # layer 0's entry is now last
    path = _write(tmp_path / "reordered.json", json.dumps(data))
    again = patch_model(model, plan=path)
    assert again.patched_layers == [0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert again.layer(0).served == 1 and again.layer(2).served == 0


def test_served_zero_is_shown_prominently():
    model = tiny_llama(101)
    plan = patch_model(model, method="hyper", layers=[0, 1], min_seq_len=4096)
    assert "served 0" not in str(plan)  # not run yet: nothing to warn about
    with torch.no_grad():
        model(torch.randint(4, 100, (1, 16)))
    text = str(plan)
    assert text.splitlines()[1].startswith("!! served 0 in every patched layer")
    assert "seq_len < min_seq_len=4096" in text.splitlines()[1]


# ---- 3. pipeline() -------------------------------------------------------------------------------------------------

def test_text_generation_pipeline_with_patched_and_reloaded_models(tmp_path):
    _src, out, model, plan, _ids, _ = _patched_checkpoint(tmp_path)
    tok = build_tokenizer()
    prompt = " ".join(["the old king sees a small red bird near the river"] * 6)  # 66 tokens: the prefill is served
    generate = dict(max_new_tokens=6, do_sample=False)
    plan.reset_counts()
    text = T.pipeline("text-generation", model=model, tokenizer=tok)(prompt, **generate)[0]["generated_text"]
    assert text.startswith(prompt) and len(text[len(prompt):].split()) == 6  # six new words
    assert plan.layer(0).served == 1  # the prefill ran the method ...
    assert plan.layer(0).decode_served == 5 and plan.layer(0).fallbacks == {}  # ... every decode step its decode method
    reloaded = from_pretrained(out)
    text_reloaded = T.pipeline("text-generation", model=reloaded, tokenizer=tok)(prompt, **generate)[0]["generated_text"]
    assert text_reloaded == text and current_plan(reloaded).layer(2).served == 1


# ---- 7. rank without tokenizer files -------------------------------------------------------------------------------

def test_rank_command_on_checkpoint_without_tokenizer(tmp_path, capsys):
    from hf_sparse_attn.cli import main

    model, _ = save_tiny_checkpoint(tmp_path, with_tokenizer=False)
    assert not (tmp_path / "tokenizer.json").exists()
    assert main(["rank", str(tmp_path), "--json", str(tmp_path / "rank.json")]) == 0
    ranking = json.loads((tmp_path / "rank.json").read_text())
    assert ranking["weight_norms"] == pytest.approx(hf_sparse_attn.rank_layers(model).weight_norms)
    assert len(ranking["weight_norms"]) == 3
