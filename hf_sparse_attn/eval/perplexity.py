"""Perplexity: exp of the mean natural-log next-token loss (not 2**loss, the public HyperAttention script's slip)."""

from __future__ import annotations

import math
import time

import torch


@torch.no_grad()
def token_losses_and_time(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One forward over input_ids [1, N]: (natural-log loss of each predicted token [N-1] float32, seconds of the
    forward alone)."""
    start = time.perf_counter()
    logits = model(input_ids).logits
    seconds = time.perf_counter() - start
    losses = torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:], reduction="none")
    return losses, seconds


def perplexity_and_time(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[float, int, float]:
    """One forward over input_ids [1, N]: (perplexity over its N-1 predicted tokens, N-1, seconds of the forward)."""
    losses, seconds = token_losses_and_time(model, input_ids)
    return math.exp(losses.double().mean().item()), losses.numel(), seconds
