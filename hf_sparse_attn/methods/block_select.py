"""``block_select``: attention sinks + an exact local window + key blocks selected by a cheap estimate (causal prefill).

``local`` (sinks + window) loses facts that lie far behind a row's window: on real SmolLM2-135M at 8k a pass key the
unpatched model retrieves is lost on every layer count tried (docs/methods/block_select.md). This method adds to every
row a budget of selected keys from outside its window, chosen by one of two published estimates:

* ``selection="vertical"`` (MInference, Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context
  LLMs via Dynamic Sparse Attention", the vertical part of its vertical-slash index, estimated from the last 64
  queries): the last ``probe_queries`` = P query rows attend every key exactly; per head, their attention mass per key
  block of ``block_size`` keys, m_b = sum_{p in probes} sum_{j in b} softmax(scale q_p K^T)_j, ranks the blocks, and
  the ceil(``num_selected`` / ``block_size``) blocks of highest mass are the "vertical" keys every row attends
  (causally); ``block_size=1`` selects single key columns, MInference's vertical lines. The prompt's
  question sits at its end, so the estimate is query-aware where retrieval needs it. The probe rows' own exact
  output replaces theirs (they were computed exactly anyway).
* ``selection="moba"`` (MoBA, Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs", its gate
  s(q-block, k-block) = mean-pooled q . mean-pooled k, top-k blocks): per block of ``query_block`` query rows, the
  ceil(``num_selected`` / ``block_size``) key blocks with the highest score among those behind the rows' window. Its own block and the recent
  blocks are covered by the exact window (MoBA always includes the own block).

Key sets of query i (rolled coordinates: a left-padded row is moved past its padding first, so its sinks are its
first real tokens, as in local.py), with S sinks and window W, all restricted to valid keys:

    sinks     {j < S, j <= i}
    window    {i - W < j <= i, j >= S}                         (local's exact window, window.window_attention)
    selected  {j in selected blocks, S <= j <= i - W}            (no key twice: disjoint from the two above)

merged through their log-sum-exp values (merge.py). Each part is exact attention over its keys, so the method is
exact attention when the window covers the sequence or when the selected blocks cover every key behind the window.

Cost per row: S + (W + 64) + num_selected key slots (the default 64 + 576 + 512), independent of N, plus
the probe rows' P x N scores per head. No [N, N] tensor: the selected part is computed in row tiles of at most
SELECT_MASK_BUDGET elements of mask, its keys gathered once per head (vertical) or once per query block (moba) into
reused buffers (kernels/workspace.py). On CUDA tensors (Triton importable, no gradient) the sinks, window and selected
keys go through one Triton kernel instead (kernels/triton_block_select.py).

A prompt fed in chunks against a KV cache: :func:`block_select_chunk` (the method's ``chunk_fn``, the chunk contract
of registry.py) computes a chunk's rows as the whole prefill computes them, the chunk's own last rows as the probe.

Causal only: a bidirectional call has no "last queries" to probe; ``check`` sends it to exact attention (and a direct
call computes exact attention).

Tensors: q [B, H, N, D], k/v [B, H, N, D] (self-attention; GQA expanded), key_padding_mask [B, N] bool (True =
attend); out [B, H, N, D] in q's dtype (float32 accumulation), lse [B, H, N] float32 (-inf and out 0 for a row with
no key).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import use_triton
from ..kernels.workspace import workspace
from .common import check_inputs
from .decode import CHUNK_TILE_ROWS, attend, check_decode_inputs, in_row_tiles, leading_pad, local_decode
from .defaults import (BLOCK_SELECT_BLOCK_SIZE, BLOCK_SELECT_MIN_SEQ_LEN, BLOCK_SELECT_NUM_SELECTED,
                       BLOCK_SELECT_NUM_SINK_TOKENS, BLOCK_SELECT_PROBE_QUERIES, BLOCK_SELECT_QUERY_BLOCK,
                       BLOCK_SELECT_SELECTION, BLOCK_SELECT_SELECTIONS, BLOCK_SELECT_WINDOW)
from .exact import exact_attention
from .registry import Param, register_method, self_attention_only
from ..kernels.sorted_blocks_torch import masked_attention_with_lse
from .merge import empty_rows_to_zero, merge_attention_into, needs_grad
from .padding import leading_padding, move_leading_padding_to_end, restore_leading_padding
from .window import window_attention

NEG_INF = float("-inf")
# Elements of one tile's [G, T, R, M] mask of the selected part (16 MB of float32).
SELECT_MASK_BUDGET = 1 << 22
# Rows per tile of the vertical selection: smaller tiles attend shorter key prefixes (rows see only keys behind them).
SELECT_ROWS = 512
# A tile's keys that every one of its rows attends go to a call of their own, without a mask, when there are at
# least this many (a kernel-tuning constant, not swept: at 8k a tile of 512 rows shares 64-516 keys and its staircase
# is ~20-60 keys wide, so the split always applies there).
MASK_FREE_PREFIX = 64


def block_select_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    window: int = BLOCK_SELECT_WINDOW,
    num_sink_tokens: int = BLOCK_SELECT_NUM_SINK_TOKENS,
    selection: str = BLOCK_SELECT_SELECTION,
    num_selected: int = BLOCK_SELECT_NUM_SELECTED,
    block_size: int = BLOCK_SELECT_BLOCK_SIZE,
    probe_queries: int = BLOCK_SELECT_PROBE_QUERIES,
    query_block: int = BLOCK_SELECT_QUERY_BLOCK,
    min_seq_len: int = BLOCK_SELECT_MIN_SEQ_LEN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + window + selected key blocks. q [B, H, N, D], k/v [B, H, N, D] -> (out [B, H, N, D] in q's dtype,
    lse [B, H, N] float32).

    ``generator`` is unused (deterministic: the selection is a top-k of computed scores). ``min_seq_len`` is applied
    by the adapter (exact attention below it); a direct call always runs the method. ``causal=False`` computes exact
    attention (the adapter never sends such a call: :func:`check_block_select`).
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"block_select: self-attention only (Nq == Nk), got {q.shape[2]} queries and {k.shape[2]} "
                         "keys; the adapter sends other calls to exact attention")
    _check_params(window, num_sink_tokens, num_selected, probe_queries, block_size, query_block, selection)
    if not causal:
        return exact_attention(q, k, v, causal=False, scale=scale, key_padding_mask=key_padding_mask)
    B, H, N, D = q.shape
    W, bs = int(window), int(block_size)
    num_blocks = -(-int(num_selected) // bs)  # selected blocks per head (vertical) or per query block (moba)
    num_sinks = min(int(num_sink_tokens), N)
    qf, kf, vf = q.float(), k.float(), v.float()
    mask = key_padding_mask
    shift = leading_padding(mask) if num_sinks > 0 else None
    if shift is not None:  # left padding: the sinks must be each row's first real tokens
        qf, kf, vf, mask = move_leading_padding_to_end(qf, kf, vf, mask, shift)

    probe = probe_rows(qf, kf, vf, scale=scale, key_valid=mask, num_probes=int(probe_queries),
                       want_mass=selection == "vertical")
    if selection == "vertical":
        pos, ok = vertical_blocks(probe[4], queries=qf, key_valid=mask, num_sinks=num_sinks, window=W, block_size=bs,
                                  num_blocks=num_blocks)
        rows_per_set = N
    else:
        rows_per_set = min(int(query_block), N)
        pos, ok = moba_blocks(qf, kf, key_valid=mask, num_sinks=num_sinks, window=W, block_size=bs,
                              num_blocks=num_blocks, query_block=rows_per_set)

    if _triton_serves(qf, kf, vf, pos, rows_per_set):
        from ..kernels.triton_block_select import block_select_attention_triton

        out, lse = block_select_attention_triton(qf, kf, vf, mask, pos, ok, rows_per_set=rows_per_set, window=W,
                                                 num_sinks=num_sinks, scale=scale)
        if shift is not None:
            out, lse = restore_leading_padding(out, lse, shift, N, True)
    else:
        out, lse = _attend_parts(qf, kf, vf, mask, pos, ok, rows_per_set=rows_per_set, window=W,
                                 num_sinks=num_sinks, scale=scale, shift=shift)
    if probe[0] is not None:
        probe_pos, probe_valid, probe_out, probe_lse = probe[:4]
        if shift is not None:
            probe_pos = (probe_pos + shift[:, None]) % N
        out, lse = _overwrite_rows(out, lse, probe_pos, probe_valid, probe_out, probe_lse)
    return out.to(q.dtype), lse


def _attend_parts(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, mask: Optional[torch.Tensor],
                  pos: torch.Tensor, ok: torch.Tensor, *, rows_per_set: int, window: int, num_sinks: int, scale: float,
                  shift: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path on rolled inputs qf, kf, vf [B, H, N, D] (mask [B, N] or None; pos / ok [B, H, T, M]), two key
    sets: the window (window.window_attention) and the sinks with the selected keys (:func:`selected_attention`),
    merged through their lse values, then the left padding moved back (``shift``). Returns out [B, H, N, D], lse
    [B, H, N] float32."""
    out, lse, _ = window_attention(qf, kf, vf, window=window, scale=scale, key_valid=mask, aligned=False, causal=True,
                                   first_key=num_sinks)
    if pos.shape[-1] > 0 or num_sinks > 0:
        sel_out, sel_lse = selected_attention(qf, kf, vf, pos, ok, rows_per_set=rows_per_set, window=window,
                                              scale=scale, num_sinks=num_sinks, key_valid=mask)
        out, lse = merge_attention_into(out, lse, sel_out, sel_lse)
    if shift is not None:
        out, lse = restore_leading_padding(out, lse, shift, qf.shape[2], True)
    return out, lse


def _triton_serves(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, pos: torch.Tensor, rows_per_set: int) -> bool:
    """The Triton kernel (kernels/triton_block_select.py) serves CUDA tensors with Triton importable, no gradient,
    value dim == query dim, and key sets whose size a tile of rows divides."""
    if not (use_triton(qf) and not needs_grad(qf, kf, vf) and vf.shape[-1] == qf.shape[-1]):
        return False
    from ..kernels.triton_block_select import rows_per_program

    return rows_per_program(rows_per_set, pos.shape[2]) is not None


def _check_params(window: int, num_sink_tokens: int, num_selected: int, probe_queries: int, block_size: int,
                  query_block: int, selection: str) -> None:
    for name, value in (("window", window), ("num_sink_tokens", num_sink_tokens), ("num_selected", num_selected),
                        ("probe_queries", probe_queries)):
        if int(value) < 0:
            raise ValueError(f"block_select: {name} must be >= 0, got {value}")
    if int(block_size) < 1 or int(query_block) < 1:
        raise ValueError(f"block_select: block_size and query_block must be >= 1, got {block_size}, {query_block}")
    if selection not in BLOCK_SELECT_SELECTIONS:
        raise ValueError(f"block_select: selection must be one of {list(BLOCK_SELECT_SELECTIONS)}, got {selection!r}")


def probe_rows(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, *, scale: float,
               key_valid: Optional[torch.Tensor], num_probes: int,
               want_mass: bool) -> tuple[Optional[torch.Tensor], ...]:
    """Exact causal attention of the last ``num_probes`` = P valid query rows over every key (MInference's "last q").

    qf, kf, vf [B, H, N, D] float32; key_valid [B, N] bool or None. Returns (pos [B, P] int64: the probe rows, the
    last P valid positions (then padded positions if a row has fewer), valid [B, P] bool, out [B, H, P, D], lse
    [B, H, P], mass [B, H, N] float32 = sum over the valid probe rows of their softmax weights on each key, or None
    when not ``want_mass``). With P = 0 every entry is None.
    """
    B, H, N, D = qf.shape
    P = min(num_probes, N)
    if P == 0:
        return None, None, None, None, None
    device = qf.device
    positions = torch.arange(N, device=device)
    if key_valid is None:
        pos = (positions[N - P:])[None, :].expand(B, P)
        valid = torch.ones(B, P, dtype=torch.bool, device=device)
    else:  # rank valid rows first, then by position: the last P valid rows (distinct positions)
        rank = key_valid.long() * N + positions[None, :]
        pos = rank.topk(P, dim=1).indices.sort(dim=1).values
        valid = key_valid.gather(1, pos)
    qp = qf.gather(2, pos[:, None, :, None].expand(B, H, P, D))  # [B, H, P, D]
    attend = positions[None, None, :] <= pos[:, :, None]  # [B, P, N] causal
    if key_valid is not None:
        attend = attend & key_valid[:, None, :]
    grad = needs_grad(qf, kf, vf)
    bias = None
    if grad or key_valid is not None:
        bias = torch.zeros(B, 1, P, N, device=device).masked_fill_(~attend[:, None], NEG_INF)
    counts = attend.sum(-1)[:, None, :]  # [B, 1, P]
    mass = None
    if grad:
        out, lse = masked_attention_with_lse(qp, kf, vf, scale, bias)
        if want_mass:
            with torch.no_grad():
                scores = torch.matmul(qp, kf.transpose(-1, -2)).mul_(scale).add_(bias)
                safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).detach()
                mass = scores.sub_(safe[..., None]).exp_().mul_(valid[:, None, :, None]).sum(2)
    else:
        # few passes over the [B, H, P, N] scores: scale folded into the P queries, the causal mask only on the last
        # P columns when nothing is padded (the probes are the last P rows), the softmax normalized in the two
        # matmuls that read it (out, and mass as a [1, P] x [P, N] product)
        scores = torch.matmul(qp * scale, kf.transpose(-1, -2), out=workspace("bsel_probe", (B, H, P, N), qf))
        if key_valid is None:
            scores[..., N - P:].masked_fill_(~attend[:, None, :, N - P:], NEG_INF)
        else:
            scores.add_(bias)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        probs = scores.sub_(row_max).exp_()  # unnormalized
        total = probs.sum(dim=-1)  # [B, H, P]
        lse = total.log().add_(row_max[..., 0])
        inv_total = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
        out = torch.matmul(probs, vf).mul_(inv_total[..., None])
        if want_mass:
            mass = torch.matmul((inv_total * valid[:, None, :])[:, :, None, :], probs)[:, :, 0]
    out, lse = empty_rows_to_zero(out, lse, counts == 0)
    return pos, valid, out, lse, mass


def vertical_blocks(mass: Optional[torch.Tensor], *, queries: torch.Tensor, key_valid: Optional[torch.Tensor],
                    num_sinks: int, window: int, block_size: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's vertical estimate, per head: the ``num_blocks`` key blocks of ``block_size`` keys with the most
    probe mass among the keys some row may attend outside its sinks and window (S <= j <= last valid row - W).

    mass [B, H, N] float32 from :func:`probe_rows` (None: no probes, nothing selected); queries [B, H, Nq, D] the rows
    the keys are selected for (their batch, heads and device). Returns pos [B, H, 1, M]
    int64 (M = num_blocks' keys, ascending positions, clamped into [0, N)) and ok [B, H, 1, M] bool (the key exists,
    is valid and is no sink); blocks are taken by mass, then (ties) by index.
    """
    if mass is None or num_blocks == 0:
        empty = torch.zeros(*queries.shape[:2], 1, 0, dtype=torch.long, device=queries.device)
        return empty, empty.bool()
    B, H, N = mass.shape
    device = mass.device
    positions = torch.arange(N, device=device)
    valid = torch.ones(B, N, dtype=torch.bool, device=device) if key_valid is None else key_valid
    last = torch.where(valid, positions[None, :], torch.full_like(positions[None, :], -1)).amax(dim=1)  # [B]
    candidate = valid & (positions[None, :] >= num_sinks) & (positions[None, :] <= (last - window)[:, None])
    nblk = -(-N // block_size)
    pad = nblk * block_size - N
    block_mass = torch.nn.functional.pad(mass * candidate[:, None, :], (0, pad)).view(B, H, nblk, block_size).sum(-1)
    has_candidate = torch.nn.functional.pad(candidate, (0, pad)).view(B, nblk, block_size).any(-1)  # [B, nblk]
    block_mass = block_mass.masked_fill(~has_candidate[:, None, :], -1.0)
    chosen = block_mass.topk(min(num_blocks, nblk), dim=-1).indices.sort(dim=-1).values  # [B, H, K]
    return _block_keys(chosen[:, :, None, :], None, valid, num_sinks, block_size, N)


def moba_blocks(qf: torch.Tensor, kf: torch.Tensor, *, key_valid: Optional[torch.Tensor], num_sinks: int, window: int,
                block_size: int, num_blocks: int, query_block: int,
                first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA's gate, per head and block of ``query_block`` = R query positions (aligned at 0): score(b_q, b_k) =
    mean(q over b_q's rows in qf) . mean(valid k over b_k); the ``num_blocks`` highest-scoring key blocks among those
    holding a key some row of b_q may attend outside its sinks and window (S <= j <= last row of b_q - W).

    qf [B, Hq, c, D] float32: the rows at positions first_row ... N - 1 (the whole prefill: first_row 0, c = N; a
    prompt chunk: its rows at the end of the cache); kf [B, Hkv, N, D] float32, Hq a multiple of Hkv (grouped heads:
    each key block pooled once, shared by the g query heads). Returns pos [B, Hq, T, M] int64 and ok [B, Hq, T, M]
    bool for the T query blocks holding a row of qf, the first being first_row // R, as :func:`vertical_blocks` does
    per query block.
    """
    B, Hq, c, D = qf.shape
    Hkv, N = kf.shape[1], kf.shape[2]
    device = qf.device
    R = query_block
    t0, t1 = first_row // R, -(-N // R)
    T, nblk = t1 - t0, -(-N // block_size)
    if num_blocks == 0:
        empty = torch.zeros(B, Hq, T, 0, dtype=torch.long, device=device)
        return empty, empty.bool()
    valid = torch.ones(B, N, dtype=torch.bool, device=device) if key_valid is None else key_valid
    kpad = nblk * block_size - N
    weights = torch.nn.functional.pad(valid.float(), (0, kpad)).view(B, 1, nblk, block_size, 1)
    k_sum = (torch.nn.functional.pad(kf, (0, 0, 0, kpad)).view(B, Hkv, nblk, block_size, D) * weights).sum(3)
    k_pool = k_sum / weights.sum(3).clamp(min=1.0)  # [B, Hkv, nblk, D]
    if Hq != Hkv:
        k_pool = k_pool.repeat_interleave(Hq // Hkv, dim=1)
    lead = first_row - t0 * R  # qf's rows padded in front to the first block's start: block t pools the rows it holds
    q_sum = torch.nn.functional.pad(qf, (0, 0, lead, T * R - lead - c)).view(B, Hq, T, R, D).sum(3)
    starts = torch.clamp(torch.arange(t0, t1, device=device) * R, min=first_row)
    stops = torch.clamp((torch.arange(t0, t1, device=device) + 1) * R, max=N)
    q_pool = q_sum / (stops - starts)[None, None, :, None]
    score = torch.matmul(q_pool, k_pool.transpose(-1, -2))  # [B, Hq, T, nblk]
    positions = torch.arange(N, device=device)
    usable = valid & (positions[None, :] >= num_sinks)
    # first usable key of each key block; the block is a candidate for b_q if that key <= last row of b_q - W
    first_usable = torch.where(usable, positions[None, :], torch.full_like(positions[None, :], N))
    first_usable = torch.nn.functional.pad(first_usable, (0, kpad), value=N).view(B, nblk, block_size).amin(-1)
    candidate = first_usable[:, None, :] <= (stops - 1 - window)[None, :, None]  # [B, T, nblk]
    score = score.masked_fill(~candidate[:, None], NEG_INF)
    top = score.topk(min(num_blocks, nblk), dim=-1)
    chosen, finite = top.indices, torch.isfinite(top.values)
    order = chosen.argsort(dim=-1)
    chosen, finite = chosen.gather(-1, order), finite.gather(-1, order)
    return _block_keys(chosen, finite, valid, num_sinks, block_size, N)


def _block_keys(chosen: torch.Tensor, chosen_ok: Optional[torch.Tensor], valid: torch.Tensor, num_sinks: int,
                block_size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [B, H, T, K] ascending block indices (chosen_ok [B, H, T, K] bool or None = all) -> the keys of those
    blocks: pos [B, H, T, K * block_size] int64 clamped into [0, n) and ok (inside the sequence, valid, no sink)."""
    B, H, T, K = chosen.shape
    pos = (chosen[..., None] * block_size + torch.arange(block_size, device=chosen.device)).view(B, H, T, K * block_size)
    inside = pos < n
    pos = pos.clamp(max=n - 1)
    ok = inside & (pos >= num_sinks) & valid.gather(1, pos.view(B, -1)).view(B, H, T, -1)
    if chosen_ok is not None:
        ok = ok & chosen_ok[..., None].expand(B, H, T, K, block_size).reshape(B, H, T, K * block_size)
    return pos, ok


def selected_attention(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, pos: torch.Tensor, ok: torch.Tensor, *,
                       rows_per_set: int, window: int, scale: float, num_sinks: int = 0,
                       key_valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every row over its selected keys behind its window, and over the sinks.

    qf, kf, vf [B, H, N, D] float32; pos / ok [B, H, T, M]: key set t serves rows t R .. (t + 1) R - 1 (R =
    ``rows_per_set``; T = 1, R = N for the vertical selection). Row i attends key pos[t, m] iff ok[t, m] and
    pos[t, m] <= i - window, and (``num_sinks`` = S > 0) the sinks j < S with j <= i that key_valid [B, N] (None: all
    valid) allows: every key set starts with the S sinks, whose rule j <= i is the selected keys' rule for the
    threshold j - window (below every selected key's threshold, since selected keys lie at positions >= S). Returns
    out [B, H, N, D] and lse [B, H, N] float32 (0 and -inf for a row with none).

    Keys are gathered once per key set (index_select into a reused buffer) and the rows go to torch's fused attention
    op in tiles of at most SELECT_MASK_BUDGET mask elements: [G, T', R', M] tiles of whole key sets (moba) or of
    R' rows of the one key set (vertical). Rows i < window + min(pos) (rows before the first sink with sinks) have
    no key and are skipped. The sinks in the key set spare a fused call and a merge of their own.
    """
    B, H, N, D = qf.shape
    Dv = vf.shape[3]
    _, _, T, M = pos.shape
    G = B * H
    device = qf.device
    grad = needs_grad(qf, kf, vf)
    threshold = pos  # row i attends a key of threshold <= i - window
    if num_sinks > 0:
        sinks = torch.arange(num_sinks, device=device)
        sink_ok = torch.ones(B, num_sinks, dtype=torch.bool, device=device) if key_valid is None else key_valid[:, :num_sinks]
        pos = torch.cat([sinks.expand(B, H, T, num_sinks), pos], dim=-1)
        threshold = torch.cat([(sinks - window).expand(B, H, T, num_sinks), threshold], dim=-1)
        ok = torch.cat([sink_ok[:, None, None, :].expand(B, H, T, num_sinks), ok], dim=-1)
        M = M + num_sinks
    pos_g, ok_g = pos.reshape(G, T, M), ok.reshape(G, T, M)
    # the attendable keys' thresholds ascending, the others pushed past every row: row i attends the first
    # count_i = #{threshold <= i - window} keys of its set, so a tile of rows needs only a prefix of the gathered keys
    thr_sorted, order = threshold.reshape(G, T, M).masked_fill(~ok_g, N + window).sort(dim=-1)  # [G, T, M]
    pos_sorted = pos_g.gather(-1, order) if num_sinks > 0 else thr_sorted
    rows_base = (torch.arange(G, device=device) * N)[:, None, None]
    key_rows = (rows_base + pos_sorted.clamp(min=0, max=N - 1)).reshape(-1)  # [G * T * M] rows of the flattened k / v
    k_flat, v_flat = kf.reshape(G * N, D), vf.reshape(G * N, Dv)
    if grad:
        ks, vs = k_flat.index_select(0, key_rows), v_flat.index_select(0, key_rows)
    else:
        ks = torch.index_select(k_flat, 0, key_rows, out=workspace("bsel_k", (G * T * M, D), k_flat))
        vs = torch.index_select(v_flat, 0, key_rows, out=workspace("bsel_v", (G * T * M, Dv), v_flat))
    ks, vs = ks.view(G, T, M, D), vs.view(G, T, M, Dv)
    qg = qf.reshape(G, N, D)
    first = max(0, min(N, int(thr_sorted[..., 0].amin().item()) + window))  # first row that can attend a key

    # tiles: (row start, row stop, set start, set stop); each tile is [T', R'] rows of T' whole sets or one set
    tiles = []
    if T == 1:
        step = max(1, min(SELECT_ROWS, SELECT_MASK_BUDGET // max(1, G * M)))
        tiles = [(r, min(N, r + step), 0, 1) for r in range(first, N, step)]
    else:
        R = rows_per_set
        full = N // R
        per = max(1, SELECT_MASK_BUDGET // max(1, G * R * M))
        first_set = first // R
        tiles = [(s * R, min(full, s + per) * R, s, min(full, s + per)) for s in range(first_set, full, per)]
        if full < T:
            tiles.append((full * R, N, full, T))
    if grad:
        start = tiles[0][0] if tiles else N  # rows before the first tile attend no selected key
        parts_out = [torch.zeros(G, start, Dv, device=device)]
        parts_lse = [torch.full((G, start), NEG_INF, device=device)]
    else:
        out = torch.empty(G, N, Dv, device=device)  # the tiles write every row from the first tile's on
        lse = torch.empty(G, N, device=device)
        start = tiles[0][0] if tiles else N
        out[:, :start].zero_()
        lse[:, :start].fill_(NEG_INF)
    for r0, r1, s0, s1 in tiles:
        nt = s1 - s0
        rows = r1 - r0 if nt == 1 else (r1 - r0) // nt
        q_tile = qg[:, r0:r1].reshape(G, nt, rows, D)
        row_pos = torch.arange(r0, r1, device=device).view(nt, rows)
        limit = (row_pos - window)[None, :, :, None]  # [1, T', R', 1]
        counts = torch.searchsorted(thr_sorted[:, s0:s1].contiguous(), limit[..., 0].expand(G, nt, rows).contiguous(),
                                    right=True)  # [G, T', R'] keys each row attends
        m = int(counts.amax().item())  # the tile's key prefix
        if m == 0:
            o = torch.zeros(G, nt, rows, Dv, device=device)
            s = torch.full((G, nt, rows), NEG_INF, device=device)
        else:
            # keys [0, lo) every row of the tile attends (thresholds ascending): no mask there; the staircase [lo, m)
            # gets one, in a call of its own when the shared prefix is long enough to pay for the merge
            least = int(counts.amin().item())
            lo = least if MASK_FREE_PREFIX <= least < m else 0
            o, s = _tile_attention(q_tile, ks[:, s0:s1], vs[:, s0:s1], thr_sorted[:, s0:s1], limit, counts, lo, m,
                                   masked=least < m, scale=scale, grad=grad, buffer_like=qf)
            if lo > 0:
                o_pre, s_pre = masked_attention_with_lse(q_tile, ks[:, s0:s1, :lo], vs[:, s0:s1, :lo], scale, None)
                o, s = merge_attention_into(o_pre, s_pre, o, s)
        if grad:
            parts_out.append(o.reshape(G, r1 - r0, Dv))
            parts_lse.append(s.reshape(G, r1 - r0))
        else:
            out[:, r0:r1] = o.reshape(G, r1 - r0, Dv)
            lse[:, r0:r1] = s.reshape(G, r1 - r0)
    if grad:
        out, lse = torch.cat(parts_out, dim=1), torch.cat(parts_lse, dim=1)
    return out.view(B, H, N, Dv), lse.view(B, H, N)


def _tile_attention(q_tile: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, thr_sorted: torch.Tensor,
                    limit: torch.Tensor, counts: torch.Tensor, lo: int, m: int, *, masked: bool, scale: float,
                    grad: bool, buffer_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile of :func:`selected_attention` over the keys [lo, m) of its sets: q_tile [G, T', R', D], ks / vs
    [G, T', M, D], thr_sorted [G, T', M], limit [1, T', R', 1], counts [G, T', R'] (keys each row attends);
    ``masked``: some row stops before m. Returns out [G, T', R', Dv], lse [G, T', R'] (rows with no key among them:
    0 and -inf)."""
    G, nt, rows, _ = q_tile.shape
    bias = None
    if masked:
        blocked = thr_sorted[:, :, None, lo:m] > limit  # [G, T', R', m - lo]
        zero, neg_inf = torch.zeros((), device=q_tile.device), torch.full((), NEG_INF, device=q_tile.device)
        if grad:
            bias = torch.where(blocked, neg_inf, zero)
        else:
            bias = torch.where(blocked, neg_inf, zero, out=workspace("bsel_mask", (G, nt, rows, m - lo), buffer_like))
    o, s = masked_attention_with_lse(q_tile, ks[:, :, lo:m], vs[:, :, lo:m], scale, bias)
    return empty_rows_to_zero(o, s, counts <= lo)


def _overwrite_rows(out: torch.Tensor, lse: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                    rows_out: torch.Tensor, rows_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, N, D], lse [B, H, N] with rows pos [B, P] replaced by rows_out [B, H, P, D] / rows_lse [B, H, P]
    where valid [B, P] (positions distinct)."""
    B, H, N, D = out.shape
    P = pos.shape[1]
    index = pos[:, None, :].expand(B, H, P)
    keep = valid[:, None, :]
    new_lse = torch.where(keep, rows_lse, lse.gather(2, index))
    new_out = torch.where(keep[..., None], rows_out, out.gather(2, index[..., None].expand(B, H, P, D)))
    if needs_grad(out, rows_out):
        return out.scatter(2, index[..., None].expand(B, H, P, D), new_out), lse.scatter(2, index, new_lse)
    out = out.contiguous() if not out.is_contiguous() else out
    lse = lse.contiguous() if not lse.is_contiguous() else lse
    return out.scatter_(2, index[..., None].expand(B, H, P, D), new_out), lse.scatter_(2, index, new_lse)


# ---------------------------------------------------------------------------------------------------------------
# A prompt fed in chunks against a KV cache (the chunk contract, registry.py)
# ---------------------------------------------------------------------------------------------------------------

def block_select_chunk(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    scale: float,
    kv_len: int,
    key_padding_mask: Optional[torch.Tensor] = None,
    window: int = BLOCK_SELECT_WINDOW,
    num_sink_tokens: int = BLOCK_SELECT_NUM_SINK_TOKENS,
    selection: str = BLOCK_SELECT_SELECTION,
    num_selected: int = BLOCK_SELECT_NUM_SELECTED,
    block_size: int = BLOCK_SELECT_BLOCK_SIZE,
    probe_queries: int = BLOCK_SELECT_PROBE_QUERIES,
    query_block: int = BLOCK_SELECT_QUERY_BLOCK,
    min_seq_len: int = BLOCK_SELECT_MIN_SEQ_LEN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of one prompt chunk, as :func:`block_select_attention` computes them over the whole prompt.

    q [B, Hq, C, D]: the chunk's rows at positions kv_len - C ... kv_len - 1; k_cache / v_cache [B, Hkv, L, D] grouped
    heads (Hq = g Hkv), the first kv_len valid; key_padding_mask [B, kv_len] bool or None -> (out [B, Hq, C, D] q's
    dtype, lse [B, Hq, C] float32).

    Sinks + window are local decode's, in row tiles (decode.in_row_tiles). The probe rows are the chunk's last
    ``probe_queries`` rows (MInference's last queries; the last chunk's are the prompt's, so that chunk's rows equal the
    whole prefill's); ``moba`` pools each query block over its rows inside the chunk (equal to the whole prefill's when
    the chunk starts on a query block). Each batch row is taken from its first real key (left padding), so blocks,
    sinks and query blocks sit where the whole prefill, which rolls the padding away, puts them.
    """
    check_decode_inputs(q, k_cache, v_cache, kv_len, key_padding_mask)
    _check_params(window, num_sink_tokens, num_selected, probe_queries, block_size, query_block, selection)
    B, Hq, C, D = q.shape
    W, S, bs = int(window), int(num_sink_tokens), int(block_size)
    num_blocks = -(-int(num_selected) // bs)
    qf, kf, vf = q.float(), k_cache.float(), v_cache.float()
    out, lse = in_row_tiles(local_decode, qf, kf, vf, scale=scale, kv_len=kv_len, key_padding_mask=key_padding_mask,
                            window=W, num_sink_tokens=S)
    pad = leading_pad(key_padding_mask, B, q.device)
    for b in range(B):
        first = int(pad[b])
        n = kv_len - first  # this row's keys, from its first real one
        c = min(C, n)  # the chunk's rows at or after it (the others are padding)
        if c == 0:
            continue
        qb = qf[b:b + 1, :, C - c:]
        kb, vb = kf[b:b + 1, :, first:kv_len], vf[b:b + 1, :, first:kv_len]
        valid = None if key_padding_mask is None else key_padding_mask[b:b + 1, first:kv_len]
        if valid is not None and bool(valid.all()):
            valid = None
        probe = _chunk_probe(qb, kb, vb, scale=scale, key_valid=valid, num_probes=int(probe_queries),
                             want_mass=selection == "vertical")
        if selection == "vertical":
            pos, ok = vertical_blocks(probe[2], queries=qb, key_valid=valid, num_sinks=min(S, n), window=W, block_size=bs,
                                      num_blocks=num_blocks)
            first_set, rows_per_set = 0, n
        else:
            rows_per_set = int(query_block)
            first_set = (n - c) // rows_per_set
            pos, ok = moba_blocks(qb, kb, key_valid=valid, num_sinks=min(S, n), window=W, block_size=bs,
                                  num_blocks=num_blocks, query_block=rows_per_set, first_row=n - c)
        ob, lb = out[b:b + 1, :, C - c:], lse[b:b + 1, :, C - c:]
        if pos.shape[-1] > 0:
            sel_out, sel_lse = _chunk_selected(qb, kb, vb, pos, ok, first_set=first_set, rows_per_set=rows_per_set,
                                               window=W, scale=scale)
            ob, lb = merge_attention_into(ob.contiguous(), lb.contiguous(), sel_out, sel_lse)
        if probe[0] is not None:
            P = probe[0].shape[2]
            ob[:, :, c - P:], lb[:, :, c - P:] = probe[0], probe[1]
        out[b:b + 1, :, C - c:], lse[b:b + 1, :, C - c:] = ob, lb
    return out.to(q.dtype), lse


def _chunk_probe(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, *, scale: float,
                 key_valid: Optional[torch.Tensor], num_probes: int,
                 want_mass: bool) -> tuple[Optional[torch.Tensor], ...]:
    """Exact attention of the last P = min(num_probes, c) rows of qb [1, Hq, c, D] (positions n - c ... n - 1) over
    kb / vb [1, Hkv, n, D] (grouped, no leading padding), key_valid [1, n] bool or None. Returns (out [1, Hq, P, D],
    lse [1, Hq, P], mass [1, Hq, n] = sum over the valid probe rows of their softmax weights, or None when not
    ``want_mass``); all None when P = 0."""
    _, Hq, c, D = qb.shape
    Hkv, n = kb.shape[1], kb.shape[2]
    P = min(num_probes, c)
    if P == 0:
        return None, None, None
    g = Hq // Hkv
    qg = qb[:, :, c - P:].reshape(1, Hkv, g * P, D)
    rows = n - P + torch.arange(P, device=qb.device).repeat(g)  # [g P] the position of each grouped row
    attend_ = torch.arange(n, device=qb.device)[None, :] <= rows[:, None]  # [g P, n]
    if key_valid is not None:
        attend_ = attend_ & key_valid
    scores = torch.matmul(qg, kb.transpose(-1, -2)).mul_(scale).masked_fill_(~attend_, NEG_INF)  # [1, Hkv, g P, n]
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = scores.sub_(safe[..., None]).exp_()
    out, lse = empty_rows_to_zero(torch.matmul(probs, vb), lse, ~attend_.any(-1).expand(lse.shape))
    mass = None
    if want_mass:
        row_valid = torch.ones(P, dtype=torch.bool, device=qb.device) if key_valid is None else key_valid[0, n - P:]
        mass = (probs.view(1, Hkv, g, P, n) * row_valid[:, None]).sum(3).reshape(1, Hq, n)
    return out.reshape(1, Hq, P, -1), lse.reshape(1, Hq, P), mass


def _chunk_selected(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, pos: torch.Tensor, ok: torch.Tensor, *,
                    first_set: int, rows_per_set: int, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the chunk rows qb [1, Hq, c, D] (positions n - c ... n - 1) over their selected keys behind
    their window: key set t of pos / ok [1, Hq, T, M] serves the positions [(first_set + t) R, (first_set + t + 1) R)
    (R = ``rows_per_set``); row p attends pos[t, m] iff ok[t, m] and pos[t, m] <= p - window. kb / vb [1, Hkv, n, D]
    grouped. Returns out [1, Hq, c, D], lse [1, Hq, c] float32 (0 and -inf for a row with none), in tiles of at most
    CHUNK_TILE_ROWS rows of one key set."""
    _, Hq, c, D = qb.shape
    Hkv, n, Dv = kb.shape[1], kb.shape[2], vb.shape[3]
    device = qb.device
    kv_head = torch.arange(Hq, device=device) // (Hq // Hkv)
    ks = kb[0][kv_head[:, None, None], pos[0]]  # [Hq, T, M, D]
    vs = vb[0][kv_head[:, None, None], pos[0]]
    out = torch.zeros(1, Hq, c, Dv, device=device)
    lse = torch.full((1, Hq, c), NEG_INF, device=device)
    start = n - c
    for t in range(pos.shape[2]):
        lo = max(start, (first_set + t) * rows_per_set)
        hi = min(n, (first_set + t + 1) * rows_per_set)
        for r0 in range(lo, hi, CHUNK_TILE_ROWS):
            r1 = min(hi, r0 + CHUNK_TILE_ROWS)
            row_pos = torch.arange(r0, r1, device=device)
            allowed = ok[0, :, t, None, :] & (pos[0, :, t, None, :] <= (row_pos - window)[None, :, None])
            if not bool(allowed.any()):
                continue
            bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, NEG_INF)[None]
            o, s = attend(qb[:, :, r0 - start:r1 - start], ks[None, :, t], vs[None, :, t], scale, bias)
            out[:, :, r0 - start:r1 - start], lse[:, :, r0 - start:r1 - start] = o, s
    return out, lse


def check_block_select(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
                       params: dict) -> Optional[str]:
    """Why ``block_select`` cannot serve a call: a call that is not self-attention (q_len != kv_len: the adapter's
    decision sends those to exact attention before it asks this check; a direct call gets the same words), or
    bidirectional attention."""
    reason = self_attention_only(q, k)
    if reason:
        return reason
    if not causal:
        return "bidirectional attention: block_select is a causal prefill method (its probes are the last queries)"
    return None


register_method(
    "block_select",
    block_select_attention,
    params={
        "window": Param(kind=int, low=0,
                        help="each query attends the previous `window` positions exactly (itself included)"),
        "num_sink_tokens": Param(kind=int, low=0,
                                 help="every query also attends the first num_sink_tokens real keys (attention sinks)"),
        "selection": Param(kind=str, choices=BLOCK_SELECT_SELECTIONS,
                           help="'vertical': key blocks with the most attention mass of the last probe_queries rows, "
                                "per head (MInference); 'moba': per query block, top key blocks by mean-pooled q . k "
                                "(MoBA)"),
        "num_selected": Param(kind=int, low=0,
                              help="selected keys per row beyond sinks and window: ceil(num_selected / block_size) "
                                   "blocks per head (vertical) or per query block (moba)"),
        "block_size": Param(kind=int, low=1, help="keys per selected block (1: single key columns)"),
        "probe_queries": Param(kind=int, low=0,
                               help="the last probe_queries rows attend every key exactly; their mass picks the "
                                    "vertical blocks"),
        "query_block": Param(kind=int, low=1, help="moba: query rows sharing one selection"),
        "min_seq_len": Param(kind=int, low=1, help="the adapter runs exact attention below this length"),
    },
    check=check_block_select,
    chunk_fn=block_select_chunk,
    min_seq_len_param="min_seq_len",
    source="MInference (Jiang et al. 2024, vertical index from the last queries); MoBA (Lu et al. 2025, top-k blocks "
           "by pooled keys); StreamingLLM (Xiao et al. 2023, sinks + window)",
    summary="attention sinks + exact local window + selected key blocks (causal prefill), merged via lse",
)
