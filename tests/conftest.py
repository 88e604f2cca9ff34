"""Shared fixtures: small random configs of every supported family, and the real offline models (cached per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 101


def random_qkv(B=2, H=2, N=300, D=16, seed=0, dtype=torch.float32):
    """Three standard-normal tensors [B, H, N, D] from a seeded generator (q, k, v)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3)]


def rel_error(a, b):
    """||a - b||_F / ||b||_F in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tiny(family: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    if family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **common))
    elif family == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, sliding_window=None, **common))
    elif family == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=1, **common))
    elif family == "glm":
        model = T.GlmForCausalLM(T.GlmConfig(num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2, **common))
    elif family == "glm4":
        model = T.Glm4ForCausalLM(T.Glm4Config(num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2, **common))
    elif family == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0))
    elif family == "bert":
        model = T.BertModel(T.BertConfig(**common))
    elif family == "roberta":
        model = T.RobertaModel(T.RobertaConfig(pad_token_id=1, **common))
    else:
        raise ValueError(family)
    return model.eval()


DECODERS = ["llama", "mistral", "qwen2", "glm", "glm4", "gpt2"]
ENCODERS = ["bert", "roberta"]


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it. Many small ops: on a shared 2-core machine one thread is
    faster and steadier. A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model():
    def make(family: str, seed: int = 0):
        torch.manual_seed(seed)
        return _tiny(family)

    return make


SKIP_REAL_WEIGHTS = os.environ.get("HF_SPARSE_ATTN_SKIP_REAL_WEIGHTS") == "1"  # the second CI env (Makefile)

# Integration tests: those that load real offline weights or text (SmolLM2, MiniLM, Wikipedia, People's Daily through
# hf_sparse_attn.eval.data). They are marked here, so that `pytest -m "not integration"` runs the unit tests alone:
# 1. every test that uses one of these fixtures;
REAL_FIXTURES = {"smollm2", "minilm", "wiki_article_text"}
# 2. every test in a file named test_*_real.py;
# 3. the tests below, which reach the loaders through the command line or a subprocess (path under tests/, then the
#    test's name without its parameters; a name alone marks the whole file). A new such test goes here or carries
#    @pytest.mark.integration itself.
REAL_TESTS = {
    "test_demo.py": {"test_demo_ranks_patches_the_recommended_plan_checks_and_reports"},
    "test_readme.py": {"test_readme_usage_example_runs", "test_readme_load_and_lm_eval_examples_run"},
    "test_chatglm_remote.py": {"test_bench_model_runs_chatglm_only_with_the_opt_in"},
    "test_experiments.py": {"test_two_shards_make_the_cells_of_one_whole_run"},  # `bench run`: Wikipedia articles
    "stress/test_stress_kill_bench.py": None,  # a tokenizer trained on the Wikipedia text, then `bench model` on it
}


def skip_without_real_weights() -> None:
    if SKIP_REAL_WEIGHTS:
        pytest.skip("real weights are tested in the main environment only (HF_SPARSE_ATTN_SKIP_REAL_WEIGHTS=1)")


def loads_real_data(item) -> bool:
    """True for a test that loads real offline weights or text (the rules above)."""
    if REAL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.stem.endswith("_real"):
        return True
    tests_dir = Path(__file__).parent
    if not item.path.is_relative_to(tests_dir):
        return False
    relative = item.path.relative_to(tests_dir).as_posix()
    if relative not in REAL_TESTS:
        return False
    names = REAL_TESTS[relative]
    return names is None or getattr(item, "originalname", item.name) in names


def pytest_collection_modifyitems(config, items):
    """Mark the integration tests (``loads_real_data``). In the second CI environment, also skip the real-weight test
    files (named ``test_*_real.py``) that load SmolLM2 / MiniLM through the command line rather than through the
    fixtures below."""
    skip = pytest.mark.skip(reason="real weights are tested in the main environment only (HF_SPARSE_ATTN_SKIP_REAL_WEIGHTS=1)")
    for item in items:
        if loads_real_data(item):
            item.add_marker(pytest.mark.integration)
        if SKIP_REAL_WEIGHTS and item.path.stem.endswith("_real"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    skip_without_real_weights()
    from hf_sparse_attn.eval.data import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def minilm():
    skip_without_real_weights()
    from hf_sparse_attn.eval.data import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def wiki_article_text():
    from hf_sparse_attn.eval.data import wikipedia_articles

    return wikipedia_articles(min_chars=20000)[0][1]
