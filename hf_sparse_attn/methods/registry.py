"""The method registry: every attention method is a function of one contract, registered by name.

The contract (docs/architecture.md)::

    method(q, k, v, *, causal: bool, scale: float, key_padding_mask=None, generator=None, **params)
        -> (out, lse)

    q                 [B, H, Nq, D]   any float dtype
    k, v              [B, H, Nk, D]   already expanded for GQA (same H as q)
    key_padding_mask  [B, Nk] bool    True = this key may be attended; None = all keys valid
    causal            query i attends key j only if j <= i (Nq == Nk; aligned top-left)
    out               [B, H, Nq, D]   dtype of q, accumulated in float32
    lse               [B, H, Nq]      float32 natural-log sum of exp(scale * q.k) over attended keys;
                                      -inf for a query row with no key to attend (its out row is 0)

A method declares ``supports_grad=False`` when autograd through it does not give its gradient; the adapter then
runs exact attention for calls that need gradients (``needs_grad``).

A method may also declare ``check(q, k, causal, key_padding_mask, params[, scale]) -> str | None``: a reason why it
cannot serve this call (the adapter then runs exact attention and counts the reason in the plan). The call's softmax
scale is passed as the keyword ``scale`` to checks that take it.

A causal method may declare ``chunk_fn``, which serves a prompt fed in chunks against a KV cache (transformers'
``generate(prefill_chunk_size=...)``) as the method's own prefill would, under the decode contract
(methods/decode.py: grouped KV heads, the first kv_len cache positions valid)::

    chunk_fn(q, k_cache, v_cache, *, scale, kv_len, key_padding_mask=None, **params) -> (out, lse)

    q                 [B, Hq, C, D]   the chunk's rows, at positions kv_len - C ... kv_len - 1 (causal)
    k_cache, v_cache  [B, Hkv, L, D]  grouped heads (Hq = g Hkv), the first kv_len <= L positions valid
    key_padding_mask  [B, kv_len]     bool, True = real key; or None
    out, lse          [B, Hq, C, D], [B, Hq, C]  as the method's

with every parameter of the method. Without one, chunks go to the layer's decode method (exact by default).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Optional

import torch

from ..kernels import needs_grad  # noqa: F401  (re-exported for the adapters; the methods import it from merge.py)

MethodFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# Upper bound of every parameter counted in tokens (window, block_size, sample_size, num_samples, min_seq_len, ...):
# 16M tokens, beyond any context length. Methods also cap each such parameter at the call's sequence length (a
# window of 10**7 on 256 tokens runs as a window of 256, with the same output), so that memory and time follow the
# input, never the parameter; this bound only turns a typo (10**12) into an error at patch time.
MAX_TOKENS = 2**24
# Uniform samples drawn with replacement (hyper's sample_size) are capped at this many per key of the call: past N
# they cost more than exact attention over the same keys, but a Monte-Carlo estimate still converges with more of
# them (tests/test_hyper.py runs 21 N); 32 N bounds the memory by the input (same output as sample_size = 32 N).
MAX_SAMPLES_PER_KEY = 32
CheckFn = Callable[..., Optional[str]]


class _FromSignature:
    """The default of a :class:`Param` declared without one: the method function's signature supplies it."""

    def __repr__(self) -> str:
        return "<default from the function's signature>"


FROM_SIGNATURE: Any = _FromSignature()


@dataclasses.dataclass(frozen=True)
class Param:
    """One tunable parameter of a method: its type, allowed range and help.

    Its default is stated once, in the method function's signature: declare ``Param(kind=int, low=1, ...)`` and
    :func:`register_method` (or ``decode.register_decode_method``) fills ``default`` from the signature. A default
    given here as well must equal the signature's (registering refuses a disagreement); it is needed only for a
    parameter the function takes through ``**kwargs``.
    """

    default: Any = FROM_SIGNATURE
    kind: type = int
    low: Optional[float] = None  # inclusive
    high: Optional[float] = None  # inclusive
    choices: Optional[tuple] = None
    help: str = ""

    def validate(self, method: str, name: str, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"method {method!r}: parameter {name!r} must be a bool, got {value!r}")
            return value
        if self.kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"method {method!r}: parameter {name!r} must be a {self.kind.__name__}, got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not math.isfinite(value) or int(value) != value:
                raise ValueError(f"method {method!r}: parameter {name!r} must be an integer, got {value!r}")
            value = int(value)
            if not INT_MIN <= value <= INT_MAX:  # every int parameter ends up in an int64 tensor or a generator seed
                raise ValueError(f"method {method!r}: parameter {name!r}={value} does not fit in 64 bits; it must be "
                                 f"an int in {self._range_text(INT_MIN, INT_MAX)}")
        elif self.kind is float:
            if not math.isfinite(value):
                raise ValueError(f"method {method!r}: parameter {name!r} must be a finite number, got {value!r}"
                                 f"{'; valid: ' + self._range_text(None, None) if self.low is not None or self.high is not None else ''}")
            value = float(value)
        elif self.kind is str and not isinstance(value, str):
            raise ValueError(f"method {method!r}: parameter {name!r} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"method {method!r}: parameter {name!r}={value!r} is not one of {list(self.choices)}")
        if self.low is not None and value < self.low:
            raise ValueError(f"method {method!r}: parameter {name!r}={value!r} is below its minimum {self.low}")
        if self.high is not None and value > self.high:
            raise ValueError(f"method {method!r}: parameter {name!r}={value!r} is above its maximum {self.high}")
        return value

    def _range_text(self, default_low: Optional[float], default_high: Optional[float]) -> str:
        low = self.low if self.low is not None else default_low
        high = self.high if self.high is not None else default_high
        return f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"


def params_with_defaults(owner: str, fn: Callable[..., Any], params: dict[str, Param]) -> dict[str, Param]:
    """``params`` with every default taken from ``fn``'s signature (the one place a default is stated).

    ``owner`` names the method in errors (e.g. "method 'hyper'"). A parameter ``fn`` does not take is an error unless
    ``fn`` accepts ``**kwargs`` and the Param states its own default; a Param default that differs from the
    signature's, or a parameter with neither, is an error.
    """
    signature = inspect.signature(fn)
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    resolved = {}
    for pname, param in params.items():
        declared = signature.parameters.get(pname)
        if declared is None and not accepts_kwargs:
            raise TypeError(f"{owner}: parameter {pname!r} is declared but its function does not take it")
        default = inspect.Parameter.empty if declared is None else declared.default
        if default is inspect.Parameter.empty:
            if param.default is FROM_SIGNATURE:
                raise TypeError(f"{owner}: parameter {pname!r} has no default (give it one in the function's signature)")
            resolved[pname] = param
            continue
        if param.default is not FROM_SIGNATURE and (type(param.default) is not type(default) or param.default != default):
            raise ValueError(f"{owner}: parameter {pname!r} declares the default {param.default!r} but its function's "
                             f"signature says {default!r}; state it once, in the signature")
        resolved[pname] = dataclasses.replace(param, default=default)
    return resolved


def resolve_param_values(kind: str, name: str, params: dict[str, Param], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every given value validated (``Param.validate``); an unknown name is an error naming
    the ``kind`` ("method", "decode method"), the method ``name`` and its parameters. The one resolve path of both
    registries."""
    unknown = sorted(set(given) - set(params))
    if unknown:
        known = ", ".join(sorted(params)) or "(none)"
        raise ValueError(f"{kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters are: {known}")
    return {pname: (param.validate(name, pname, given[pname]) if pname in given else param.default)
            for pname, param in params.items()}


def bind_params(fn: Callable[..., Any], name: str, resolved: dict[str, Any]) -> Callable[..., Any]:
    """``fn`` with the resolved parameters bound, carrying ``method_name`` and ``method_params``."""
    bound = functools.partial(fn, **resolved)
    functools.update_wrapper(bound, fn)
    bound.method_name = name  # type: ignore[attr-defined]
    bound.method_params = resolved  # type: ignore[attr-defined]
    return bound


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method: the function of the contract, its parameters, and what it comes from."""

    name: str
    fn: MethodFn
    params: dict[str, Param]
    check: Optional[CheckFn] = None
    source: str = ""  # paper and algorithm, e.g. 'Attention is Naturally Sparse, Algorithm 1'
    summary: str = ""
    # Whether autograd through ``fn`` gives the gradient of its output (a tested backward). False: when gradients
    # are needed the adapter runs exact attention instead and the plan counts NO_GRADIENT_REASON.
    supports_grad: bool = True
    # The parameter that holds the length below which the adapter's decision runs exact attention instead (None: the
    # method has no such threshold); register_method's ``min_seq_len_param`` sets it. The decision reads it through
    # :meth:`min_seq_len`, never by a name of its own.
    min_seq_len_param: Optional[str] = "min_seq_len"
    # Serves a prompt chunk against a KV cache (the chunk contract of this module's docstring), or None: chunks go to
    # the layer's decode method. No backward: a chunk that needs gradients goes to the decode method too.
    chunk_fn: Optional[Callable[..., "tuple[torch.Tensor, torch.Tensor]"]] = None

    def min_seq_len(self, params: dict[str, Any]) -> int:
        """The threshold of ``params`` (resolved or partial: a missing value is the declared default); 0 for none."""
        name = self.min_seq_len_param
        if name is None or name not in self.params:
            return 0
        value = params[name] if name in params else self.resolve_params({})[name]
        return int(value or 0)

    def why_not(self, q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
                params: dict[str, Any], scale: float) -> Optional[str]:
        """The method's own reason not to serve this call (its ``check``), or None. The adapter's decision
        (``patches/base.py: LayerRuntime.decide``) asks it last, after the rules every method shares.
        q [B, H, Nq, D], k [B, H, Nk, D] (KV heads expanded), key_padding_mask [B, Nk] bool or None."""
        if self.check is None:
            return None
        if "scale" in inspect.signature(self.check).parameters:
            return self.check(q, k, causal, key_padding_mask, params, scale=scale)
        return self.check(q, k, causal, key_padding_mask, params)

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and every given value validated; unknown names are an error."""
        return resolve_param_values("method", self.name, self.params, params)


_REGISTRY: dict[str, MethodSpec] = {}
# register_method's default min_seq_len_param: the parameter named "min_seq_len" when the method declares one, else none
_BY_NAME: Any = object()


def register_method(
    name: str,
    fn: MethodFn,
    *,
    params: Optional[dict[str, Param]] = None,
    check: Optional[CheckFn] = None,
    source: str = "",
    summary: str = "",
    supports_grad: bool = True,
    min_seq_len_param: Optional[str] = _BY_NAME,
    chunk_fn: Optional[Callable[..., Any]] = None,
    overwrite: bool = False,
) -> MethodSpec:
    """Register ``fn`` (the contract in this module's docstring) under ``name``.

    ``params`` declares every keyword parameter ``fn`` takes beyond the contract's own, with its type and range; its
    default is the one of ``fn``'s signature (:func:`params_with_defaults`).
    ``supports_grad``: False declares that ``fn`` has no usable backward; the adapter then runs exact attention
    whenever autograd needs the gradient of the attention inputs (and the plan records why).
    ``min_seq_len_param``: the declared int parameter that holds the method's minimum sequence length: the adapter's
    decision runs exact attention for a call with fewer keys, counted as ``seq_len < min_seq_len=N``
    (:attr:`MethodSpec.min_seq_len_param`). None: no threshold. Left out: the parameter ``min_seq_len`` if the method
    declares one, else none. A name that is not a declared int parameter is a ValueError naming the parameters.
    ``chunk_fn``: serves prompt chunks against a KV cache (the chunk contract in this module's docstring); it must
    take every declared parameter.
    """
    if not isinstance(supports_grad, bool):
        raise TypeError(f"method {name!r}: supports_grad must be a bool, got {supports_grad!r}")
    if not name or not isinstance(name, str):
        raise ValueError("a method needs a non-empty string name")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace it")
    params = dict(params or {})
    signature = inspect.signature(fn)
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for required in ("causal", "scale", "key_padding_mask", "generator"):
        if required not in signature.parameters and not accepts_kwargs:
            raise TypeError(f"method {name!r}: its function must take the keyword {required!r} (see the method contract)")
    params = params_with_defaults(f"method {name!r}", fn, params)
    if min_seq_len_param is _BY_NAME:
        min_seq_len_param = "min_seq_len" if "min_seq_len" in params else None
    elif min_seq_len_param is not None and (min_seq_len_param not in params or params[min_seq_len_param].kind is not int):
        declared = ", ".join(f"{p} ({param.kind.__name__})" for p, param in params.items()) or "none"
        raise ValueError(f"method {name!r}: min_seq_len_param={min_seq_len_param!r} must name one of its declared int "
                         f"parameters; its parameters: {declared}")
    if chunk_fn is not None:
        chunk_signature = inspect.signature(chunk_fn).parameters
        missing = [p for p in ("scale", "kv_len", "key_padding_mask", *params) if p not in chunk_signature]
        if missing and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in chunk_signature.values()):
            raise TypeError(f"method {name!r}: its chunk_fn must take the keywords {missing} (the chunk contract and "
                            "every parameter of the method)")
    spec = MethodSpec(name=name, fn=fn, params=params, check=check, source=source, summary=summary,
                      supports_grad=supports_grad, min_seq_len_param=min_seq_len_param, chunk_fn=chunk_fn)
    _REGISTRY[name] = spec
    return spec


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``; a clear error listing the methods otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(list_methods())}") from None


def get_method(name: str, **params: Any) -> MethodFn:
    """The method ``name`` with ``params`` validated and bound, callable on bare tensors:

    ``out, lse = get_method("exact")(q, k, v, causal=True, scale=D ** -0.5)``
    """
    spec = get_spec(name)
    return bind_params(spec.fn, name, spec.resolve_params(params))


NO_GRADIENT_REASON = "gradient needed: the method has no backward"
# The one wording of a call that is not self-attention over a whole sequence (a decode step or a chunked prefill
# against a KV cache, or cross-attention). The adapter's decision counts it (patches/reasons.py: DECODE_REASON); the
# checks of the methods that serve self-attention only give the same words for a direct ``spec.check`` of that shape.
NOT_SELF_ATTENTION_REASON = "q_len != kv_len (decode step, cache or cross-attention)"


def self_attention_only(q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """NOT_SELF_ATTENTION_REASON when q [B, H, Nq, D] and k [B, H, Nk, D] have Nq != Nk, else None."""
    return NOT_SELF_ATTENTION_REASON if q.shape[-2] != k.shape[-2] else None
