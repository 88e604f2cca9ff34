"""Kernel level on given inputs: every method against torch SDPA on the same q, k, v, with time, memory and error.

The inputs: random (:func:`random_qkv`) or real queries/keys/values captured from SmolLM2 and MiniLM. The measurement
(:mod:`.kernel_timing`: wall time, peak extra memory, dense-equivalent FLOPs) alternates method and SDPA on every
repeat and reports medians, with the error against an fp32 SDPA reference.

Error: relative Frobenius error ||out - ref||_F / ||ref||_F over all heads and rows, where ref = SDPA on the
inputs cast to float32. For bf16 inputs the same reference is used, so the error includes bf16 rounding;
``sdpa_rel_error`` (SDPA run in the input dtype against that reference) shows how much of it rounding alone makes.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Callable, Optional, Sequence

import torch

from ...methods import get_method
from ...methods.common import expand_kv_heads
from .kernel_timing import dense_flops, timed_call
from ..store import write_json


def random_qkv(n: int, *, batch: int = 1, heads: int = 8, head_dim: int = 64, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal q, k, v [batch, heads, n, head_dim] (the inputs kernel_timing draws), cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, head_dim, generator=g).to(dtype) for _ in range(3))  # type: ignore[return-value]


def planted_heavy_pairs(n: int, *, heads: int = 4, pairs: int = 256, head_dim: int = 64, cos: float = 0.9,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal q, k [1, heads, n, head_dim] with ``pairs`` planted pairs per head: key k[kj[p]] at cosine
    ``cos`` to query q[qi[p]], norm 1.5 sqrt(head_dim), so that its score dominates the query's row (a heavy key of
    Indyk et al., Definition 3.3). Returns q, k, qi, kj; qi, kj [1, heads, pairs] int64, distinct within a head
    (the inputs of ``kmv.heavy_key_found``)."""
    H, P, D = heads, pairs, head_dim
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, H, n, D, generator=g), torch.randn(1, H, n, D, generator=g)
    qi = torch.stack([torch.randperm(n, generator=g)[:P] for _ in range(H)])[None]
    kj = torch.stack([torch.randperm(n, generator=g)[:P] for _ in range(H)])[None]
    u = torch.gather(q, 2, qi[..., None].expand(1, H, P, D))
    u = u / u.norm(dim=-1, keepdim=True)
    r = torch.randn(1, H, P, D, generator=g)
    r = r - (r * u).sum(-1, keepdim=True) * u  # orthogonal to u
    r = r / r.norm(dim=-1, keepdim=True)
    k.scatter_(2, kj[..., None].expand(1, H, P, D), (cos * u + math.sqrt(1 - cos ** 2) * r) * math.sqrt(D) * 1.5)
    return q, k, qi, kj


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64."""
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def bench_on_inputs(methods: Sequence[str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    scale: Optional[float] = None, repeats: int = 3, warmup: int = 1,
                    params: Optional[dict[str, dict]] = None, device: str | torch.device = "cpu") -> dict:
    """Time ``methods`` and SDPA on q [B, H, N, D], k/v [B, Hkv, N, D] (KV heads expanded here), alternating them,
    on ``device`` (the inputs are moved there; "cuda" runs the Triton kernels where a method has them).

    Returns {"n", "causal", "dtype", "batch", "heads", "head_dim", "repeats", "threads",
    "sdpa": {"time_s", "times_s", "spread_s", "peak_extra_mb", "useful_gflops", "rel_error"},
    "methods": {name: {... same ..., "speedup_vs_sdpa", "params"}}}. ``spread_s`` = max - min of the repeats.
    A method that raises ValueError/RuntimeError/NotImplementedError on its first (warm-up) call gets
    {"failed": message, "params"} instead. The first call of each method is always a warm-up (``warmup`` >= 1).
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [B, H, N, D] and k, v [B, Hkv, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} KV heads evenly")
    if repeats < 1 or warmup < 1:
        raise ValueError("repeats and warmup must be >= 1")
    device = torch.device(device)
    k = expand_kv_heads(k, q.shape[1] // k.shape[1]).to(device).contiguous()
    v = expand_kv_heads(v, q.shape[1] // v.shape[1]).to(device).contiguous()
    q = q.to(device).contiguous()
    batch, heads, n, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else float(scale)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        reference = sdpa(q.float(), k.float(), v.float(), is_causal=causal, scale=scale)
    calls: dict[str, Callable[[], Any]] = {}
    resolved: dict[str, dict] = {}
    for name in methods:
        fn = get_method(name, **(params or {}).get(name, {}))
        resolved[name] = dict(fn.method_params)
        calls[name] = (lambda fn=fn: fn(q, k, v, causal=causal, scale=scale)[0])
    calls["sdpa"] = lambda: sdpa(q, k, v, is_causal=causal, scale=scale)
    errors: dict[str, float] = {}
    failed: dict[str, str] = {}
    with torch.no_grad():
        for name in list(methods):  # a method that refuses the input (e.g. out of its regime) is reported, not fatal
            try:
                calls[name]()
            except (ValueError, RuntimeError, NotImplementedError) as err:
                failed[name] = f"{type(err).__name__}: {err}"
                del calls[name]
        for _ in range(warmup - 1):
            for call in calls.values():
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        mems: dict[str, list[int]] = {name: [] for name in calls}
        for r in range(repeats):
            for name, call in calls.items():
                t, m, out = timed_call(call, device)
                times[name].append(t)
                mems[name].append(m)
                if r == 0:
                    errors[name] = relative_error(out, reference)
                del out
    work = dense_flops(batch, heads, n, head_dim, causal)

    def summary(name: str) -> dict:
        t = statistics.median(times[name])
        return {"time_s": t, "times_s": times[name], "spread_s": max(times[name]) - min(times[name]),
                "peak_extra_mb": max(mems[name]) / 2**20, "useful_gflops": work / t / 1e9, "rel_error": errors[name]}

    result = {"n": n, "causal": causal, "dtype": str(q.dtype).replace("torch.", ""), "batch": batch, "heads": heads,
              "head_dim": head_dim, "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
              "sdpa": summary("sdpa"), "methods": {}}
    for name in methods:
        if name in failed:
            result["methods"][name] = {"failed": failed[name], "params": resolved[name]}
            continue
        entry = summary(name)
        entry["params"] = resolved[name]
        entry["speedup_vs_sdpa"] = result["sdpa"]["time_s"] / entry["time_s"]
        result["methods"][name] = entry
    return result


@torch.no_grad()
def capture_smollm2_qkv(model: torch.nn.Module, input_ids: torch.Tensor, layers: Sequence[int]) -> dict[int, tuple]:
    """layer -> (q [1, H, N, D], k [1, Hkv, N, D], v, scale) of a causal LM's prefill over input_ids [1, N], as the
    model attends (after RoPE). Queries and keys of a prefix of a causal model's input do not depend on what follows,
    so slicing [..., :n, :] gives exactly the inputs of an n-token prefill."""
    from ...patches import capture_attention

    base = getattr(model, "base_model", model)
    with capture_attention(model, layers=list(layers)) as captured:
        base(input_ids=input_ids, use_cache=False)
    out = {}
    for layer in layers:
        rec = captured[layer][0]
        out[layer] = (rec.query.clone(), rec.key.clone(), rec.value.clone(), rec.scale)
    return out


@torch.no_grad()
def smollm2_article_qkv(tokens: int, layers: Sequence[int]) -> dict:
    """layer -> (q, k, v, scale) of real SmolLM2 (:func:`capture_smollm2_qkv`) on the first Wikipedia article of at
    least 20,000 characters and ``tokens`` tokens, cut to ``tokens``, plus "title": that article. The prefill is slow:
    the result is kept in the package's cache directory (``smollm2_qkv_<tokens>_<layers>.pt``) and read from there
    the next time."""
    from ..data import cache_dir, load_smollm2, wikipedia_articles

    path = os.path.join(str(cache_dir()), f"smollm2_qkv_{tokens}_{'_'.join(map(str, layers))}.pt")
    if os.path.exists(path):
        return torch.load(path)
    model, tokenizer = load_smollm2()
    model.eval()
    for title, text in wikipedia_articles(min_chars=20000):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= tokens:
            break
    else:
        raise RuntimeError(f"no Wikipedia article with >= {tokens} tokens")
    captured = capture_smollm2_qkv(model, ids[:, :tokens], layers)
    captured["title"] = title
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(captured, path)
    return captured


@torch.no_grad()
def capture_encoder_qkv(model: torch.nn.Module, input_ids: torch.Tensor, layers: Sequence[int]) -> dict[int, tuple]:
    """layer -> (q, k, v, scale) of a bidirectional encoder (e.g. BERT/MiniLM) over input_ids [1, N] (no padding)."""
    from ...patches import capture_attention

    with capture_attention(model, layers=list(layers)) as captured:
        model(input_ids=input_ids)
    return {layer: (captured[layer][0].query.clone(), captured[layer][0].key.clone(), captured[layer][0].value.clone(),
                    captured[layer][0].scale) for layer in layers}


# ---------------------------------------------------------------------------------------------------------
# The suite: input kinds x N x causal x dtype, resumable JSON, markdown, plots
# ---------------------------------------------------------------------------------------------------------

INPUT_KINDS = ("random", "smollm2", "minilm")
SMOLLM2_MAX_TOKENS = 8192  # its position limit: real captured inputs stop there
MINILM_TOKENS = 512  # MiniLM's position limit: its real inputs exist only at this length


def kernel_cell_key(inputs: str, n: int, causal: bool, dtype: str) -> str:
    return f"{inputs}|N={n}|causal={causal}|{dtype}"


class RealInputs:
    """Real q/k/v captured once (lazily) from SmolLM2 (causal prefill over a Wikipedia article) and MiniLM (one
    512-token window of the same article, bidirectional), from the layer with the largest Q/K weight norm R
    (the first one ``patch_model`` replaces)."""

    def __init__(self, smollm2_tokens: int = SMOLLM2_MAX_TOKENS) -> None:
        if not 1 <= smollm2_tokens <= SMOLLM2_MAX_TOKENS:
            raise ValueError(f"smollm2_tokens must be in 1..{SMOLLM2_MAX_TOKENS}")
        self.smollm2_tokens = smollm2_tokens  # the capture length; shorter N are its prefixes
        self._smollm2: Optional[dict] = None
        self._minilm: Optional[dict] = None

    def smollm2(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, dict]:
        if n > self.smollm2_tokens:
            raise ValueError(f"SmolLM2 inputs were captured at {self.smollm2_tokens} tokens (its limit: {SMOLLM2_MAX_TOKENS}); "
                             f"no real inputs at N={n}")
        if self._smollm2 is None:
            from ... import rank_layers
            from ..data import load_smollm2, wikipedia_articles

            model, tokenizer = load_smollm2()
            layer = rank_layers(model).order[0]
            title, text = next((t, x) for t, x in wikipedia_articles(min_chars=40000)
                               if len(tokenizer(x).input_ids) >= SMOLLM2_MAX_TOKENS)
            ids = tokenizer(text, return_tensors="pt").input_ids[:, : self.smollm2_tokens]
            q, k, v, scale = capture_smollm2_qkv(model, ids, [layer])[layer]
            self._smollm2 = {"q": q, "k": k, "v": v, "scale": scale, "info": {"model": "SmolLM2-135M-Instruct", "layer": layer, "article": title}}
            del model
        s = self._smollm2
        return s["q"][:, :, :n], s["k"][:, :, :n], s["v"][:, :, :n], s["scale"], s["info"]

    def minilm(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, dict]:
        if n != MINILM_TOKENS:
            raise ValueError(f"MiniLM inputs exist only at N={MINILM_TOKENS} (its position limit)")
        if self._minilm is None:
            from ... import rank_layers
            from ..data import load_minilm, wikipedia_articles

            model, tokenizer = load_minilm()
            layer = rank_layers(model).order[0]
            title, text = wikipedia_articles(min_chars=20000)[0]
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=MINILM_TOKENS).input_ids
            q, k, v, scale = capture_encoder_qkv(model, ids, [layer])[layer]
            self._minilm = {"q": q, "k": k, "v": v, "scale": scale, "info": {"model": "all-MiniLM-L6-v2", "layer": layer, "article": title}}
        s = self._minilm
        return s["q"], s["k"], s["v"], s["scale"], s["info"]


def suite_cells(inputs_kinds: Sequence[str], ns: Sequence[int], causal_modes: Sequence[bool], dtypes: Sequence[str]) -> list[dict]:
    """The cells to run: random at every N; SmolLM2 at every N <= 8192; MiniLM only at N = 512 (bidirectional,
    as the encoder attends). Each: {"inputs", "n", "causal", "dtype", "key"}."""
    unknown = [k for k in inputs_kinds if k not in INPUT_KINDS]
    if unknown:
        raise ValueError(f"unknown input kind(s) {unknown}; choose from {list(INPUT_KINDS)}")
    cells = []
    for kind in inputs_kinds:
        kind_ns = {"random": list(ns), "smollm2": [n for n in ns if n <= SMOLLM2_MAX_TOKENS], "minilm": [MINILM_TOKENS]}[kind]
        kind_causal = [False] if kind == "minilm" else list(causal_modes)
        for dtype in dtypes:
            for causal in kind_causal:
                for n in kind_ns:
                    cells.append({"inputs": kind, "n": n, "causal": causal, "dtype": dtype,
                                  "key": kernel_cell_key(kind, n, causal, dtype)})
    return cells


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_kernel_suite(out_dir: str, cells: Sequence[dict], methods: Sequence[str], *, repeats: int = 3, warmup: int = 1,
                     params: Optional[dict[str, dict]] = None, max_n: Optional[dict[str, int]] = None,
                     header: Optional[dict] = None, progress: bool = True, real: Optional[RealInputs] = None,
                     device: str = "cpu") -> dict:
    """Run the cells not yet in ``out_dir``/results.json (rewritten atomically after every cell: resumable).
    ``max_n``: method -> largest N it runs at (slow methods); above it the cell lists the method as skipped.
    ``device``: where every call runs ("cpu", "cuda", "cuda:1"); inputs are drawn or captured on the CPU and moved."""
    import json

    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    results = {"cells": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    results.update(header or {})
    todo = [c for c in cells if c["key"] not in results["cells"]]
    if real is None:
        real = RealInputs(max([c["n"] for c in todo if c["inputs"] == "smollm2"], default=SMOLLM2_MAX_TOKENS))
    for cell in tqdm(todo, desc="kernel bench", unit="cell", disable=not progress):
        dtype = DTYPES[cell["dtype"]]
        if cell["inputs"] == "random":
            q, k, v = random_qkv(cell["n"], dtype=dtype)
            scale, info = None, {"inputs": "standard normal, B=1, H=8, D=64, seed 0"}
        else:
            q, k, v, scale, info = getattr(real, cell["inputs"])(cell["n"])
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        chosen = [m for m in methods if (max_n or {}).get(m, 1 << 62) >= cell["n"]]
        res = bench_on_inputs(chosen, q, k, v, causal=cell["causal"], scale=scale, repeats=repeats, warmup=warmup,
                              params=params, device=device)
        res.update({"inputs": cell["inputs"], "source": info, "skipped": [m for m in methods if m not in chosen],
                    "load_avg_1min": os.getloadavg()[0]})
        results["cells"][cell["key"]] = res
        write_json(path, results)
    return results


def kernel_report_markdown(results: dict, header_lines: Sequence[str]) -> str:
    lines = list(header_lines)
    cells = list(results["cells"].values())
    for kind in INPUT_KINDS:
        mine = sorted([c for c in cells if c["inputs"] == kind], key=lambda c: (c["dtype"], c["causal"], c["n"]))
        if not mine:
            continue
        src = mine[0]["source"]
        lines += ["", f"## Inputs: {kind} ({', '.join(f'{k}={v}' for k, v in src.items())})", "",
                  "| N | causal | dtype | SDPA s (spread) | SDPA GFLOP/s | SDPA err | method | time s (spread) | speed-up | useful GFLOP/s | peak extra MB | rel. error | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in mine:
            s = c["sdpa"]
            for name, m in c["methods"].items():
                row = f"| {c['n']} | {c['causal']} | {c['dtype']} | {s['time_s']:.3f} ({s['spread_s']:.3f}) | {s['useful_gflops']:.0f} | {s['rel_error']:.1e} | {name} | "
                if "failed" in m:
                    row += f"failed: {m['failed'][:90]} | | | | |"
                    row += f" {c.get('load_avg_1min', float('nan')):.1f} |"
                else:
                    row += (f"{m['time_s']:.3f} ({m['spread_s']:.3f}) | {m['speedup_vs_sdpa']:.2f}x | {m['useful_gflops']:.0f} | "
                            f"{m['peak_extra_mb']:.0f} | {m['rel_error']:.2e} | {c.get('load_avg_1min', float('nan')):.1f} |")
                lines.append(row)
            if c.get("skipped"):
                lines.append(f"| {c['n']} | {c['causal']} | {c['dtype']} | | | | {', '.join(c['skipped'])} | not run (too slow at this N) | | | | | |")
    return "\n".join(lines) + "\n"
