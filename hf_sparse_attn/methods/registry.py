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
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Optional

import torch

from ..kernels import needs_grad  # noqa: F401  (re-exported for the methods and the adapters)

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


@dataclasses.dataclass(frozen=True)
class Param:
    """One tunable parameter of a method: its default, type and allowed range."""

    default: Any
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

    def why_not(self, q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
                params: dict[str, Any], scale: float) -> Optional[str]:
        """The method's own reason not to serve this call (its ``check``), or None."""
        if self.check is None:
            return None
        if "scale" in inspect.signature(self.check).parameters:
            return self.check(q, k, causal, key_padding_mask, params, scale=scale)
        return self.check(q, k, causal, key_padding_mask, params)

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and every given value validated; unknown names are an error."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "(none)"
            raise ValueError(f"method {self.name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters are: {known}")
        resolved = {}
        for name, spec in self.params.items():
            resolved[name] = spec.validate(self.name, name, params[name]) if name in params else spec.default
        return resolved


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    fn: MethodFn,
    *,
    params: Optional[dict[str, Param]] = None,
    check: Optional[CheckFn] = None,
    source: str = "",
    summary: str = "",
    supports_grad: bool = True,
    overwrite: bool = False,
) -> MethodSpec:
    """Register ``fn`` (the contract in this module's docstring) under ``name``.

    ``params`` declares every keyword parameter ``fn`` takes beyond the contract's own, with its default and range.
    ``supports_grad``: False declares that ``fn`` has no usable backward; the adapter then runs exact attention
    whenever autograd needs the gradient of the attention inputs (and the plan records why).
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
    for pname in params:
        if pname not in signature.parameters and not accepts_kwargs:
            raise TypeError(f"method {name!r}: parameter {pname!r} is declared but its function does not take it")
    spec = MethodSpec(name=name, fn=fn, params=params, check=check, source=source, summary=summary,
                      supports_grad=supports_grad)
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
    resolved = spec.resolve_params(params)
    bound = functools.partial(spec.fn, **resolved)
    functools.update_wrapper(bound, spec.fn)
    bound.method_name = name  # type: ignore[attr-defined]
    bound.method_params = resolved  # type: ignore[attr-defined]
    return bound


NO_GRADIENT_REASON = "gradient needed: the method has no backward"
