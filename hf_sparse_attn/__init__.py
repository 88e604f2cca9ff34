"""hf_sparse_attn: swap the attention of chosen layers of a Transformers model for a fast approximate method.

    from hf_sparse_attn import patch_model, unpatch_model
    plan = patch_model(model, method="sparse_hyper", layers=0.5, select="weight_norm")
    print(plan); plan.save("plan.json")
    unpatch_model(model)

Importing the package registers the attention implementation "hf_sparse_attn" with transformers, so
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="hf_sparse_attn")`` loads (unpatched modules run
exactly what sdpa runs), and ``hf_sparse_attn.from_pretrained(path)`` reloads a saved patched checkpoint patched.

Importing the package itself is light (no torch, no transformers): every public name is loaded on first use
(PEP 562), so ``hf-sparse-attn --help`` answers at once. The registration happens at once when transformers'
modeling code is already loaded, else right after ``transformers.modeling_utils`` finishes loading (a post-import
hook on ``sys.meta_path``, removed once it has fired) — before any model class can exist.
"""

from __future__ import annotations

import sys
import threading

__version__ = "0.1.0"

# name -> module that defines it. Loaded on first use (PEP 562), so that importing the package loads neither torch nor
# transformers nor any evaluation code (docs/architecture.md): ``from hf_sparse_attn import patch_model`` works as
# if the name were defined here.
_LAZY_EXPORTS = {
    "PLAN_FILE_NAME": "hf_sparse_attn.plan_file",
    "from_pretrained": "hf_sparse_attn.loading",
    **dict.fromkeys(("MethodSpec", "Param", "get_method", "get_spec", "list_methods", "merge_attention",
                     "register_method"), "hf_sparse_attn.methods"),
    **dict.fromkeys(("CapturedAttention", "capture_attention", "register_adapter", "supported_families"),
                    "hf_sparse_attn.patches"),
    **dict.fromkeys(("current_plan", "generation_cache", "patch_model", "patched", "unpatch_model"),
                    "hf_sparse_attn.patching"),
    **dict.fromkeys(("ATTENTION_NAME", "register_attention"), "hf_sparse_attn.patches.attention_interface"),
    "GrowingCache": "hf_sparse_attn.patches.decode_cache",
    **dict.fromkeys(("get_decode_method", "list_decode_methods", "register_decode_method"),
                    "hf_sparse_attn.methods.decode"),
    **dict.fromkeys(("LayerPlan", "PatchPlan", "PlanError"), "hf_sparse_attn.plan"),
    **dict.fromkeys(("LayerRanking", "rank_layers"), "hf_sparse_attn.selection"),
    **dict.fromkeys(("RetrievalProbe", "retrieval_probe", "retrieval_scores"), "hf_sparse_attn.retrieval"),
    # the tools layer, loaded only when asked for
    **dict.fromkeys(("calibrate", "CalibratedPlan"), "hf_sparse_attn.eval.calibrate"),
    "recommended": "hf_sparse_attn.recommend",
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule not imported yet: hf_sparse_attn.patching, hf_sparse_attn.methods, ...
        import importlib.util

        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'hf_sparse_attn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


# ---------------------------------------------------------------------------------------------------------
# Registering "hf_sparse_attn" with transformers when (and only when) its modeling code is loaded
# ---------------------------------------------------------------------------------------------------------
_MODELING = "transformers.modeling_utils"  # AttentionInterface; every model class imports it
_MASKING = "transformers.masking_utils"  # AttentionMaskInterface


def _register_attention() -> None:
    from .patches.attention_interface import register_attention

    register_attention()


def _loading(name: str) -> bool:
    """True while module ``name`` is being imported (in sys.modules, not finished)."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class _RegisterAfterImport:
    """A ``sys.meta_path`` finder that finds nothing itself: for transformers' ``modeling_utils`` and
    ``masking_utils`` it asks the other finders for the spec and wraps its loader, so that once the module has run
    the attention implementation is registered. Registering needs both modules; it waits while one of them is
    still loading (its own completion registers) and imports ``masking_utils`` if nothing has yet."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if self.done or fullname not in (_MODELING, _MASKING):
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or isinstance(finder, _RegisterAfterImport) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThenRegister(spec.loader, self)
        return spec

    def module_loaded(self, name: str) -> None:
        with self._lock:
            if self.done:
                return
            if name == _MASKING and _MODELING not in sys.modules:
                return  # no model class can exist yet: wait for modeling_utils
            other = _MASKING if name == _MODELING else _MODELING
            if _loading(other):
                return  # the other one is still running: its completion registers
            self.done = True
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        try:
            _register_attention()
        except Exception as err:  # noqa: BLE001 - never break transformers' own import; say what will not work
            import warnings

            warnings.warn(f"hf_sparse_attn could not register its attention implementation with transformers "
                          f"({type(err).__name__}: {err}); attn_implementation='hf_sparse_attn' will not load until "
                          "hf_sparse_attn.register_attention() succeeds (patch_model registers it too)", stacklevel=2)


class _LoaderThenRegister:
    """The loader transformers' module would have had; after it runs the module, the hook registers. The module's
    ``__loader__`` and ``__spec__.loader`` are set back to that loader, so nothing of the hook stays on it."""

    def __init__(self, loader, hook: _RegisterAfterImport) -> None:
        self._loader = loader
        self._hook = hook

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
        self._hook.module_loaded(module.__name__)


def _install_registration() -> None:
    if _MODELING in sys.modules and not _loading(_MODELING) and not _loading(_MASKING):
        _register_attention()  # transformers' modeling code is already there: register now, as before
        return
    if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install_registration()

__all__ = [
    "__version__",
    "patch_model", "unpatch_model", "patched", "current_plan", "from_pretrained", "PLAN_FILE_NAME", "PlanError",
    "ATTENTION_NAME", "register_attention", "rank_layers", "LayerRanking", "PatchPlan", "LayerPlan",
    "register_method", "get_method", "get_spec", "list_methods", "MethodSpec", "Param", "merge_attention",
    "capture_attention", "CapturedAttention", "register_adapter", "supported_families",
    "calibrate", "CalibratedPlan", "recommended", "GrowingCache", "generation_cache", "get_decode_method", "list_decode_methods",
    "register_decode_method",
]
