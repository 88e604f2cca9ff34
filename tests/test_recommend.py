"""recommended(model): valid patch_model arguments for a causal LM and for an encoder, served at a long enough length."""

import copy

import torch

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.methods import get_spec
from hf_sparse_attn.methods.defaults import RECOMMENDED_BLOCK_SELECT_NUM_SELECTED, RECOMMENDED_BLOCK_SELECT_WINDOW
from hf_sparse_attn.recommend import LOCAL_RECOMMENDATION, WINDOW_BY_R_RECOMMENDATION, is_causal_lm, recommended
from tiny_checkpoint import tiny_llama


def _tiny_llama(positions: int):
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions)
    return T.LlamaForCausalLM(config).eval()


def _tiny_bert(positions: int):
    import transformers as T

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=positions)
    return T.BertModel(config, add_pooling_layer=False).eval()


def _check_and_serve(model, kwargs, n):
    spec = get_spec(kwargs["method"])
    params = {key: value for key, value in kwargs.items()
              if key not in ("method", "layers", "select", "decode_method", "decode_params", "other_layers")}
    spec.resolve_params(params)  # every parameter exists and is in range
    decode_methods = {kwargs.get("decode_method", "exact")}
    if "other_layers" in kwargs:
        other = dict(kwargs["other_layers"])
        other.pop("decode_params", None)
        decode_methods.add(other.pop("decode_method", kwargs.get("decode_method", "exact")))
        get_spec(other.pop("method")).resolve_params(other)
    ids = torch.randint(4, 100, (1, n), generator=torch.Generator().manual_seed(0))
    plan = patch_model(model, **kwargs)
    try:
        with torch.no_grad():
            out = model(ids)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        assert torch.isfinite(hidden).all()
        assert all(layer.patched for layer in plan.layers)
        assert sum(layer.served for layer in plan.layers) == len(plan.layers), str(plan)
        assert {layer.decode_method for layer in plan.layers} == decode_methods
    finally:
        unpatch_model(model)


def test_causal_lm_gets_block_select_on_all_layers_and_exact_decode_where_r_is_largest():
    model = _tiny_llama(4096)
    assert is_causal_lm(model)
    kwargs = recommended(model)
    assert kwargs["method"] == kwargs["other_layers"]["method"] == "block_select" and kwargs["select"] == "weight_norm"
    assert kwargs["decode_method"] == "exact" and kwargs["other_layers"]["decode_method"] == "local"
    assert recommended(model) is not kwargs  # a fresh dict each call
    _check_and_serve(model, kwargs, kwargs["min_seq_len"])
    model = tiny_llama(101, num_layers=6)
    plan = patch_model(model, **recommended(model))
    unpatch_model(model)
    assert {layer.method for layer in plan.layers} == {"block_select"}
    by_r = sorted(plan.layers, key=lambda layer: -layer.weight_norm)
    assert [layer.decode_method for layer in by_r] == ["exact"] * 4 + ["local"] * 2  # round(2/3 x 6) of largest R
    assert by_r[-1].decode_params == {"window": 1024, "num_sink_tokens": 64}
    assert by_r[0].params == by_r[-1].params  # one prefill everywhere
    assert (by_r[0].params["window"], by_r[0].params["num_selected"]) == (RECOMMENDED_BLOCK_SELECT_WINDOW,
                                                                          RECOMMENDED_BLOCK_SELECT_NUM_SELECTED)


def test_encoder_gets_sparse_hyper_on_all_layers():
    model = _tiny_bert(2048)
    assert not is_causal_lm(model)
    kwargs = recommended(model)
    assert kwargs == {"method": "sparse_hyper", "layers": "all"}
    _check_and_serve(model, kwargs, get_spec("sparse_hyper").params["min_seq_len"].default)


def test_the_local_alternative_is_valid():
    kwargs = dict(LOCAL_RECOMMENDATION)
    get_spec(kwargs.pop("method")).resolve_params({k: v for k, v in kwargs.items() if k != "layers"})


def test_the_window_by_r_alternative_is_wide_where_r_is_largest():
    """block_select everywhere: window 1024 on the half of the layers of largest R, 512 on the other half."""
    model = _tiny_llama(4096)
    kwargs = copy.deepcopy(WINDOW_BY_R_RECOMMENDATION)
    assert kwargs["layers"] == 0.5 and kwargs["window"] == 1024 and kwargs["other_layers"]["window"] == 512
    _check_and_serve(model, kwargs, kwargs["min_seq_len"])
    plan = patch_model(model, **kwargs)
    unpatch_model(model)
    assert max(plan.layers, key=lambda layer: layer.weight_norm).params["window"] == 1024
    assert sorted(layer.params["window"] for layer in plan.layers) == [512, 1024]


def test_recommended_returns_a_fresh_copy():
    model = _tiny_llama(4096)
    kwargs = recommended(model)
    kwargs["window"] = 7
    assert recommended(model)["window"] == RECOMMENDED_BLOCK_SELECT_WINDOW


def test_with_a_tokenizer_the_least_needle_layers_decode_locally_and_the_others_exactly():
    """recommended(model, tokenizer): the same block_select prefill on every layer; local decode on round(2/3 x layers)
    of least needle mass on a pass-key probe made with the tokenizer, exact decode on the rest."""
    from hf_sparse_attn import retrieval_scores
    from hf_sparse_attn.methods.defaults import DECODE_LOCAL_LAYERS_BY_RETRIEVAL
    from tiny_checkpoint import build_tokenizer

    tokenizer = build_tokenizer()
    model = tiny_llama(len(tokenizer), num_layers=6)  # 512 positions: the probe is cut to them
    kwargs = recommended(model, tokenizer)
    probe = kwargs["calibration"]
    assert probe.input_ids.shape == (4, 512)
    assert kwargs["select"] == "retrieval" and kwargs["layers"] == DECODE_LOCAL_LAYERS_BY_RETRIEVAL
    assert kwargs["decode_method"] == "local" and kwargs["other_layers"]["decode_method"] == "exact"
    prefill = ("layers", "select", "decode_method", "decode_params", "other_layers", "calibration")
    assert {k: v for k, v in kwargs.items() if k not in prefill} == \
        {k: v for k, v in recommended(model).items() if k not in prefill}  # the same prefill
    scores = retrieval_scores(model, probe)
    plan = patch_model(model, **kwargs)
    unpatch_model(model)
    assert {layer.method for layer in plan.layers} == {"block_select"}
    local = sorted(layer.layer_idx for layer in plan.layers if layer.decode_method == "local")
    assert local == sorted(sorted(range(6), key=lambda i: scores[i])[:4])  # round(2/3 x 6) of least needle mass
    assert {layer.decode_method for layer in plan.layers if layer.layer_idx not in local} == {"exact"}
    assert plan.layer(local[0]).decode_params == {"window": 1024, "num_sink_tokens": 64}
    encoder = _tiny_bert(512)
    assert recommended(encoder, tokenizer) == recommended(encoder)  # an encoder needs no probe
