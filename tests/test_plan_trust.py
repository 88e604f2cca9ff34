"""Plans and checkpoints that can be trusted (issue 32, items 6-10).

6. a patched model fine-tuned after patching saves a plan that fits the weights saved beside it;
7. saving a model unpatched removes the stale plan file of ours (never a file of the user's);
8. ``from_pretrained(path, subfolder=...)`` reads the subfolder's plan, never the parent's;
9. every size parameter is capped at what the input can use (same output as the capped value, no allocation that
   grows with the parameter), and the validator bounds them;
10. damaged plan files (wrong types, other encodings, deep nesting, partial fingerprints) and odd ``layers`` or
    lm-eval arguments get clear errors.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
import transformers as T
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sparse_attn import PLAN_FILE_NAME, PlanError, current_plan, from_pretrained, patch_model, patched, unpatch_model
from hf_sparse_attn.methods import get_method, get_spec
from hf_sparse_attn.plan import PatchPlan, fingerprint_differences, model_fingerprint
from tiny_checkpoint import save_tiny_checkpoint, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 101


def _train(model, steps=3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ---- 6. the saved plan describes the saved weights ----------------------------------------------------------------

def test_fine_tuned_patched_model_reloads_with_its_plan(tmp_path):
    model = tiny_llama(VOCAB)
    plan = patch_model(model, method="exact", layers=[0, 2])
    before = plan.model_fingerprint["qk_sha256"]
    _train(model)
    assert model_fingerprint(model)["qk_sha256"] != before  # training changed the Q/K weights
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / PLAN_FILE_NAME).read_text())
    assert saved["model_fingerprint"] == model_fingerprint(model)  # the weights saved, not those at patch time
    reloaded = from_pretrained(tmp_path, auto_class=T.AutoModelForCausalLM)
    assert current_plan(reloaded).patched_layers == [0, 2]
    ids = torch.randint(4, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_patched_block_restores_the_outer_plan_after_training_inside():
    model = tiny_llama(VOCAB)
    outer = patch_model(model, method="exact", layers=[1])
    with patched(model, method="exact", layers=[0]):
        _train(model, steps=1)
    assert current_plan(model) is not None and current_plan(model).patched_layers == outer.patched_layers


# ---- 7. an unpatched save removes the stale plan of ours -----------------------------------------------------------

def test_unpatched_save_over_a_patched_save_reloads_unpatched(tmp_path, caplog):
    model = tiny_llama(VOCAB)
    patch_model(model, method="exact", layers=[1])
    model.save_pretrained(tmp_path)
    assert (tmp_path / PLAN_FILE_NAME).is_file()
    unpatch_model(model)
    with caplog.at_level(logging.WARNING, logger="hf_sparse_attn"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / PLAN_FILE_NAME).exists()
    assert "stale" in caplog.text
    assert current_plan(from_pretrained(tmp_path, auto_class=T.AutoModelForCausalLM)) is None


def test_a_file_of_the_users_named_like_the_plan_is_never_touched(tmp_path):
    own = tmp_path / PLAN_FILE_NAME
    own.write_text("my notes, not a plan\n", encoding="utf-8")
    model = tiny_llama(VOCAB)
    patch_model(model, method="exact", layers=[1])
    unpatch_model(model)
    model.save_pretrained(tmp_path)  # unpatched: not ours, left alone
    assert own.read_text(encoding="utf-8") == "my notes, not a plan\n"
    patch_model(model, method="exact", layers=[1])
    other = tmp_path / "other"
    other.mkdir()
    (other / PLAN_FILE_NAME).write_text(json.dumps({"a": 1}), encoding="utf-8")
    with pytest.raises(PlanError, match="not a plan written by hf_sparse_attn.*nothing was saved"):
        model.save_pretrained(other)  # patched: would overwrite it, refused before anything is written
    assert json.loads((other / PLAN_FILE_NAME).read_text()) == {"a": 1}
    assert sorted(os.listdir(other)) == [PLAN_FILE_NAME]


# ---- 8. subfolder ---------------------------------------------------------------------------------------------------

def test_subfolder_reads_its_own_plan_never_the_parents(tmp_path):
    parent = tiny_llama(VOCAB, seed=0)
    patch_model(parent, method="exact", layers=[1])
    parent.save_pretrained(tmp_path)
    child = tiny_llama(VOCAB, seed=1)  # other weights, no plan
    child.save_pretrained(tmp_path / "sub")
    loaded = from_pretrained(tmp_path, auto_class=T.AutoModelForCausalLM, subfolder="sub")
    assert current_plan(loaded) is None  # the parent's plan (made for other weights) is not applied
    patch_model(child, method="exact", layers=[0, 2])
    child.save_pretrained(tmp_path / "sub")
    loaded = from_pretrained(tmp_path, auto_class=T.AutoModelForCausalLM, subfolder="sub")
    assert current_plan(loaded).patched_layers == [0, 2]


# ---- 9. sizes capped at the input -----------------------------------------------------------------------------------

_FACTORIES = {"empty", "zeros", "ones", "full", "rand", "randn", "randint", "empty_strided", "new_empty", "new_zeros",
              "new_ones", "new_full", "scalar_tensor"}
ALLOCATION_LIMIT = 2**22  # elements: far above what these 256-token calls need, far below what a 10**7 size asks


class _AllocationGuard(TorchDispatchMode):
    """Refuses (before allocating) any factory op asking for more than ``limit`` elements, and records the largest
    tensor any op produced; an allocation sized by a parameter instead of the input shows here without being made."""

    def __init__(self, limit=ALLOCATION_LIMIT):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _FACTORIES:
            size = kwargs.get("size", args[1] if name.startswith("new_") and len(args) > 1 else (args[0] if args else ()))
            if isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
                numel = int(np.prod(size)) if size else 1
                assert numel <= self.limit, f"{func} asked for {numel} elements ({list(size)})"
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.largest = max(self.largest, t.numel())
        return out


def _qkv(N=256, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, N, D, generator=g) for _ in range(3)]


HUGE = 10**7
# (method, fixed params, the size parameter, causal): the call with HUGE equals the call with the largest value the
# input can use (N; 32 N for hyper's samples, drawn with replacement).
CAPS = [
    ("local", dict(num_sink_tokens=4), "window", True),
    ("local", dict(num_sink_tokens=4), "window", False),
    ("local", dict(window=8), "num_sink_tokens", True),
    ("hyper", dict(block_size=32, min_seq_len=64), "sample_size", False),
    ("hyper", dict(sample_size=16, min_seq_len=64), "block_size", False),
    ("hyper", dict(block_size=32, min_seq_len=64, causal_mode="recursive"), "sample_size", True),
    ("hyper", dict(block_size=32, num_sink_tokens=4, causal_mode="single_pass"), "sample_size", True),
    ("hyper", dict(block_size=32, sample_size=16, num_sink_tokens=4, causal_mode="single_pass"), "window", True),
    ("hyper", dict(sample_size=16, window=32, num_sink_tokens=4, causal_mode="single_pass"), "block_size", True),
    ("sparse_hyper", dict(block_size=32, num_sink_tokens=4, causal_mode="single_pass"), "window", True),
    ("sparse_hyper", dict(min_seq_len=64), "block_size", False),
    ("kmv", dict(min_seq_len=0, block_size=64, causal_block=64, max_head_tail=0.0), "num_samples", False),
    ("kmv", dict(min_seq_len=0, num_samples=8, causal_block=64, max_head_tail=0.0), "block_size", True),
    ("kmv", dict(min_seq_len=0, block_size=64, num_samples=8, causal_block=64), "max_heavy_values", False),
    ("poly", dict(min_seq_len=0, degree=2), "chunk_size", True),
]


@pytest.mark.parametrize("method, params, name, causal", CAPS, ids=[f"{m}-{n}-{'causal' if c else 'bidir'}-{i}"
                                                                     for i, (m, _, n, c) in enumerate(CAPS)])
def test_size_parameters_are_capped_at_the_input(method, params, name, causal):
    q, k, v = _qkv()
    N = q.shape[2]
    # the size the input can use: N, or for samples drawn with replacement MAX_SAMPLES_PER_KEY x N (kmv: N)
    from hf_sparse_attn.methods.registry import MAX_SAMPLES_PER_KEY

    fit = MAX_SAMPLES_PER_KEY * N if name == "sample_size" else N
    outputs, largest = [], []
    for value in (fit, HUGE):
        fn = get_method(method, **params, **{name: value})
        with _AllocationGuard() as guard:
            out, lse = fn(q, k, v, causal=causal, scale=0.25, generator=torch.Generator().manual_seed(1))
        outputs.append((out, lse))
        largest.append(guard.largest)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert largest[1] == largest[0]  # nothing sized by the parameter


def test_a_window_covering_the_input_is_exact_local_attention():
    from hf_sparse_attn.methods.exact import exact_attention

    q, k, v = _qkv(N=128)
    out, _ = get_method("local", window=HUGE, num_sink_tokens=0)(q, k, v, causal=True, scale=0.25)
    ref, _ = exact_attention(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, name", [("local", "window"), ("hyper", "sample_size"), ("hyper", "block_size"),
                                          ("kmv", "num_samples"), ("poly", "max_features"), ("poly", "chunk_size"),
                                          ("sparse_hyper", "min_seq_len"), ("kmv", "lsh_num_tables")])
def test_validator_bounds_every_size_parameter(method, name):
    param = get_spec(method).params[name]
    assert param.high is not None
    with pytest.raises(ValueError, match=f"'{name}'=.* is above its maximum"):
        get_method(method, **{name: int(param.high) + 1})
    get_method(method, **{name: int(param.high)})  # the bound itself is valid


def test_plan_with_an_absurd_size_is_refused_naming_the_file(tmp_path):
    model = tiny_llama(VOCAB)
    data = patch_model(model, method="hyper", layers=[1]).to_dict()
    unpatch_model(model)
    data["layers"][1]["params"]["sample_size"] = 20_000_000  # the plan of the issue: 10.2 GB on 16 tokens
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PlanError, match=r"big\.json: layer 1: .*'sample_size'=20000000 is above its maximum"):
        patch_model(model, plan=path)
    assert current_plan(model) is None


# ---- 10. damaged plans, odd layers, lm-eval arguments -----------------------------------------------------------------

@pytest.fixture
def plan_dict():
    model = tiny_llama(VOCAB)
    data = patch_model(model, method="exact", layers=[1]).to_dict()
    unpatch_model(model)
    return model, data


def _layer(data, **changes):
    out = json.loads(json.dumps(data))
    out["layers"][1].update(changes)
    return out


@pytest.mark.parametrize("change, match", [
    (lambda d: _layer(d, weight_norm="abc"), r"layer 1 has weight_norm='abc'; it must be a number"),
    (lambda d: {**d, "method": 5}, r"'method' must be a method name, or null for a plan made layer by layer; got 5"),
    (lambda d: {**d, "norm": "bogus"}, r"'norm' must be one of \['spectral', 'frobenius'\]; got 'bogus'"),
    (lambda d: {**d, "seed": -1}, r"plan seed=-1 is out of range"),
    (lambda d: {**d, "select": None}, r"'select' must be a non-empty string"),
    (lambda d: {**d, "versions": []}, r"'versions' must be an object"),
    (lambda d: _layer(d, rank="1"), r"layer 1 has rank='1'; it must be an int >= 0"),
    (lambda d: _layer(d, served=-2), r"layer 1 has served=-2"),
    (lambda d: _layer(d, fallbacks={"decode": "x"}), r"layer 1 has fallbacks=.*call counts"),
    (lambda d: _layer(d, head_weight_norms=["a"]), r"layer 1 has head_weight_norms=.*list of numbers"),
    (lambda d: {**d, "model_fingerprint": {**d["model_fingerprint"], "qk_head_norms": []}},
     r"'model_fingerprint' is damaged: qk_head_norms .*empty or truncated"),
    (lambda d: {**d, "model_fingerprint": {**d["model_fingerprint"], "qk_head_norms": d["model_fingerprint"]["qk_head_norms"][:1]}},
     r"'model_fingerprint' is damaged: qk_head_norms"),
    (lambda d: {**d, "model_fingerprint": {k: v for k, v in d["model_fingerprint"].items() if k != "qk_sha256"}},
     r"'model_fingerprint' lacks \['qk_sha256'\]"),
    (lambda d: {**d, "model_fingerprint": {**d["model_fingerprint"], "qk_sha256": "xyz"}}, r"qk_sha256 must be 64 hex"),
    (lambda d: _layer(d, params={"query_chunk_size": -5}), r"layer 1: .*'query_chunk_size'=-5 is below its minimum"),
])
def test_plan_with_wrong_types_is_refused_naming_file_and_field(tmp_path, plan_dict, change, match):
    model, data = plan_dict
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(change(data)), encoding="utf-8")
    with pytest.raises(PlanError, match=match) as err:
        patch_model(model, plan=path)
    assert "bad.json" in str(err.value)
    assert current_plan(model) is None


def test_every_plan_that_loads_also_prints_and_saves(tmp_path, plan_dict):
    _model, data = plan_dict
    data["layers"][1]["weight_norm"] = 3  # an int is a number
    plan = PatchPlan.from_dict(data)
    assert "exact" in str(plan)
    plan.save(tmp_path / "again.json")
    assert PatchPlan.load(tmp_path / "again.json").to_dict() == plan.to_dict()


@pytest.mark.parametrize("name, content, match", [
    ("latin1.json", lambda text: text.replace('"exact"', '"ex\u00e4ct"').encode("latin-1"), r"not UTF-8 text"),
    ("utf16.json", lambda text: text.encode("utf-16"), r"not UTF-8 text \(it starts with a UTF-16/32 byte-order mark\)"),
    ("deep.json", lambda text: ("[" * 200_000 + "]" * 200_000).encode(), r"nested too deeply"),
])
def test_undecodable_or_deep_plan_files_get_a_plan_error(tmp_path, plan_dict, name, content, match):
    model, data = plan_dict
    path = tmp_path / name
    path.write_bytes(content(json.dumps(data)))
    with pytest.raises(PlanError, match=match) as err:
        patch_model(model, plan=path)
    assert name in str(err.value) and "plan.save" in str(err.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path, plan_dict):
    model, data = plan_dict
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    assert patch_model(model, plan=path).patched_layers == [1]


def test_truncated_norms_never_skip_the_weight_check(plan_dict):
    model, data = plan_dict
    other = model_fingerprint(tiny_llama(VOCAB, seed=1))
    saved = dict(data["model_fingerprint"])
    for norms in ([], saved["qk_head_norms"][:1], None):
        partial = {**saved, "qk_head_norms": norms}
        assert any("Q/K weights" in d for d in fingerprint_differences(partial, other)), norms
    assert fingerprint_differences(saved, model_fingerprint(model)) == []


def test_numpy_layer_counts_and_fractions(tiny_model):
    model = tiny_model("llama")
    assert patch_model(model, method="exact", layers=np.int64(1)).patched_layers == \
        patch_model(model, method="exact", layers=1).patched_layers
    assert len(patch_model(model, method="exact", layers=np.float64(0.67)).patched_layers) == 2
    assert patch_model(model, method="exact", layers=np.int32(0)).patched_layers == []
    plan = patch_model(model, method="exact", layers=[np.int64(2), np.int64(0)], seed=np.int64(4))
    assert plan.patched_layers == [0, 2] and type(plan.seed) is int
    unpatch_model(model)


@pytest.mark.parametrize("fraction", [0.0001, 0.1, 1e-300])
def test_a_fraction_that_selects_no_layer_is_an_error(tiny_model, fraction):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"selects no layer.*at least 0\.3333.*layers=1"):
        patch_model(model, method="exact", layers=fraction)
    assert current_plan(model) is None


@pytest.fixture(scope="module")
def lm_eval_checkpoint(tmp_path_factory):
    pytest.importorskip("lm_eval")
    directory = tmp_path_factory.mktemp("lm_eval_trust")
    save_tiny_checkpoint(directory)
    return directory


@pytest.mark.parametrize("extra, match", [
    ("window=4", r"method parameter\(s\) window given without method=NAME; add method=NAME"),
    ("method=exact,window=4", r"method 'exact' has no parameter window; its parameters are: query_chunk_size"),
    ("method=local,windw=4", r"a model argument is unknown .*windw.* parameters of 'local': min_seq_len, "
                             r"num_sink_tokens, window"),
    ("method=7", r"method=7 must be a method name"),
])
def test_lm_eval_arguments_get_clear_errors(lm_eval_checkpoint, monkeypatch, extra, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.api.registry import get_model

    import hf_sparse_attn.lm_eval  # noqa: F401  (registers hf-sparse)

    with pytest.raises(ValueError, match=match):
        get_model("hf-sparse").create_from_arg_string(f"pretrained={lm_eval_checkpoint},{extra}",
                                                      {"device": "cpu", "batch_size": 1})


def test_lm_eval_method_with_its_own_parameter(lm_eval_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.api.registry import get_model

    import hf_sparse_attn.lm_eval  # noqa: F401

    lm = get_model("hf-sparse").create_from_arg_string(f"pretrained={lm_eval_checkpoint},method=local,window=4",
                                                       {"device": "cpu", "batch_size": 1})
    assert lm.plan.method == "local" and lm.plan.layer(lm.plan.patched_layers[0]).params["window"] == 4


def test_lm_eval_subfolder_reads_the_subfolders_plan(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.api.registry import get_model

    import hf_sparse_attn.lm_eval  # noqa: F401

    _model, tokenizer = save_tiny_checkpoint(tmp_path / "sub")
    parent = tiny_llama(len(tokenizer), seed=1)  # other weights, with a plan, in the parent folder
    patch_model(parent, method="exact", layers=[1])
    parent.save_pretrained(tmp_path)
    args = {"device": "cpu", "batch_size": 1}
    lm = get_model("hf-sparse").create_from_arg_string(f"pretrained={tmp_path},subfolder=sub", args)
    assert lm.plan is None  # the subfolder has no plan; the parent's is not applied (it would not even fit)
    child = T.AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    patch_model(child, method="exact", layers=[0, 2])
    child.save_pretrained(tmp_path / "sub")
    lm = get_model("hf-sparse").create_from_arg_string(f"pretrained={tmp_path},subfolder=sub", args)
    assert lm.plan.patched_layers == [0, 2]
