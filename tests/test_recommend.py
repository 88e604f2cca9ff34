"""recommended(model): valid patch_model arguments for a causal LM and for an encoder, served at a long enough length."""

import copy

import torch

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.methods import get_spec
from hf_sparse_attn.recommend import LOCAL_RECOMMENDATION, WINDOW_BY_R_RECOMMENDATION, is_causal_lm, recommended


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
    if "other_layers" in kwargs:
        other = dict(kwargs["other_layers"])
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
        assert {layer.decode_method for layer in plan.layers} == {kwargs.get("decode_method", "exact")}
    finally:
        unpatch_model(model)


def test_causal_lm_gets_block_select_on_all_layers():
    model = _tiny_llama(4096)
    assert is_causal_lm(model)
    kwargs = recommended(model)
    assert kwargs["method"] == "block_select" and kwargs["layers"] == "all" and kwargs["decode_method"] == "exact"
    assert recommended(model) is not kwargs  # a fresh dict each call
    _check_and_serve(model, kwargs, kwargs["min_seq_len"])


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
    assert recommended(model)["window"] == 512
