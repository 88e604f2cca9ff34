"""hf_sparse_attn: swap the attention of chosen layers of a Transformers model for a fast approximate method.

    from hf_sparse_attn import patch_model, unpatch_model
    plan = patch_model(model, method="sparse_hyper", layers=0.5, select="weight_norm")
    print(plan); plan.save("plan.json")
    unpatch_model(model)

Importing the package registers the attention implementation "hf_sparse_attn" with transformers, so
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="hf_sparse_attn")`` loads (unpatched modules run
exactly what sdpa runs), and ``hf_sparse_attn.from_pretrained(path)`` reloads a saved patched checkpoint patched.
"""

__version__ = "0.1.0"

from .loading import PLAN_FILE_NAME, from_pretrained
from .methods import MethodSpec, Param, get_method, get_spec, list_methods, merge_attention, register_method
from .patches import CapturedAttention, capture_attention, register_adapter, supported_families
from .patching import current_plan, patch_model, patched, unpatch_model
from .patches.attention_interface import ATTENTION_NAME, register_attention
from .plan import LayerPlan, PatchPlan, PlanError
from .selection import LayerRanking, rank_layers

register_attention()

# Exported from the tools layer on first use (PEP 562), so that importing the package loads no evaluation code
# (docs/architecture.md): ``from hf_sparse_attn import calibrate`` works as any other name.
_LAZY_EXPORTS = {"calibrate": "hf_sparse_attn.eval.calibrate", "CalibratedPlan": "hf_sparse_attn.eval.calibrate"}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_sparse_attn' has no attribute {name!r}")

__all__ = [
    "__version__",
    "patch_model", "unpatch_model", "patched", "current_plan", "from_pretrained", "PLAN_FILE_NAME", "PlanError",
    "ATTENTION_NAME", "register_attention", "rank_layers", "LayerRanking", "PatchPlan", "LayerPlan",
    "register_method", "get_method", "get_spec", "list_methods", "MethodSpec", "Param", "merge_attention",
    "capture_attention", "CapturedAttention", "register_adapter", "supported_families",
    "calibrate", "CalibratedPlan",
]
