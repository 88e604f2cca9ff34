"""The command line's one model loader (one causal-LM rule, --model everywhere, remote code only on request) and
its one parser of NAME=VALUE / METHOD.NAME=VALUE parameters."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn.commands.arguments import (
    parse_method_params,
    parse_params,
    parse_value,
)
from hf_sparse_attn.commands.models import is_causal_lm, load_model


def test_causal_lm_rule():
    from transformers import (
        BertConfig,
        GPT2Config,
        LlamaConfig,
        PretrainedConfig,
        T5Config,
    )

    assert is_causal_lm(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert is_causal_lm(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert not is_causal_lm(BertConfig(architectures=["BertModel"]))
    assert not is_causal_lm(T5Config(architectures=["T5ForConditionalGeneration"]))  # seq2seq, not a causal LM
    remote = PretrainedConfig(architectures=["ChatGLMModel"],
                              auto_map={"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    assert is_causal_lm(remote)  # ChatGLM2/3 name their base class but declare the causal-LM class


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4))
    llama.save_pretrained(root / "llama")
    bert.save_pretrained(root / "bert")
    return {"llama": str(root / "llama"), "bert": str(root / "bert")}


def test_loader_picks_the_class_by_the_rule_and_refuses_an_encoder_where_logits_are_needed(saved):
    llama, _ = load_model(saved["llama"], tokenizer=False, dtype="float32")
    bert, _ = load_model(saved["bert"], tokenizer=False)
    assert type(llama).__name__ == "LlamaForCausalLM" and not llama.training
    assert type(bert).__name__ == "BertModel"
    with pytest.raises(ValueError, match="not a causal LM"):
        load_model(saved["bert"], tokenizer=False, causal_lm=True)
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_model(saved["llama"], tokenizer=False, dtype="float33")


def test_model_option_on_every_model_command():
    from hf_sparse_attn.cli import build_parser

    parser = build_parser()
    for argv in (["rank", "--model", "m"], ["bench", "model", "--model", "m", "--out", "o"],
                 ["head-tail", "--model", "m", "--text", "t", "--out", "o"],
                 ["sparsity", "--model", "m", "--text", "t", "--out", "o"],
                 ["longbench", "--model", "m", "--out", "o"]):
        args = parser.parse_args(argv)
        assert args.model == "m" and args.trust_remote_code is False, argv  # remote code: opt-in only
    assert parser.parse_args(["bench", "model", "--model-dir", "d", "--out", "o"]).model == "d"  # the older spelling
    assert parser.parse_args(["bench", "model", "--out", "o"]).model == "smollm2"
    assert parser.parse_args(["rank", "m"]).model_positional == "m"


def test_one_value_parser_for_every_command():
    assert [parse_value(t) for t in ("128", "0.5", "True", "false", "lsh", "[1, 2]", '"7"')] == \
        [128, 0.5, True, False, "lsh", [1, 2], "7"]
    assert parse_params(["block_size=256", "causal_mode=window"]) == {"block_size": 256, "causal_mode": "window"}
    assert parse_method_params(["hyper.block_size=64", "hyper.exact=true", "kmv.min_seq_len=32"]) == \
        {"hyper": {"block_size": 64, "exact": True}, "kmv": {"min_seq_len": 32}}
    with pytest.raises(ValueError, match="METHOD.NAME=VALUE"):
        parse_method_params(["block_size=64"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_params(["block_size"])


def test_bench_and_grid_read_method_parameters_alike(tmp_path):
    from hf_sparse_attn.commands.bench import _parse_method_params
    from hf_sparse_attn.commands.longbench_grid import load_config

    config = tmp_path / "c.toml"
    config.write_text('[model]\npath = "m"\n[data]\npath = "d"\ntasks = ["hotpotqa"]\n')
    items = ["hyper.block_size=64", "hyper.sample_size=16"]
    loaded = load_config(str(config), [f"params.{item}" for item in items])
    assert loaded["params"] == _parse_method_params(items) == {"hyper": {"block_size": 64, "sample_size": 16}}
    with pytest.raises(SystemExit, match="METHOD.NAME=VALUE"):
        _parse_method_params(["hyper=3"])
