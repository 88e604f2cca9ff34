"""PatchPlan: which layer runs which method with which parameters, and why — a JSON round trip.

A plan is what ``patch_model`` returns and what it can be given back (``patch_model(model, plan="plan.json")``).
It records, per layer, the weight norm R and its rank, the method and its parameters, and at run time how many
attention calls the method served and how many fell back to exact attention, counted per reason.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import warnings
from typing import Any, Optional, Union

import torch


@dataclasses.dataclass
class LayerPlan:
    """One attention layer of a model: its weight norm, and what runs there."""

    layer_idx: int
    weight_norm: float  # R: the layer's Q/K weight norm (see selection.py)
    rank: int  # position in the selection order (0 = chosen first; for weight_norm: largest R)
    method: Optional[str]  # None: the layer was not chosen and runs what it ran before
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    head_weight_norms: list[float] = dataclasses.field(default_factory=list)
    served: int = 0  # prefill calls the method computed (whole prompts, and chunks of a prompt fed in chunks)
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> prefill calls that ran exact attention
    decode_method: Optional[str] = None  # decode steps / chunked prefills against a KV cache (methods/decode.py);
    # None: they run what the layer ran before patching
    decode_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode_served: int = 0  # calls against a KV cache the decode method computed
    decode_fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> such calls that ran exact

    @property
    def patched(self) -> bool:
        return self.method is not None or self.decode_method is not None


@dataclasses.dataclass
class PatchPlan:
    """Per-layer methods and parameters of a patched model, its provenance, and run-time fallback counts.

    ``method``: the method of every patched layer, or None for a plan made layer by layer (a calibrated plan, whose
    layers may run different methods): each :class:`LayerPlan` says its own (:attr:`methods` lists them)."""

    method: Optional[str]
    select: str
    layers: list[LayerPlan]
    seed: int = 0
    norm: str = "spectral"
    model_fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)  # see model_fingerprint()
    model_class: str = ""
    adapter: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    created: str = ""
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # how a calibrated plan was found (calibrate.py)

    # ---- views -----------------------------------------------------------------------------------------
    @property
    def patched_layers(self) -> list[int]:
        return [layer.layer_idx for layer in self.layers if layer.patched]

    def layer(self, layer_idx: int) -> LayerPlan:
        for layer in self.layers:
            if layer.layer_idx == layer_idx:
                return layer
        raise KeyError(f"the plan has no layer {layer_idx}; layers are 0..{len(self.layers) - 1}")

    def fallback_counts(self) -> dict[str, int]:
        """Calls that ran exact attention over all patched layers, per reason: prefill calls and calls against a KV
        cache together (:meth:`decode_fallback_counts`: the latter alone)."""
        total: collections.Counter = collections.Counter()
        for layer in self.layers:
            total.update(layer.fallbacks)
            total.update(layer.decode_fallbacks)
        return dict(total)

    def decode_fallback_counts(self) -> dict[str, int]:
        """Calls against a KV cache (decode steps, chunked prefills) that ran exact attention, per reason."""
        total: collections.Counter = collections.Counter()
        for layer in self.layers:
            total.update(layer.decode_fallbacks)
        return dict(total)

    def reset_counts(self) -> None:
        for layer in self.layers:
            layer.served = 0
            layer.decode_served = 0
            layer.fallbacks = {}
            layer.decode_fallbacks = {}

    def unserved_layers(self) -> list[int]:
        """Patched layers that were called but never served: every call fell back to exact attention."""
        return [l.layer_idx for l in self.layers
                if l.patched and l.served == 0 and l.decode_served == 0
                and sum(l.fallbacks.values()) + sum(l.decode_fallbacks.values()) > 0]

    @property
    def methods(self) -> list[str]:
        """The prefill methods of the plan's layers (sorted, without repeats)."""
        return sorted({l.method for l in self.layers if l.method is not None})

    @property
    def method_summary(self) -> str:
        """``method``, or for a plan whose layers run different methods their names joined by "+"."""
        if self.method is not None:
            return self.method
        return "+".join(self.methods) or "none"

    @property
    def decode_methods(self) -> list[str]:
        """The decode methods of the plan's layers (sorted, without repeats; empty: decode runs the model's own)."""
        return sorted({l.decode_method for l in self.layers if l.decode_method is not None})

    def __str__(self) -> str:
        decode = self.decode_methods
        header = f"PatchPlan: method={self.method_summary!r} select={self.select!r} norm={self.norm} seed={self.seed} " \
                 f"model={self.model_class} ({len(self.patched_layers)}/{len(self.layers)} layers patched)" \
                 + (f" decode={','.join(decode)}" if decode else "")
        decode_head = f" {'decode':<8} {'served':>7}" if decode else ""
        rows = [f"{'layer':>5} {'R':>10} {'rank':>4}  {'method':<14} {'served':>9}{decode_head}  params / fallbacks"]
        unserved = set(self.unserved_layers())
        for layer in self.layers:
            method = layer.method or "-"
            params = ", ".join(f"{k}={v}" for k, v in layer.params.items()) if layer.method is not None else ""
            if layer.decode_params:
                params += (" | " if params else "") + "decode " + ", ".join(
                    f"{k}={v}" for k, v in layer.decode_params.items())
            merged = collections.Counter(layer.fallbacks) + collections.Counter(layer.decode_fallbacks)
            falls = "; ".join(f"{reason}: {n}" for reason, n in sorted(merged.items()))
            extra = params + (f" | fallback {falls}" if falls else "")
            served = "0 (!!)" if layer.layer_idx in unserved else str(layer.served)
            decode_cols = f" {layer.decode_method or '-':<8} {layer.decode_served:>7}" if decode else ""
            rows.append(f"{layer.layer_idx:>5} {layer.weight_norm:>10.4g} {layer.rank:>4}  {method:<14} {served:>9}"
                        f"{decode_cols}  {extra}")
        lines = [header, *rows]
        if unserved:
            total = sum(l.served for l in self.layers)
            scope = "in every patched layer" if len(unserved) == len(self.patched_layers) else f"in layers {sorted(unserved)}"
            reasons = collections.Counter()
            for l in self.layers:
                if l.layer_idx in unserved:
                    reasons.update(l.fallbacks)
                    reasons.update(l.decode_fallbacks)
            lines.insert(1, f"!! served 0 {scope}: {self.method_summary!r} computed nothing there, every call ran exact attention "
                            f"({'; '.join(f'{r}: {n}' for r, n in reasons.most_common())}). Calls served in all: {total}.")
        return "\n".join(lines)

    __repr__ = __str__

    # ---- JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "the plan") -> "PatchPlan":
        """The plan from its JSON form. Raises :class:`PlanError` naming ``source`` and what is wrong (a missing or
        unknown key, a value of the wrong type such as ``weight_norm: "abc"`` or ``method: 5``, a ``norm`` that is
        none of the norms, a damaged or partial model fingerprint, a layer entry that is no object, a negative or
        repeated ``layer_idx``). The layer list is sorted by ``layer_idx``: a layer is matched to the model by its
        index, never by its position in the list."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan is a JSON object with keys {sorted(_PLAN_REQUIRED)}; got {type(data).__name__}")
        _check_keys(data, _PLAN_REQUIRED, _PLAN_KEYS, source, "the plan")
        layers = data["layers"]
        if not isinstance(layers, list) or not layers:
            raise PlanError(f"{source}: 'layers' must be a non-empty list of layer entries; got {layers!r:.60}")
        _check_plan_fields(data, source)
        parsed, seen = [], set()
        for position, layer in enumerate(layers):
            where = f"layer entry {position}"
            if not isinstance(layer, dict):
                raise PlanError(f"{source}: {where} is not an object: {layer!r:.60}")
            _check_keys(layer, _LAYER_REQUIRED, _LAYER_KEYS, source, where)
            idx = layer["layer_idx"]
            if not _is_int(idx) or idx < 0:
                raise PlanError(f"{source}: {where} has layer_idx={idx!r}; it must be an int >= 0")
            if idx in seen:
                raise PlanError(f"{source}: layer_idx {idx} appears twice; each layer has exactly one entry")
            seen.add(idx)
            if layer["method"] is not None and not isinstance(layer["method"], str):
                raise PlanError(f"{source}: layer {idx} has method={layer['method']!r}; it must be a method name or null")
            if not isinstance(layer.get("params", {}), dict):
                raise PlanError(f"{source}: layer {idx} has params={layer['params']!r:.60}; it must be an object")
            if layer.get("decode_method") is not None and not isinstance(layer["decode_method"], str):
                raise PlanError(f"{source}: layer {idx} has decode_method={layer['decode_method']!r}; it must be a "
                                "decode method name or null")
            if not isinstance(layer.get("decode_params", {}), dict):
                raise PlanError(f"{source}: layer {idx} has decode_params={layer['decode_params']!r:.60}; it must be "
                                "an object")
            _check_layer_fields(layer, idx, source)
            parsed.append(LayerPlan(**{**layer, "params": dict(layer.get("params", {})),
                                       "decode_params": dict(layer.get("decode_params", {})),
                                       "head_weight_norms": list(layer.get("head_weight_norms", [])),
                                       "fallbacks": dict(layer.get("fallbacks", {})),
                                       "decode_fallbacks": dict(layer.get("decode_fallbacks", {}))}))
        _check_fingerprint(data.get("model_fingerprint") or {}, source)
        data = dict(data)
        data["layers"] = sorted(parsed, key=lambda layer: layer.layer_idx)
        return cls(**data)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan as JSON (atomically: a crash never leaves half a file)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PatchPlan":
        """Read a plan saved with :meth:`save`. A damaged file raises :class:`PlanError` naming the file and the
        problem (empty, truncated or not JSON, not UTF-8 text, nested too deeply, missing or unknown keys, values of
        the wrong type)."""
        name = os.fspath(path)
        rebuild = "Save it again with plan.save(path) or rebuild it with patch_model(model, method=..., layers=...)"
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
        if len(raw) > MAX_PLAN_BYTES:
            raise PlanError(f"plan file {name}: larger than {MAX_PLAN_BYTES // 2**20} MiB, far more than any plan; "
                            f"it is not a plan file. {rebuild}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bom = " (it starts with a UTF-16/32 byte-order mark)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
            raise PlanError(f"plan file {name}: not UTF-8 text{bom} ({err.reason} at byte {err.start}); a plan is JSON "
                            f"written as UTF-8. {rebuild}") from None
        if text.startswith("\ufeff"):
            text = text[1:]  # a UTF-8 byte-order mark (some editors write one) is not part of the JSON
        if not text.strip():
            raise PlanError(f"plan file {name}: the file is empty. Save a plan with plan.save(path) or rebuild it with "
                            "patch_model(model, method=..., layers=...)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {name}: not valid JSON ({err}); the file may be truncated. {rebuild}") from None
        except RecursionError:
            raise PlanError(f"plan file {name}: JSON nested too deeply to be a plan (a plan nests 4 levels). "
                            f"{rebuild}") from None
        return cls.from_dict(data, source=f"plan file {name}")


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the model; the message names the file and what is wrong."""


_PLAN_REQUIRED = {"method", "select", "layers"}
_PLAN_KEYS = {f.name for f in dataclasses.fields(PatchPlan)}
_LAYER_REQUIRED = {"layer_idx", "weight_norm", "rank", "method"}
_LAYER_KEYS = {f.name for f in dataclasses.fields(LayerPlan)}


def _check_keys(entry: dict, required: set, known: set, source: str, where: str) -> None:
    missing = sorted(required - set(entry))
    if missing:
        raise PlanError(f"{source}: {where} lacks the key(s) {missing}; a plan entry has {sorted(known)}")
    unknown = sorted(set(entry) - known)
    if unknown:
        raise PlanError(f"{source}: {where} has unknown key(s) {unknown}; valid keys are {sorted(known)}")


MAX_PLAN_BYTES = 64 * 2**20  # a plan of a 1000-layer model with per-head norms is well under 1 MiB
_FINGERPRINT_KEYS = ("architecture", "model_type", "num_layers", "heads", "qk_sha256", "qk_head_norms")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_plan_fields(data: dict, source: str) -> None:
    """The types of the plan's own fields (everything but the layer list), so that a plan that loads also prints,
    saves and applies."""
    from .selection import NORMS
    from .selection import check_seed

    if data["method"] is not None and (not isinstance(data["method"], str) or not data["method"]):
        raise PlanError(f"{source}: 'method' must be a method name, or null for a plan made layer by layer; got "
                        f"{data['method']!r:.60}")
    if not isinstance(data["select"], str) or not data["select"]:
        raise PlanError(f"{source}: 'select' must be a non-empty string; got {data['select']!r:.60}")
    for key in ("model_class", "adapter", "created"):
        if key in data and not isinstance(data[key], str):
            raise PlanError(f"{source}: '{key}' must be a string; got {data[key]!r:.60}")
    for key in ("versions", "calibration", "model_fingerprint"):
        if key in data and not isinstance(data[key], dict):
            raise PlanError(f"{source}: '{key}' must be an object; got {data[key]!r:.60}")
    if "seed" in data:
        try:
            check_seed(data["seed"], "plan seed")
        except ValueError as err:
            raise PlanError(f"{source}: {err}") from None
    if "norm" in data and data["norm"] not in NORMS:
        raise PlanError(f"{source}: 'norm' must be one of {list(NORMS)}; got {data['norm']!r:.60}")


def _check_fingerprint(fingerprint: dict, source: str) -> None:
    """A plan either has no fingerprint (``{}``: written by hand, only layer indices are checked when it is applied)
    or the whole fingerprint :func:`model_fingerprint` writes; a partial or damaged one would skip the check."""
    if not fingerprint:
        return
    how = ("it must be the whole fingerprint patch_model writes, or {} for a plan written by hand (then only the "
           "layer indices are checked)")
    missing = [k for k in _FINGERPRINT_KEYS if k not in fingerprint]
    unknown = sorted(set(fingerprint) - set(_FINGERPRINT_KEYS))
    if missing or unknown:
        what = f"lacks {missing}" if missing else f"has unknown key(s) {unknown}"
        raise PlanError(f"{source}: 'model_fingerprint' {what}; {how}")
    num_layers, heads, sha, norms = (fingerprint[k] for k in ("num_layers", "heads", "qk_sha256", "qk_head_norms"))
    problem = None
    if not isinstance(fingerprint["architecture"], str) or not isinstance(fingerprint["model_type"], str):
        problem = "architecture and model_type must be strings"
    elif not _is_int(num_layers) or num_layers < 1:
        problem = f"num_layers must be an int >= 1, got {num_layers!r:.40}"
    elif not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        problem = f"qk_sha256 must be 64 hex digits, got {sha!r:.80}"
    elif (not isinstance(heads, list) or len(heads) != num_layers
          or not all(isinstance(h, list) and len(h) == 3 and all(_is_int(x) and x > 0 for x in h) for h in heads)):
        problem = f"heads must hold num_layers={num_layers} entries [query heads, kv heads, head dim]"
    elif (not isinstance(norms, list) or len(norms) != num_layers
          or not all(isinstance(row, list) and len(row) == h[0] + h[1] and all(_is_number(x) for x in row)
                     for row, h in zip(norms, heads))):
        problem = (f"qk_head_norms must hold num_layers={num_layers} lists of per-head norms (query heads + kv heads "
                   f"numbers each); got {str(norms)[:60]} (empty or truncated)")
    if problem:
        raise PlanError(f"{source}: 'model_fingerprint' is damaged: {problem}; {how}")


def _check_layer_fields(layer: dict, idx: int, source: str) -> None:
    where = f"{source}: layer {idx}"
    if not _is_number(layer["weight_norm"]):
        raise PlanError(f"{where} has weight_norm={layer['weight_norm']!r:.60}; it must be a number (the layer's R)")
    if not _is_int(layer["rank"]) or layer["rank"] < 0:
        raise PlanError(f"{where} has rank={layer['rank']!r:.60}; it must be an int >= 0")
    norms = layer.get("head_weight_norms", [])
    if not isinstance(norms, list) or not all(_is_number(x) for x in norms):
        raise PlanError(f"{where} has head_weight_norms={norms!r:.60}; it must be a list of numbers")
    for key in ("served", "decode_served"):
        served = layer.get(key, 0)
        if not _is_int(served) or served < 0:
            raise PlanError(f"{where} has {key}={served!r:.60}; it must be an int >= 0")
    for key in ("fallbacks", "decode_fallbacks"):
        fallbacks = layer.get(key, {})
        if not isinstance(fallbacks, dict) or not all(_is_int(n) and n >= 0 for n in fallbacks.values()):
            raise PlanError(f"{where} has {key}={fallbacks!r:.60}; it must map reasons to call counts (ints >= 0)")


def _package_version() -> str:
    """The version of the installed ``hf_sparse_attn`` distribution (read without importing the package face)."""
    try:
        return importlib.metadata.version("hf_sparse_attn")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def library_versions() -> dict[str, str]:
    import transformers

    return {
        "hf_sparse_attn": _package_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


FINGERPRINT_DTYPE = torch.bfloat16  # Q/K weights are hashed after a cast to this dtype (see model_fingerprint)
NORM_RTOL = 1e-3  # per-head Q/K Frobenius norms that agree this closely: the same weights stored at another precision


def model_fingerprint(model: torch.nn.Module, adapter: Any = None) -> dict[str, Any]:
    """What makes a plan valid for a model, and nothing else (dtype, ``use_cache`` and other run-time config fields
    are left out on purpose).

    - ``architecture``: the model class; ``model_type`` from its config;
    - ``num_layers`` and ``heads``: per layer [query heads, key/value heads, head dim];
    - ``qk_sha256``: a hash of every layer's Q/K projection weights (and the norm gain folded into them) after a
      cast to bfloat16. Casting float32 to bfloat16 rounds to nearest, the way ``from_pretrained(..., dtype=
      torch.bfloat16)`` does, so a float32 model and its bfloat16 reload hash the same;
    - ``qk_head_norms``: per layer the Frobenius norm of each head's W_Q then W_K (float64). Where the hash differs
      but every norm agrees within ``NORM_RTOL`` (relative), the weights are the same up to rounding (a float16
      reload rounds twice and can differ from a direct bfloat16 cast in the last bit).
    """
    from .patches import find_adapter

    adapter = adapter if adapter is not None else find_adapter(model)
    num_layers = len(adapter.attention_layers(model))
    digest = hashlib.sha256()
    heads, norms = [], []
    for i in range(num_layers):
        weights = adapter.qk_weights(model, i)
        heads.append([int(weights.w_q.shape[0]), int(weights.w_k.shape[0]), int(weights.w_q.shape[1])])
        parts = [weights.w_q, weights.w_k] + ([weights.norm_gain] if weights.norm_gain is not None else [])
        for part in parts:
            rounded = part.detach().to(device="cpu", dtype=FINGERPRINT_DTYPE).contiguous()
            digest.update(str(tuple(rounded.shape)).encode())
            digest.update(rounded.view(torch.int16).numpy().tobytes())
        head_norms = torch.cat([weights.w_q.double().flatten(1).norm(dim=1), weights.w_k.double().flatten(1).norm(dim=1)])
        norms.append([round(float(x), 9) for x in head_norms])
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": str(getattr(config, "model_type", "") or ""),
        "num_layers": num_layers,
        "heads": heads,
        "qk_sha256": digest.hexdigest(),
        "qk_head_norms": norms,
    }


def fingerprint_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """What differs between the fingerprint a plan was made for and the model's, in words (empty: it fits)."""
    if not isinstance(saved, dict) or not saved:
        return []  # a plan without a fingerprint (written by hand): only the layer indices are checked
    differences = []
    for key, what in (("architecture", "architecture"), ("model_type", "model_type"), ("num_layers", "layer count")):
        if key in saved and saved[key] != current[key]:
            differences.append(f"{what}: plan {saved[key]!r}, model {current[key]!r}")
    if "heads" in saved and saved["heads"] != current["heads"]:
        layer = next((i for i, (a, b) in enumerate(zip(saved["heads"], current["heads"])) if a != b), None)
        detail = f" (first at layer {layer}: plan {saved['heads'][layer]}, model {current['heads'][layer]})" if layer is not None else ""
        differences.append(f"head layout [query heads, kv heads, head dim]{detail}")
    if differences or saved.get("qk_sha256") == current["qk_sha256"]:
        return differences
    saved_norms = saved.get("qk_head_norms")
    current_norms = current["qk_head_norms"]
    hashes = f"hash {str(saved.get('qk_sha256'))[:12]} vs {current['qk_sha256'][:12]}"
    if not isinstance(saved_norms, list) or len(saved_norms) != len(current_norms):
        # no per-head norms, or not one entry per layer (empty, truncated): the hash alone decides
        return [f"Q/K weights ({hashes})"]
    for i, (a, b) in enumerate(zip(saved_norms, current_norms)):
        if not isinstance(a, list) or len(a) != len(b):
            return [f"Q/K weights ({hashes}; layer {i}: the plan's per-head Q/K norms do not match the head count)"]
        worst = max((abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in zip(a, b)), default=0.0)
        if not worst <= NORM_RTOL:  # also NaN
            return [f"Q/K weights ({hashes}; layer {i}: per-head Q/K norms differ by up to {worst:.2%}, more than "
                    "rounding to another dtype explains)"]
    return []  # same weights up to rounding (another storage dtype)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def check_plan_matches(plan: PatchPlan, fingerprint: dict[str, Any], num_layers: int, model_class: str,
                       strict: bool = True, source: str = "the plan") -> None:
    """A plan is re-applied only to the model it was made for; the error says what differs.

    Layer indices are always checked (a layer index the model lacks, or a model layer the plan lacks, is an error
    even with ``strict=False``: the plan cannot be applied). The fingerprint (architecture, layer count, head layout,
    Q/K weights) is checked too; with ``strict=False`` a difference is a warning and the plan is applied.
    """
    indices = [layer.layer_idx for layer in plan.layers]
    extra = sorted(set(indices) - set(range(num_layers)))
    if extra:
        raise PlanError(f"{source}: layer index(es) {extra} do not exist in this {model_class}, which has layers "
                        f"0..{num_layers - 1}: the plan was made for another model")
    missing = sorted(set(range(num_layers)) - set(indices))
    if missing:
        raise PlanError(f"{source}: the model's layer(s) {missing} have no entry in the plan (every layer needs one, "
                        "with method null where it is not patched)")
    differences = fingerprint_differences(plan.model_fingerprint, fingerprint)
    if not differences:
        return
    message = (f"{source} was made for another model ({plan.model_class or 'unknown class'}) than this {model_class}: "
               + "; ".join(differences))
    if strict:
        raise PlanError(message + ". Rebuild the plan with patch_model(model, method=..., layers=...), or pass "
                        "strict=False to apply it anyway.")
    warnings.warn(message + ". Applying it anyway (strict=False).", stacklevel=3)
