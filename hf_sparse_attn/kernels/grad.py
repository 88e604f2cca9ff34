"""Whether a call needs gradients: the one test every kernel and method dispatch uses."""

from __future__ import annotations

from typing import Optional

import torch


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd is recording and one of ``tensors`` requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
