"""recommended(model): valid patch_model arguments for a causal LM and for an encoder, served at a long enough length."""

import torch

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.methods import get_spec
from hf_sparse_attn.recommend import LOCAL_RECOMMENDATION, is_causal_lm, recommended


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
              if key not in ("method", "layers", "select", "decode_method", "decode_params")}
    spec.resolve_params(params)  # every parameter exists and is in range
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
