"""A method call as one opaque operator, for ``torch.compile``.

Under ``torch.compile`` the seeded ``torch.Generator`` a method draws its hashes and samples from cannot be traced
(creating one and ``manual_seed`` are graph breaks; so is passing one to ``torch.randn``). The runtime therefore
calls the method through the custom operator ``hf_sparse_attn::attend`` while compiling: Dynamo sees one node
with known output shapes, and at run time the operator runs the very code the eager path runs, with the same
generator seeded from the plan seed and the layer index — so compiled and eager outputs agree, and a recompute
under gradient checkpointing hashes as the first pass did.

The backward recomputes the method under autograd from the same seed (what gradient checkpointing does) and
differentiates that: a method with a backward in eager mode has the same one compiled. The recompute runs inside
an operator too (autograd's dispatch keys are switched back on for it with torch's private dispatch-key guard, tested
with torch 2.13), since the method's data-dependent steps cannot be traced.

Masks need no operator of their own: the registered mask function hands over the [B, N] key padding mask for plain
causal or bidirectional attention (under compile too), and a dense mask only where the layer runs exact attention.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from ..methods.registry import get_spec


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _run(query, key, value, key_padding_mask, causal, scale, method, params_json, seed):
    out, lse = get_spec(method).fn(query, key, value, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                   generator=_generator(seed, query.device), **json.loads(params_json))
    return out.to(query.dtype), lse.float()


@torch.library.custom_op("hf_sparse_attn::attend", mutates_args=())
def attend_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
              causal: bool, scale: float, method: str, params_json: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, Nq, D], key/value [B, H, Nk, D] (KV heads expanded), key_padding_mask [B, Nk] bool or None ->
    (out [B, H, Nq, D] in query's dtype, lse [B, H, Nq] float32)."""
    out, lse = _run(query, key, value, key_padding_mask, causal, scale, method, params_json, seed)
    # a custom operator may not return a view of an input
    aliases = {query.untyped_storage().data_ptr(), key.untyped_storage().data_ptr(), value.untyped_storage().data_ptr()}
    if out.untyped_storage().data_ptr() in aliases:
        out = out.clone()
    return out.contiguous(), lse.contiguous()


@attend_op.register_fake
def _(query, key, value, key_padding_mask, causal, scale, method, params_json, seed):
    return query.new_empty((*query.shape[:-1], value.shape[-1])), query.new_empty(query.shape[:-1], dtype=torch.float32)


def _autograd_recording():
    """Inside a custom operator autograd's dispatch keys are excluded (its outputs never record a graph); the
    backward recompute needs them back for the duration of the call."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradCPU", "AutogradCUDA", "AutogradNestedTensor", "ADInplaceOrView"):
        if hasattr(torch._C.DispatchKey, key):
            exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("hf_sparse_attn::attend_backward", mutates_args=())
def attend_backward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_padding_mask: Optional[torch.Tensor], grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                       causal: bool, scale: float, method: str, params_json: str, seed: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d query, d key, d value) of ``attend_op``: the method recomputed from the same seed under
    autograd, then differentiated (opaque too: the method's own data-dependent steps are never traced)."""
    inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
    with torch.enable_grad(), _autograd_recording():
        out, lse = _run(*inputs, key_padding_mask, causal, scale, method, params_json, seed)
        pairs = [(o, g) for o, g in ((out, grad_out), (lse, grad_lse)) if g is not None and o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True) if pairs else (None,) * 3
    return tuple(torch.zeros_like(x) if g is None else g.contiguous() for g, x in zip(grads, inputs))


@attend_backward_op.register_fake
def _(query, key, value, key_padding_mask, grad_out, grad_lse, causal, scale, method, params_json, seed):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, key_padding_mask, causal, scale, method, params_json, seed = inputs
    ctx.save_for_backward(query, key, value, key_padding_mask)
    ctx.call = (causal, scale, method, params_json, seed)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attend_backward_op(query, key, value, key_padding_mask, grad_out, grad_lse, *ctx.call)
    return dq, dk, dv, None, None, None, None, None, None


attend_op.register_autograd(_backward, setup_context=_setup_context)


def attend_compiled(method: str, params_json: str, seed: int, query, key, value, *, causal: bool, scale: float,
                    key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The method's output [B, H, Nq, D] through the custom operator (used while ``torch.compile`` traces)."""
    out, _lse = attend_op(query, key, value, key_padding_mask, bool(causal), float(scale), method, params_json, int(seed))
    return out
