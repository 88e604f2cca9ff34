"""Helpers of the stress suite: parameters that make every registered method serve tiny inputs."""

from __future__ import annotations

from typing import Any

from hf_sparse_attn.methods import get_spec

# Small values that make every method serve tiny inputs (instead of falling back to exact attention); a method
# registered later gets its defaults except for the parameters named here that it has.
SMALL = {
    "block_size": 16, "sample_size": 8, "num_sink_tokens": 4, "causal_block": 32, "chunk_size": 16,
    "num_samples": 8, "degree": 1, "allow_out_of_regime": True, "min_dim_ratio": 0.0, "window": 16,
    "window_size": 16, "query_chunk_size": 16, "oversample": 0.001,
    "max_head_tail": 0.0,  # kmv: no regime check (tiny random inputs are outside its head-to-tail bound)
}
# Per method, values of parameters whose names other methods share with another meaning.
SMALL_FOR = {"feature_sketch": {"eps": 0.9}}


def serving_params(name: str, min_seq_len: int = 32) -> dict[str, Any]:
    """Parameters of ``name`` for tiny inputs: the SMALL values it takes, and ``min_seq_len`` (clamped to its range)."""
    spec = get_spec(name)
    params = {}
    for pname, param in spec.params.items():
        if pname in SMALL:
            params[pname] = SMALL[pname]
        elif pname == "min_seq_len":
            params[pname] = max(int(param.low or 0), min_seq_len)
    params.update(SMALL_FOR.get(name, {}))
    spec.resolve_params(params)  # validated; defaults are left to the method
    return params
