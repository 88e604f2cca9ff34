"""defaults.py: every measured default names the result file that chose it, the file exists, and the methods'
registered defaults are the values defaults.py gives (so a re-derived value reaches every method), and every
registered method's defaults are the ones of its function's signature (each default is stated once)."""

import inspect
import re
from pathlib import Path

import pytest

from hf_sparse_attn.methods import (Param, defaults, get_decode_spec, get_spec, list_decode_methods, list_methods,
                                    register_decode_method, register_method)
from hf_sparse_attn.methods.hyper import causal_threshold

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(defaults.__file__).read_text(encoding="utf-8")
# CAUSAL_MODES is the list of choices, not a measured value; CAUSAL_QUERY_CHUNK_DIVISOR comes from a profile whose
# numbers are in its comment but whose result file was not kept (the kernel sweeps cannot set it).
NOT_LINKED = {"CAUSAL_MODES"}
MEASURED = [name for name in vars(defaults) if name.isupper() and name not in NOT_LINKED]


def _comment_above(name: str) -> str:
    """The comment lines directly above ``NAME = ...`` in defaults.py (up to the previous blank line)."""
    lines = SOURCE.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
    block = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            if line.strip() == "" or not re.match(r"^[A-Z_]+ =", line):
                break
            continue  # another constant of the same block: its comment is shared
        block.append(line)
    return "\n".join(reversed(block))


def test_every_default_has_a_reason_and_an_existing_result_file():
    assert {"MIN_SEQ_LEN", "CAUSAL_CROSSOVER_FACTOR", "NUM_SINK_TOKENS", "LOCAL_NUM_SINK_TOKENS", "BLOCK_SIZE",
            "SAMPLE_SIZE", "LOCAL_MIN_SEQ_LEN"} <= set(MEASURED)
    for name in MEASURED:
        comment = _comment_above(name)
        links = re.findall(r"eval/results/[\w./-]+\.md", comment)
        assert links, f"{name}: its comment in defaults.py names no eval/results/<dir>/<file>.md that chose it"
        for link in links:
            assert (ROOT / link).exists(), f"{name}: {link} does not exist"


@pytest.mark.parametrize("method", ["hyper", "sparse_hyper"])
def test_sorted_lsh_methods_register_the_defaults(method):
    params = {n: p.default for n, p in get_spec(method).params.items()}
    assert params["min_seq_len"] == defaults.MIN_SEQ_LEN
    assert params["block_size"] == defaults.BLOCK_SIZE
    assert params["num_sink_tokens"] == defaults.NUM_SINK_TOKENS
    assert params["causal_mode"] == defaults.CAUSAL_MODE
    assert params["window"] == defaults.SINGLE_PASS_WINDOW
    if method == "hyper":
        assert params["sample_size"] == defaults.SAMPLE_SIZE


def test_local_registers_the_defaults():
    params = {n: p.default for n, p in get_spec("local").params.items()}
    assert params == {"window": defaults.LOCAL_WINDOW, "num_sink_tokens": defaults.LOCAL_NUM_SINK_TOKENS,
                      "min_seq_len": defaults.LOCAL_MIN_SEQ_LEN}


def test_auto_causal_threshold_lets_the_readme_example_approximate():
    """The README patches sparse_hyper with min_seq_len=1024 and runs 2048 tokens: the auto causal threshold must
    not refuse those calls (else the printed perplexity is the exact model's), and at the defaults it is the
    measured crossover."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme[readme.index("<!-- readme-example"):]
    tokens = int(re.search(r"input_ids\[:, :(\d+)\]", example).group(1))
    min_seq_len = int(re.search(r"min_seq_len=(\d+)", example).group(1))
    assert causal_threshold({"min_seq_len": min_seq_len}) <= tokens
    assert causal_threshold({}) == defaults.CAUSAL_CROSSOVER_FACTOR * defaults.MIN_SEQ_LEN


BUILT_IN = ["exact", "hyper", "sparse_hyper", "local", "block_select", "kmv", "poly", "feature_sketch"]


def _signature_defaults(fn, names):
    parameters = inspect.signature(fn).parameters
    return {name: parameters[name].default for name in names}


@pytest.mark.parametrize("method", sorted(set(BUILT_IN) | set(list_methods())))
def test_every_method_resolves_the_defaults_of_its_signature(method):
    spec = get_spec(method)
    resolved = spec.resolve_params({})
    assert set(resolved) == set(spec.params)
    signature = _signature_defaults(spec.fn, spec.params)
    assert resolved == signature
    assert {n: type(v) for n, v in resolved.items()} == {n: type(v) for n, v in signature.items()}


@pytest.mark.parametrize("method", sorted({"exact", "local", "lsh"} | set(list_decode_methods())))
def test_every_decode_method_resolves_the_defaults_of_its_signature(method):
    spec = get_decode_spec(method)
    assert spec.resolve_params({}) == _signature_defaults(spec.fn, spec.params)


def test_no_method_source_states_a_param_default():
    """Param entries carry type, range and help only: a literal default next to the signature's would be stated
    twice (and could drift from it)."""
    methods_dir = ROOT / "hf_sparse_attn" / "methods"
    for path in sorted(methods_dir.glob("*.py")):
        if path.name == "registry.py":
            continue
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\bParam\((?!kind=|\))", text):
            line = text[:match.start()].count("\n") + 1
            raise AssertionError(f"{path.name}:{line}: a Param with a positional default; declare Param(kind=...) "
                                 f"and give the default in the function's signature")


def _toy_method(q, k, v, *, causal, scale, key_padding_mask=None, generator=None, width: int = 4):
    return q, q.new_zeros(q.shape[:-1])


def _toy_decode(q, k_cache, v_cache, *, scale, kv_len, key_padding_mask=None, index=None, width: int = 4):
    return q, q.new_zeros(q.shape[:-1])


@pytest.fixture
def toy_name():
    from hf_sparse_attn.methods.decode import _DECODE_REGISTRY
    from hf_sparse_attn.methods.registry import _REGISTRY

    yield "toy_defaults_test"
    _REGISTRY.pop("toy_defaults_test", None)
    _DECODE_REGISTRY.pop("toy_defaults_test", None)


def test_registering_fills_the_default_and_refuses_a_second_one_that_disagrees(toy_name):
    spec = register_method(toy_name, _toy_method, params={"width": Param(kind=int, low=1)}, overwrite=True)
    assert spec.params["width"].default == 4 and spec.resolve_params({}) == {"width": 4}
    register_method(toy_name, _toy_method, params={"width": Param(4, int, low=1)}, overwrite=True)
    with pytest.raises(ValueError, match="signature says 4"):
        register_method(toy_name, _toy_method, params={"width": Param(5, int, low=1)}, overwrite=True)
    with pytest.raises(ValueError, match="signature says 4"):
        register_method(toy_name, _toy_method, params={"width": Param(4.0, float)}, overwrite=True)
    with pytest.raises(TypeError, match="does not take it"):
        register_method(toy_name, _toy_method, params={"depth": Param(kind=int)}, overwrite=True)
    decode = register_decode_method(toy_name, _toy_decode, params={"width": Param(kind=int, low=1)},
                                    overwrite=True)
    assert decode.resolve_params({}) == {"width": 4}
    with pytest.raises(ValueError, match="signature says 4"):
        register_decode_method(toy_name, _toy_decode, params={"width": Param(3, int)}, overwrite=True)
    with pytest.raises(ValueError, match="below its minimum"):
        decode.resolve_params({"width": 0})
