"""``select="retrieval"``: layers ranked by how much of the answer's attention falls on the fact it must find.

A retrieval probe is a batch of pass-key prompts of one length (the classic filler, "The grass is green. The sky is
blue. ...", one needle sentence "The pass key is 48213. Remember it. 48213 is the pass key." at depths spread over
the prompt, and the question at the end), with a mask of the needle's key tokens. :func:`retrieval_scores` runs the
exact model once on the probe and gives, per layer, the softmax mass that the question's last ``query_rows``
positions (where the answer is read) put on the key tokens: averaged over those rows and the probe's prompts, the
maximum over heads, since one retrieval head is enough for a layer to matter (DuoAttention's retrieval and streaming
heads, Xiao et al. 2024). ``select="retrieval"`` approximates the layers of least needle mass first and keeps the
retrieval layers exact longest.

    probe = retrieval_probe(tokenizer, length=2048, samples=4)
    patch_model(model, method="local", layers=15, select="retrieval", calibration=probe)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["RetrievalProbe", "retrieval_probe", "retrieval_scores"]

# Tokens per prompt of the probe that --select retrieval and recommended(model, tokenizer) rank layers on (or the model's
# positions if fewer): the probe of every measurement that chose a plan by retrieval
# (eval/results/retrieval_layers_smollm2/results.md, eval/results/ruler_recommended_8k/frontier.md).
PROBE_LENGTH = 2048
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class RetrievalProbe:
    """``input_ids`` [B, N] (long): B prompts of N tokens; ``needle_mask`` [B, N] (bool): the tokens of the fact each
    prompt's answer needs; ``query_rows``: how many of the last positions read the answer (the question's tail)."""

    input_ids: torch.Tensor
    needle_mask: torch.Tensor
    query_rows: int = 8

    def __post_init__(self) -> None:
        ids, mask = self.input_ids, self.needle_mask
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError("RetrievalProbe.input_ids must be an integer tensor [batch, seq_len]")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"RetrievalProbe.needle_mask must be a bool tensor of input_ids' shape {list(ids.shape)}")
        if not isinstance(self.query_rows, int) or not 1 <= self.query_rows < ids.shape[1]:
            raise ValueError(f"RetrievalProbe.query_rows must be an int in [1, seq_len) = [1, {ids.shape[1]}); got "
                             f"{self.query_rows!r}")
        last_needle = [int(torch.nonzero(row).max()) if row.any() else -1 for row in mask]
        if min(last_needle) < 0 or max(last_needle) >= ids.shape[1] - self.query_rows:
            raise ValueError("every prompt of a RetrievalProbe needs needle tokens, all before its last query_rows "
                             "positions")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def probe_length(positions: Optional[int]) -> int:
    """The probe length for a model of ``positions`` positions (its ``max_position_embeddings``; None: unknown):
    PROBE_LENGTH, or fewer where the model has fewer positions."""
    return min(PROBE_LENGTH, int(positions)) if positions else PROBE_LENGTH


def retrieval_probe(tokenizer: Any, *, length: int = PROBE_LENGTH, samples: int = 4, seed: int = 0,
                    query_rows: int = 8) -> RetrievalProbe:
    """``samples`` pass-key prompts of exactly ``length`` tokens for ``tokenizer``, the needle at depths
    (i + 0.5) / samples of the filler, a fresh 5-digit key each (``seed``); the needle mask marks the key's tokens in
    the needle sentence."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    rng = random.Random(seed)
    filler, question = _ids(tokenizer, FILLER), _ids(tokenizer, QUESTION)
    rows, masks = [], []
    for i in range(samples):
        key = str(rng.randint(10000, 99999))
        head, key_ids = _ids(tokenizer, " The pass key is"), _ids(tokenizer, " " + key)
        middle, tail = _ids(tokenizer, ". Remember it."), _ids(tokenizer, " is the pass key.")
        needle = head + key_ids + middle + key_ids + tail
        needle_mask = ([False] * len(head) + [True] * len(key_ids) + [False] * len(middle) + [True] * len(key_ids)
                       + [False] * len(tail))
        room = length - len(needle) - len(question)
        if room < 2 * len(filler):
            raise ValueError(f"length {length} is too short for a pass-key probe with this tokenizer: it needs at "
                             f"least {len(needle) + len(question) + 2 * len(filler)} tokens")
        haystack = (filler * (room // len(filler) + 1))[:room]
        at = round((i + 0.5) / samples * room)
        rows.append(haystack[:at] + needle + haystack[at:] + question)
        masks.append([False] * at + needle_mask + [False] * (room - at + len(question)))
    return RetrievalProbe(torch.tensor(rows, dtype=torch.long), torch.tensor(masks), query_rows=query_rows)


@torch.no_grad()
def retrieval_scores(model: torch.nn.Module, probe: RetrievalProbe) -> list[float]:
    """Per layer (index order), the needle mass of its most retrieving head on ``probe``: for each head, the softmax
    mass the last ``probe.query_rows`` positions put on the needle tokens (exact attention, causal), averaged over
    those rows and the probe's prompts; the maximum over heads. In [0, 1]; ``select="retrieval"`` approximates the
    smallest first."""
    from .patches import capture_attention, find_adapter
    from .row_sparsity import capture_qk, model_forward

    if not isinstance(probe, RetrievalProbe):
        raise ValueError("select='retrieval' needs calibration=hf_sparse_attn.retrieval_probe(tokenizer) (a "
                         f"RetrievalProbe); got {type(probe).__name__}")
    num_layers = len(find_adapter(model).attention_layers(model))
    mass: dict[int, torch.Tensor] = {}
    rows = probe.query_rows
    for b in range(probe.input_ids.shape[0]):
        ids = probe.input_ids[b : b + 1]
        needle = probe.needle_mask[b]
        with capture_attention(model) as captured:
            model_forward(model, ids, None)
        for layer_idx, records in captured.items():
            for capture in records:
                q, k = capture_qk(capture)  # [H, N, D] each
                n = q.shape[1]
                scores = capture.scale * q[:, n - rows:].float() @ k.float().transpose(-1, -2)  # [H, rows, N]
                if capture.causal:
                    future = torch.arange(n)[None, :] > torch.arange(n - rows, n)[:, None]
                    scores = scores.masked_fill(future, float("-inf"))
                share = scores.softmax(-1)[..., needle].sum(-1).mean(-1)  # [H]
                mass[layer_idx] = mass.get(layer_idx, 0) + share / probe.input_ids.shape[0]
            records.clear()
    return [float(mass[i].max()) if i in mass else 0.0 for i in range(num_layers)]
