"""Triton form of :func:`reference.pack_survivors_reference`: the paged cache's repack in one launch.

The PyTorch form builds the survivor order with a scatter, then gathers keys, values, positions, evict flags and
ring entries in some twenty small launches per layer (about 75 on a prefill), each a few microseconds of device
time plus a launch; at an 8K prefill that overhead showed as idle device time between kernels. Here a grid
``(N streams, ceil(S / BLOCK_S))`` walks the source positions instead: a survivor's slot is its rank in its
stream, read from one cumulative sum (``rank = cumsum(keep) - 1``), so every program writes its kept keys
straight to ``page = starts[n] + rank // PS``, offset ``rank % PS`` (K and V rows, position, ring entry). The
programs of block 0 also mark the unused tail of each stream's last page with position -1. Ring entries are
written into tensors the caller pre-fills (-1 / 0), so only two small fills remain outside the kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_kernel(K, V, POS, EV, KEEP, RANK, COUNTS, STARTS, SEEN, KP, VP, PP, RSLOT, REV, S, R,
                 s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_kp, s_kt, s_vp, s_vt,
                 HKV: tl.constexpr, PS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0)
    blk = tl.program_id(1)
    b = n // HKV
    h = n % HKV
    offs = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    inb = offs < S
    row = n.to(tl.int64) * S + offs
    kp = tl.load(KEEP + row, mask=inb, other=0) != 0
    rank = tl.load(RANK + row, mask=kp, other=0)  # inclusive count - 1
    start = tl.load(STARTS + n).to(tl.int64)
    page = start + rank // PS
    slot = rank % PS
    p = tl.load(POS + row, mask=kp, other=-1)
    e = tl.load(EV + row, mask=kp, other=0)
    d = tl.arange(0, D)
    k = tl.load(K + b.to(tl.int64) * s_kb + h * s_kh + offs.to(tl.int64)[:, None] * s_ks + d[None, :],
                mask=kp[:, None], other=0.0)
    tl.store(KP + page[:, None] * s_kp + slot[:, None] * s_kt + d[None, :], k.to(KP.dtype.element_ty), mask=kp[:, None])
    dv = tl.arange(0, DV)
    v = tl.load(V + b.to(tl.int64) * s_vb + h * s_vh + offs.to(tl.int64)[:, None] * s_vs + dv[None, :],
                mask=kp[:, None], other=0.0)
    tl.store(VP + page[:, None] * s_vp + slot[:, None] * s_vt + dv[None, :], v.to(VP.dtype.element_ty), mask=kp[:, None])
    tl.store(PP + page * PS + slot, p.to(tl.int32), mask=kp)
    seen = tl.load(SEEN + n)
    ring = kp & (p >= 0) & (p >= seen - R)
    col = tl.where(ring, p % R, 0)
    tl.store(RSLOT + n * R + col, rank.to(tl.int32), mask=ring)
    tl.store(REV + n * R + col, e.to(tl.int8), mask=ring)
    if blk == 0:
        # the last page's unused tail: position -1 (a reused pool may hold stale positions there)
        c = tl.load(COUNTS + n)
        t = c + tl.arange(0, PS)
        tail = t < (c + PS - 1) // PS * PS  # none when c == 0: an empty stream has no page
        tl.store(PP + (start + t // PS) * PS + t % PS, -1, mask=tail)


def pack_survivors(keys, values, pos, ev, keep, counts, starts, seen, R: int, k_pool, v_pool, pos_pool,
                   total: int | None = None, max_count: int | None = None, block_s: int = 64):
    """Triton :func:`reference.pack_survivors_reference` (same arguments and returns; ``total`` and ``max_count``
    are not needed: nothing is read on the host)."""
    B, Hkv, S = pos.shape
    N, PS = B * Hkv, k_pool.shape[1]
    D, DV = keys.shape[-1], values.shape[-1]
    dev = pos.device
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys and values need a contiguous last dimension")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or not pos_pool.is_contiguous():
        raise ValueError("k_pool / v_pool need a contiguous last dimension and pos_pool must be contiguous")
    if D & (D - 1) or DV & (DV - 1):
        raise ValueError(f"head dims must be powers of two for the Triton repack; got {D} / {DV}")
    rs = torch.full((N, R), -1, dtype=torch.int32, device=dev)
    re = torch.zeros(N, R, dtype=torch.int8, device=dev)
    if S == 0 or N == 0:
        return rs, re.view(torch.bool)  # 0 / 1 bytes: a view, no copy
    kf = keep.reshape(N, S)
    rank = (torch.cumsum(kf, -1, dtype=torch.int32) - 1).contiguous()
    _pack_kernel[(N, triton.cdiv(S, block_s))](
        keys, values, pos.reshape(N, S).to(torch.int32).contiguous(), ev.reshape(N, S).to(torch.int8).contiguous(),
        kf.to(torch.int8).contiguous(), rank, counts.to(torch.int32).contiguous(), starts.to(torch.int32).contiguous(),
        seen.to(torch.int32).contiguous(), k_pool, v_pool, pos_pool, rs, re, S, R,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        HKV=Hkv, PS=PS, D=D, DV=DV, BLOCK_S=block_s, num_warps=4,
    )
    return rs, re.view(torch.bool)  # 0 / 1 bytes: a view, no copy
