"""Measuring one sequence: prefill time and next-token loss of a causal LM, attention's share of the prefill
(torch.profiler) and the Amdahl ceiling it sets; decode: time per generated token against a KV cache after a prefill,
the exact model against a patched one (or one cache kind against another)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

# ---------------------------------------------------------------------------------------------------------
# Scoring one sequence
# ---------------------------------------------------------------------------------------------------------

def decoder_and_head(model: torch.nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.nn.Module]:
    """(decoder, head): ``decoder(input_ids [1, N]) -> hidden [1, N, hidden]`` runs the base model without cache
    or LM head; ``head`` maps hidden states to logits.

    Transformers causal LMs: ``model.base_model`` and ``model.get_output_embeddings()``. ChatGLM2/3 (remote code)
    keep the head inside the base model, at ``model.transformer.output_layer``, and their base model returns
    sequence-first hidden states ``[N, 1, hidden]`` (the 2024 code: ``[1, N, hidden]``); the decoder turns them
    batch-first. Any other model: TypeError."""
    transformer = getattr(model, "transformer", None)
    chatglm_head = getattr(transformer, "output_layer", None)
    if isinstance(chatglm_head, torch.nn.Module) and hasattr(transformer, "encoder"):
        def chatglm_decoder(input_ids: torch.Tensor) -> torch.Tensor:
            hidden = transformer(input_ids=input_ids, use_cache=False).last_hidden_state
            n = input_ids.shape[1]
            if hidden.shape[0] == n and hidden.shape[1] == input_ids.shape[0] and n != input_ids.shape[0]:
                hidden = hidden.transpose(0, 1)  # [N, 1, hidden] -> [1, N, hidden]
            return hidden

        return chatglm_decoder, chatglm_head
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a base model and an LM head "
                        "(e.g. LlamaForCausalLM, or ChatGLM's transformer.output_layer); the model benchmark needs "
                        "next-token logits")
    return (lambda input_ids: base(input_ids=input_ids, use_cache=False).last_hidden_state), head


@torch.no_grad()
def prefill_and_nll(model: torch.nn.Module, input_ids: torch.Tensor, loss_chunk: int = 1024) -> tuple[float, int, float]:
    """(sum of natural-log next-token losses over the N - 1 predicted tokens, N - 1, prefill seconds).

    input_ids [1, N]. The prefill (timed) is the base model's forward (:func:`decoder_and_head`); the losses come
    from the LM head applied to ``loss_chunk`` rows of hidden states at a time (untimed), in float32. For models
    whose logits are the plain LM-head projection of the last hidden state (Llama, Mistral, Qwen2, GPT-2, GLM,
    ChatGLM2/3; not models with logit soft-capping), this equals
    cross_entropy(model(input_ids).logits[0, :-1], input_ids[0, 1:], reduction="sum").
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [1, N] with N >= 2; got {tuple(input_ids.shape)}")
    decoder, head = decoder_and_head(model)
    start = time.perf_counter()
    hidden = decoder(input_ids)  # [1, N, hidden]
    seconds = time.perf_counter() - start
    n = input_ids.shape[1]
    nll = 0.0
    for s in range(0, n - 1, loss_chunk):
        e = min(n - 1, s + loss_chunk)
        logits = head(hidden[0, s:e]).float()  # [e - s, vocab]
        nll += torch.nn.functional.cross_entropy(logits, input_ids[0, s + 1 : e + 1], reduction="sum").item()
    return nll, n - 1, seconds


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean natural-log loss). Natural log throughout: not 2**loss (the public HyperAttention script's slip)."""
    if tokens <= 0:
        raise ValueError("no tokens were scored")
    return math.exp(nll_sum / tokens)


# ---------------------------------------------------------------------------------------------------------
# Attention's share of prefill (torch.profiler) and the Amdahl ceiling
# ---------------------------------------------------------------------------------------------------------

ATTENTION_MODULE_LABEL = "hf_sparse_attn::attention_module"
SDPA_OP = "aten::scaled_dot_product_attention"


@torch.no_grad()
def profile_attention_share(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Profile one prefill of ``model`` (run it unpatched: the attention op is SDPA) with ``torch.profiler``.

    Returns {"wall_s", "sdpa_s", "attention_module_s", "sdpa_share", "attention_module_share", "sdpa_calls",
    "attention_module_calls"}: time inside ``aten::scaled_dot_product_attention`` and inside the attention
    modules (each module forward wrapped in a ``record_function`` through hooks) over the forward's wall time.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from ...patches import find_adapter

    decoder, _ = decoder_and_head(model)
    modules = find_adapter(model).attention_layers(model)
    open_ranges: list[Any] = []

    def pre_hook(_module, _args):
        ctx = record_function(ATTENTION_MODULE_LABEL)
        ctx.__enter__()
        open_ranges.append(ctx)

    def post_hook(_module, _args, _out):
        open_ranges.pop().__exit__(None, None, None)

    handles = [m.register_forward_pre_hook(pre_hook) for m in modules] + [m.register_forward_hook(post_hook) for m in modules]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            decoder(input_ids)
            wall = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    totals = {SDPA_OP: [0.0, 0], ATTENTION_MODULE_LABEL: [0.0, 0]}
    for event in prof.key_averages():
        if event.key in totals:
            totals[event.key][0] += event.cpu_time_total / 1e6  # microseconds -> seconds
            totals[event.key][1] += event.count
    sdpa_s, sdpa_calls = totals[SDPA_OP]
    module_s, module_calls = totals[ATTENTION_MODULE_LABEL]
    return {"wall_s": wall, "sdpa_s": sdpa_s, "attention_module_s": module_s, "sdpa_share": sdpa_s / wall,
            "attention_module_share": module_s / wall, "sdpa_calls": int(sdpa_calls), "attention_module_calls": int(module_calls)}


def amdahl_ceiling(share: float, replaced_layers: int, num_layers: int) -> float:
    """Best possible speed-up when ``replaced_layers`` of ``num_layers`` equal layers lose their attention time
    entirely: 1 / (1 - share * replaced / num_layers), ``share`` = attention's fraction of the whole prefill."""
    if not 0.0 <= share < 1.0 or not 0 <= replaced_layers <= num_layers:
        raise ValueError(f"need 0 <= share < 1 and 0 <= replaced_layers <= num_layers; got {share}, {replaced_layers}, {num_layers}")
    return 1.0 / (1.0 - share * replaced_layers / num_layers)


# ---------------------------------------------------------------------------------------------------------
# Contexts longer than the model was trained on
# ---------------------------------------------------------------------------------------------------------

ROPE_SCALINGS = ("yarn", "linear", "dynamic")


def scale_rope(model: torch.nn.Module, tokens: int, rope_type: str = "yarn") -> dict[str, Any]:
    """Scale the model's rotary position embedding to ``tokens`` positions, in place, and return the RoPE parameters
    now in use. The factor is ``tokens / max_position_embeddings`` of the loaded checkpoint; at or below the
    checkpoint's length the original RoPE is restored. ``rope_type``: one of ``ROPE_SCALINGS``, transformers' RoPE
    types (``yarn``: Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models").

    Works for models whose rotary module is rebuilt from the config (Llama family in transformers 5: a module with
    ``inv_freq`` and ``rope_type`` built as ``Module(config)``); any other model: TypeError."""
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling {rope_type!r}: choose one of {', '.join(ROPE_SCALINGS)}")
    config = model.config
    if not hasattr(model, "_hf_sparse_attn_original_rope"):
        params = getattr(config, "rope_parameters", None)
        if not isinstance(params, dict) or not getattr(config, "max_position_embeddings", None):
            raise TypeError(f"{type(model).__name__} has no config.rope_parameters / max_position_embeddings to scale")
        model._hf_sparse_attn_original_rope = (dict(params), int(config.max_position_embeddings))
    original_params, original_max = model._hf_sparse_attn_original_rope
    if tokens <= original_max:
        params, max_positions = dict(original_params), original_max
    else:
        params = {**original_params, "rope_type": rope_type, "factor": tokens / original_max,
                  "original_max_position_embeddings": original_max}
        max_positions = tokens
    config.rope_parameters = params
    config.max_position_embeddings = max_positions
    rotary = [(name, m) for name, m in model.named_modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_type")]
    if not rotary:
        raise TypeError(f"{type(model).__name__}: no rotary embedding module (inv_freq, rope_type) found to rebuild")
    for name, module in rotary:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        rebuilt = type(module)(config).to(module.inv_freq.device)
        setattr(parent, name.rsplit(".", 1)[-1], rebuilt)
    return dict(params, max_position_embeddings=max_positions)


# ---------------------------------------------------------------------------------------------------------
# Decode: single-token greedy steps against a KV cache after a prefill
# ---------------------------------------------------------------------------------------------------------

DECODE_CACHES = ("dynamic", "growing")
DECODE_CACHE_NAMES = {"dynamic": "DynamicCache", "growing": "GrowingCache"}


def new_decode_cache(kind: str, model: torch.nn.Module) -> Any:
    """An empty cache of ``kind``: "dynamic" (transformers' ``DynamicCache``, appends with ``torch.cat``) or "growing"
    (:class:`hf_sparse_attn.GrowingCache`, appends into buffers that grow by doubling)."""
    from transformers import DynamicCache

    from ...patches.decode_cache import GrowingCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "growing":
        return GrowingCache(model.config)
    raise ValueError(f"decode cache {kind!r}: choose one of {', '.join(DECODE_CACHES)}")


def copy_decode_cache(source: Any, kind: str, model: torch.nn.Module) -> Any:
    """A fresh cache of ``kind`` holding copies of ``source``'s keys and values (one prefill serving two caches)."""
    cache = new_decode_cache(kind, model)
    for i, layer in enumerate(source.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    return cache


class _DecodeRun:
    """One greedy decode of one prompt: the cache, the next input token [1, 1] and the 2-D mask of ones, grown per
    step as ``generate()`` grows it."""

    def __init__(self, model: torch.nn.Module, cache: Any, first_token: torch.Tensor, prompt_tokens: int):
        self.model, self.cache, self.token = model, cache, first_token
        self.mask = torch.ones(1, prompt_tokens, dtype=torch.long)
        self.tokens = [int(first_token)]
        self.step_ms: list[float] = []
        from ...patches.decode_cache import cache_keyword

        self._arg = cache_keyword(model)

    @torch.no_grad()
    def step(self) -> None:
        """One timed single-token forward (its mask update included); appends the argmax token."""
        start = time.perf_counter()
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, 1)], dim=1)
        logits = self.model(input_ids=self.token, attention_mask=self.mask, use_cache=True,
                            **{self._arg: self.cache}).logits
        self.token = logits[:, -1:].argmax(-1)
        self.step_ms.append(1e3 * (time.perf_counter() - start))
        self.tokens.append(int(self.token))


@torch.no_grad()
def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Fill ``cache`` with the prompt (untimed); returns the first generated token [1, 1] (greedy)."""
    return _prefill_logits(model, input_ids, cache).argmax(-1, keepdim=True)


@torch.no_grad()
def _prefill_logits(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Fill ``cache`` with the prompt (untimed); returns the logits of the prompt's last position [1, V]."""
    from ...patches.decode_cache import cache_keyword

    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                   **{cache_keyword(model): cache}).logits
    return logits[:, -1].float()


@torch.no_grad()
def continuation_nll(model: torch.nn.Module, cache: Any, prompt_tokens: int, last_logits: torch.Tensor,
                     tokens: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats per token) under ``model`` of ``tokens`` [T ints] continuing a prompt of
    ``prompt_tokens`` tokens: ``last_logits`` [1, V] (the prompt's last position) scores the first token, one forward
    of tokens[:-1] against ``cache`` the rest (teacher forcing). ``cache`` must hold the prompt first (it is cropped
    to ``prompt_tokens``, so a cache that has decoded since can serve)."""
    from ...patches.decode_cache import cache_keyword

    extra = cache.get_seq_length() - prompt_tokens
    if extra < 0:
        raise ValueError(f"the cache holds {cache.get_seq_length()} tokens, fewer than the prompt's {prompt_tokens}")
    if extra:
        cache.crop(-extra)  # a negative crop removes that many tokens in every transformers 5.x release
    log_probs = [torch.log_softmax(last_logits.float(), -1)[0, tokens[0]]]
    if len(tokens) > 1:
        ids = torch.tensor([list(tokens[:-1])])
        mask = torch.ones(1, prompt_tokens + ids.shape[1], dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_keyword(model): cache}).logits
        step = torch.log_softmax(logits[0].float(), -1)
        log_probs += list(step.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0])
    return -float(torch.stack(log_probs).mean())


@torch.no_grad()
def teacher_forced_decode_nll(model: torch.nn.Module, cache: Any, input_ids: torch.Tensor, tokens: int) -> float:
    """Mean negative log-likelihood (nats per token) of the last ``tokens`` tokens of the prompt input_ids [1, N], each
    predicted by a single-token step against ``cache`` (teacher forcing through the decode path, on the true text).

    ``cache`` holds the prompt first (and maybe tokens decoded since); it is cropped to its first N - tokens - 1
    positions, then ids[N - tokens - 1], ..., ids[N - 2] are fed one per step, each step's logits scoring the next
    true token. Through a patched model every prediction runs its decode method (the positions kept hold the keys and
    values of the prefill of all N tokens)."""
    from ...patches.decode_cache import cache_keyword

    n = input_ids.shape[1]
    if not 1 <= tokens <= n - 2:
        raise ValueError(f"tokens must be in [1, N - 2] = [1, {n - 2}], got {tokens}")
    keep = n - tokens - 1
    extra = cache.get_seq_length() - keep
    if extra < 0 or cache.get_seq_length() < n:
        raise ValueError(f"the cache holds {cache.get_seq_length()} tokens, fewer than the prompt's {n}")
    cache.crop(-extra)
    mask = torch.ones(1, keep, dtype=torch.long)
    nll = []
    for j in range(keep, n - 1):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        logits = model(input_ids=input_ids[:, j:j + 1], attention_mask=mask, use_cache=True,
                       **{cache_keyword(model): cache}).logits
        nll.append(-torch.log_softmax(logits[0, -1].float(), -1)[input_ids[0, j + 1]])
    return float(torch.stack(nll).mean())


def _summary(run: _DecodeRun, kind: str) -> dict:
    median = statistics.median(run.step_ms)
    return {"cache": DECODE_CACHE_NAMES[kind], "step_ms": run.step_ms, "median_ms": median,
            "tokens_per_s": 1e3 / median, "tokens": run.tokens}


def time_decode(model: torch.nn.Module, input_ids: torch.Tensor, steps: int, cache: str = "dynamic") -> dict:
    """Prefill ``input_ids`` [1, N] into a fresh cache of kind ``cache`` (untimed), then time ``steps`` greedy
    single-token decode steps against it.

    Returns {"cache": class name, "step_ms": [steps floats], "median_ms", "tokens_per_s" (1000 / median_ms),
    "tokens": [steps + 1 ints]}: the first generated token (from the prefill's logits) and one per step, i.e. what
    ``model.generate(input_ids, max_new_tokens=steps + 1, do_sample=False)`` generates."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or steps < 1:
        raise ValueError(f"input_ids must be [1, N] and steps >= 1; got {tuple(input_ids.shape)}, {steps}")
    kv = new_decode_cache(cache, model)
    run = _DecodeRun(model, kv, _prefill(model, input_ids, kv), input_ids.shape[1])
    for _ in range(steps):
        run.step()
    return _summary(run, cache)


def compare_decode(model: torch.nn.Module, input_ids: torch.Tensor, steps: int, *, baseline_cache: str = "dynamic",
                   cell_cache: str = "dynamic", enter_cell: Optional[Callable[[], None]] = None,
                   exit_cell: Optional[Callable[[], None]] = None, cell_first: bool = False) -> dict:
    """Greedy decode of one prompt [1, N] by the baseline (``model`` as it is, ``baseline_cache``) and by the cell
    (the model between ``enter_cell()`` and ``exit_cell()``, e.g. patched, with ``cell_cache``), ``steps`` timed
    single-token steps each (as :func:`time_decode`), the two decodes alternating step by step (``cell_first``: the
    cell's step first in every pair), so that both sides see the same load of the machine.

    Without ``enter_cell`` both sides are the same model: the prompt is prefilled once and copied into both caches.
    Otherwise each side prefills its own cache (untimed), and the cell's prefill and each of its steps run between
    an ``enter_cell()`` and an ``exit_cell()`` call, both outside the timed step.
    Returns {"baseline": time_decode's dict, "cell": ..., "speedup": baseline median_ms / cell median_ms,
    "same_tokens": how many leading generated tokens agree, "exact_nll": {"baseline": ..., "cell": ...}: each side's
    generated tokens scored by the exact model (:func:`continuation_nll`, nats per token)}: the quality of the
    cell's continuation, which greedy agreement alone under-rates (a different but as likely wording); "forced_nll":
    {"baseline": ..., "cell": ...}: the prompt's last ``steps`` tokens predicted through each side's decode path
    (:func:`teacher_forced_decode_nll`, after the timed steps; the cell's between enter_cell and exit_cell): the
    decode attention's own error on the true text, which the generated continuation cannot show (a patched model that
    repeats the article scores well there).
    The prompt must be longer than ``steps + 1`` tokens."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or not 1 <= steps <= input_ids.shape[1] - 2:
        raise ValueError(f"input_ids must be [1, N] and 1 <= steps <= N - 2; got {tuple(input_ids.shape)}, {steps}")

    def as_cell(fn: Callable[[], Any]) -> Any:
        if enter_cell is not None:
            enter_cell()
        try:
            return fn()
        finally:
            if exit_cell is not None:
                exit_cell()

    n = input_ids.shape[1]
    if enter_cell is None:
        shared = new_decode_cache("dynamic", model)
        base_logits = _prefill_logits(model, input_ids, shared)
        first = base_logits.argmax(-1, keepdim=True)
        runs = {side: _DecodeRun(model, copy_decode_cache(shared, kind, model), first, n)
                for side, kind in (("baseline", baseline_cache), ("cell", cell_cache))}
        del shared
    else:
        base_kv = new_decode_cache(baseline_cache, model)
        base_logits = _prefill_logits(model, input_ids, base_kv)
        runs = {"baseline": _DecodeRun(model, base_kv, base_logits.argmax(-1, keepdim=True), n)}
        cell_kv = new_decode_cache(cell_cache, model)
        runs["cell"] = _DecodeRun(model, cell_kv, as_cell(lambda: _prefill(model, input_ids, cell_kv)), n)
    order = ("cell", "baseline") if cell_first else ("baseline", "cell")
    for _ in range(steps):
        for side in order:
            if side == "cell":
                as_cell(runs["cell"].step)
            else:
                runs["baseline"].step()
    out = {"baseline": _summary(runs["baseline"], baseline_cache), "cell": _summary(runs["cell"], cell_cache)}
    same = 0
    for a, b in zip(out["baseline"]["tokens"], out["cell"]["tokens"]):
        if a != b:
            break
        same += 1
    # the prompt's last `steps` tokens predicted through the cell's decode path (teacher forcing on the true text)
    forced = {"cell": as_cell(lambda: teacher_forced_decode_nll(model, runs["cell"].cache, input_ids, steps))}
    del runs["cell"]
    # both continuations scored by the exact model (the baseline's cache, cropped back to the prompt)
    nll = {side: continuation_nll(model, runs["baseline"].cache, n, base_logits, out[side]["tokens"])
           for side in ("baseline", "cell")}
    forced["baseline"] = teacher_forced_decode_nll(model, runs["baseline"].cache, input_ids, steps)
    return {**out, "speedup": out["baseline"]["median_ms"] / out["cell"]["median_ms"], "same_tokens": same,
            "exact_nll": nll, "forced_nll": forced}


def ratio_interval(baseline: Sequence[float], cell: Sequence[float], draws: int = 10000,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of sum(baseline) / sum(cell) over prompts (prompts resampled with
    replacement, ``draws`` times, a fixed generator): the interval of a speed-up measured on these prompts."""
    if len(baseline) != len(cell) or not baseline:
        raise ValueError("need one baseline and one cell value per prompt")
    return _bootstrap(lambda total: total(baseline) / total(cell), len(baseline), draws, level)


def _bootstrap(statistic: Callable, count: int, draws: int, level: float) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic(total)`` over ``count`` prompts resampled with replacement
    (``draws`` times, a fixed generator); ``total(values)`` is the [draws] float64 tensor of each draw's sum of
    ``values`` (one per prompt)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, count, (draws, count), generator=g)
    total = lambda values: torch.tensor(values, dtype=torch.float64)[idx].sum(1)  # noqa: E731
    lo, hi = torch.quantile(statistic(total), torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                           dtype=torch.float64)).tolist()
    return lo, hi


def perplexity_change_interval(baseline_nll: Sequence[float], cell_nll: Sequence[float], tokens: Sequence[int],
                               draws: int = 10000, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval, in %, of the perplexity change 100 * (exp((sum(cell_nll) - sum(baseline_nll)) /
    sum(tokens)) - 1) over articles (each article's summed natural-log loss of both sides and its scored tokens;
    articles resampled with replacement, ``draws`` times, the generator of :func:`ratio_interval`)."""
    if not (len(baseline_nll) == len(cell_nll) == len(tokens)) or not tokens:
        raise ValueError("need one baseline loss, one cell loss and one token count per article")
    return _bootstrap(lambda total: 100 * torch.expm1((total(cell_nll) - total(baseline_nll)) / total(tokens)),
                      len(tokens), draws, level)
