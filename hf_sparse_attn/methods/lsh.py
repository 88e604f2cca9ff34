"""Angular sortLSH shared by ``hyper`` and ``sparse_hyper``: one sort of the queries and one of the keys.

HyperAttention (Han et al. 2023, §3) and "Attention is Naturally Sparse" Definition 5.1 ("Hamming sorted LSH"): hash every vector
x in R^D with ``lsh_num_projs`` = P random hyperplanes (angular / SimHash LSH),

    bits(x)_p = [x . w_p > 0],  w_p ~ N(0, I_D),  p = 0 .. P-1,

so that two vectors at angle theta share bit p with probability 1 - theta / pi. The P bits form a code
c in [0, 2^P). Codes are then *ordered* so that adjacent buckets are similar: the bucket rank is the position
of c in the reflected binary Gray sequence g(r) = r ^ (r >> 1), i.e. r = gray_inverse(c) (prefix XOR of the
bits). Consecutive ranks differ in exactly one bit (Hamming distance 1), so sorting queries and keys by rank
puts vectors of similar direction next to each other, and cutting the sorted order into equal blocks groups
the large entries of q k^T (Definition 5.1: similar points land in the same or adjacent buckets).

Hyperplanes are drawn per head from a ``torch.Generator``: the adapter passes a deterministic per-layer
generator; without one a fixed ``seed`` is used, so the same call always gives the same hashes (also on the
recompute under gradient checkpointing).

Shapes: x [B, H, N, D] -> projections [H, D, P] -> ranks [B, H, N] int64 in [0, 2^P] (2^P = "invalid": a padded
or masked key, sorted after every real bucket).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

MAX_LSH_NUM_PROJS = 16


def make_generator(generator: Optional[torch.Generator], seed: int) -> torch.Generator:
    """The generator that drives hashing and sampling: the one given, else a CPU generator seeded with ``seed``."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return generator
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def gray_rank_table(num_projs: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[2^P] int64: rank of each bucket code in the reflected Gray order (inverse Gray code, prefix XOR).
    Cached per (P, device); treat the result as read-only."""
    return _gray_rank_table(int(num_projs), str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _gray_rank_table(num_projs: int, device: str) -> torch.Tensor:
    codes = torch.arange(1 << num_projs, dtype=torch.int64)
    rank = codes.clone()
    shift = codes >> 1
    while bool(shift.any()):
        rank ^= shift
        shift = shift >> 1
    return rank.to(device)


def random_hyperplanes(num_heads: int, head_dim: int, num_projs: int, generator: torch.Generator,
                       device: torch.device | str) -> torch.Tensor:
    """[H, D, P] float32 Gaussian hyperplane normals, drawn on the generator's device, moved to ``device``."""
    if not 1 <= num_projs <= MAX_LSH_NUM_PROJS:
        raise ValueError(f"lsh_num_projs must be in [1, {MAX_LSH_NUM_PROJS}], got {num_projs}")
    planes = torch.randn(num_heads, head_dim, num_projs, generator=generator, device=generator.device, dtype=torch.float32)
    return planes.to(device)


def lsh_ranks(x: torch.Tensor, hyperplanes: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gray-ordered bucket rank of every vector.

    x [B, H, N, D] (any float dtype), hyperplanes [H, D, P], valid [B, N] bool or None (False = padded key).
    Returns [B, H, N] int64 in [0, 2^P); positions with valid False get 2^P so they sort last.

    Speed (2-core CPU): the projection is computed transposed, [H, P, D] @ [B, H, D, N] -> [B, H, P, N]
    (a matmul whose output has only P columns runs ~3x slower), and the P bits are packed into the code by a
    float matrix-vector product with 2^p (exact for P <= 16), then one table lookup gives the Gray rank.
    """
    num_projs = hyperplanes.shape[-1]
    proj = torch.matmul(hyperplanes.transpose(-1, -2), x.to(hyperplanes.dtype).transpose(-1, -2))  # [B, H, P, N]
    pow2 = (2.0 ** torch.arange(num_projs, device=x.device, dtype=proj.dtype))  # [P]
    codes = torch.matmul(pow2, proj.gt_(0.0))  # [B, H, N], bits packed: sum_p [x . w_p > 0] 2^p
    ranks = gray_rank_table(num_projs, x.device)[codes.long()]
    if valid is not None:
        ranks = ranks.masked_fill(~valid[:, None, :], 1 << num_projs)
    return ranks


def sort_by_rank(ranks: torch.Tensor) -> torch.Tensor:
    """Stable argsort along the last dim: [..., N] int64 ranks -> [..., N] int64 positions in sorted order.

    Stability keeps the original token order inside a bucket (ties broken by position).
    """
    return torch.sort(ranks, dim=-1, stable=True).indices


def sort_lsh(q: torch.Tensor, k: torch.Tensor, num_projs: int, generator: torch.Generator,
             key_valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sort of the queries and one of the keys, with the same hyperplanes for both.

    q [B, H, Nq, D], k [B, H, Nk, D], key_valid [B, Nk] bool or None.
    Returns (q_order [B, H, Nq], k_order [B, H, Nk]) int64: original positions in Gray-sorted bucket order;
    invalid keys come last.
    """
    planes = random_hyperplanes(q.shape[1], q.shape[3], num_projs, generator, q.device)
    return sort_by_rank(lsh_ranks(q, planes)), sort_by_rank(lsh_ranks(k, planes, key_valid))
