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
import json
import os
import platform
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
    served: int = 0  # calls the method computed
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> calls that ran exact attention

    @property
    def patched(self) -> bool:
        return self.method is not None


@dataclasses.dataclass
class PatchPlan:
    """Per-layer methods and parameters of a patched model, its provenance, and run-time fallback counts."""

    method: str
    select: str
    layers: list[LayerPlan]
    seed: int = 0
    norm: str = "spectral"
    model_fingerprint: str = ""
    model_class: str = ""
    adapter: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    created: str = ""

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
        """Fallback calls over all patched layers, per reason."""
        total: collections.Counter = collections.Counter()
        for layer in self.layers:
            total.update(layer.fallbacks)
        return dict(total)

    def reset_counts(self) -> None:
        for layer in self.layers:
            layer.served = 0
            layer.fallbacks = {}

    def __str__(self) -> str:
        header = f"PatchPlan: method={self.method!r} select={self.select!r} norm={self.norm} seed={self.seed} " \
                 f"model={self.model_class} ({len(self.patched_layers)}/{len(self.layers)} layers patched)"
        rows = [f"{'layer':>5} {'R':>10} {'rank':>4}  {'method':<14} {'served':>6}  params / fallbacks"]
        for layer in self.layers:
            method = layer.method or "-"
            params = ", ".join(f"{k}={v}" for k, v in layer.params.items()) if layer.patched else ""
            falls = "; ".join(f"{reason}: {n}" for reason, n in sorted(layer.fallbacks.items()))
            extra = params + (f" | fallback {falls}" if falls else "")
            rows.append(f"{layer.layer_idx:>5} {layer.weight_norm:>10.4g} {layer.rank:>4}  {method:<14} {layer.served:>6}  {extra}")
        return "\n".join([header, *rows])

    __repr__ = __str__

    # ---- JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatchPlan":
        data = dict(data)
        data["layers"] = [LayerPlan(**layer) for layer in data["layers"]]
        return cls(**data)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan as JSON (atomically: a crash never leaves half a file)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PatchPlan":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def library_versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {
        "hf_sparse_attn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class, config and parameter names/shapes (not values: cheap, stable)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        try:
            h.update(config.to_json_string(use_diff=False).encode())
        except Exception:  # some remote-code configs do not serialize; the parameter layout still identifies them
            pass
    for name, param in model.named_parameters():
        h.update(f"{name}:{tuple(param.shape)}".encode())
    return h.hexdigest()[:16]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def check_plan_matches(plan: PatchPlan, fingerprint: str, num_layers: int, model_class: str) -> None:
    """A plan is re-applied only to the model it was made for; say clearly what differs."""
    if len(plan.layers) != num_layers:
        raise ValueError(f"the plan has {len(plan.layers)} layers but the model has {num_layers}: it was made for another model")
    if plan.model_fingerprint and plan.model_fingerprint != fingerprint:
        raise ValueError(
            f"the plan was made for a model with fingerprint {plan.model_fingerprint} ({plan.model_class}); this model "
            f"({model_class}) has {fingerprint}. Rebuild the plan with patch_model(model, method=..., layers=...)."
        )
