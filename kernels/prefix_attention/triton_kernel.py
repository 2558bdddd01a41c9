"""Triton shared-prefix decode attention: split along the prefix, log-sum-exp merge.

Grid ``(G * Hkv, ceil(M / BLOCK_M), splits)``: each program takes a block of the ``M = W * g`` query rows
of one KV head and one slice of the prefix, so every prefix key block is loaded once per query block
(once in total while ``M <= BLOCK_M``) and multiplied with a tensor-core ``tl.dot``. A second kernel merges the
splits (log-sum-exp weighted); :func:`merge_two` merges two such results over disjoint key sets (prefix and
suffix) in one launch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# Set by tests: partial outputs start as NaN, so an element the kernel fails to write shows up.
POISON_OUTPUTS = os.environ.get("DMS_ATTN_POISON", "0") == "1"


def _alloc(shape, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


@triton.jit
def _prefix_fwd(Q, K, V, VIS, O, M_OUT, L_OUT,
                M, S, keys_per_split, scale,
                stride_qh, stride_qm, stride_kh, stride_ks, stride_vh, stride_vs, stride_visg,
                stride_oh, stride_osplit, stride_om, stride_mh, stride_msplit,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_h = tl.program_id(0)  # flattened (group, kv head)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + pid_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < M, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, S)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        vis = tl.load(VIS + pid_h * stride_visg + offs_n, mask=in_range, other=0) != 0
        k = tl.load(K + pid_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(vis[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + pid_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + pid_h * stride_oh + pid_s * stride_osplit + offs_m[:, None] * stride_om + offs_d[None, :], o,
             mask=offs_m[:, None] < M)
    tl.store(M_OUT + pid_h * stride_mh + pid_s * stride_msplit + offs_m, m_i, mask=offs_m < M)
    tl.store(L_OUT + pid_h * stride_mh + pid_s * stride_msplit + offs_m, l_i, mask=offs_m < M)


@triton.jit
def _split_merge(OP, MP, LP, O, LSE, M, n_splits, s_oh, s_os, s_om, s_mh, s_ms, s_Oh, s_Om, s_Lh,
                 D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Log-sum-exp merge of the prefix splits: o = sum_s w_s o_s / sum_s w_s with w_s = l_s exp(m_s - max),
    # lse = max + log(sum_s w_s); rows that saw no visible key get o = 0 and lse = -inf.
    h = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rm < M
    d = tl.arange(0, D)
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(n_splits):
        m_s = tl.load(MP + h * s_mh + s * s_ms + rm, mask=rmask, other=float("-inf"))
        l_s = tl.load(LP + h * s_mh + s * s_ms + rm, mask=rmask, other=0.0)
        top = tl.maximum(top, tl.where(l_s > 0, m_s, float("-inf")))
    safe = tl.where(top == float("-inf"), 0.0, top)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for s in range(n_splits):
        m_s = tl.load(MP + h * s_mh + s * s_ms + rm, mask=rmask, other=float("-inf"))
        l_s = tl.load(LP + h * s_mh + s * s_ms + rm, mask=rmask, other=0.0)
        w = tl.where(l_s > 0, l_s * tl.exp(m_s - safe), 0.0)
        o_s = tl.load(OP + h * s_oh + s * s_os + rm[:, None] * s_om + d[None, :], mask=rmask[:, None], other=0.0)
        acc += tl.where((w > 0)[:, None], o_s * w[:, None], 0.0)
        den += w
    o = acc / tl.maximum(den, 1e-30)[:, None]
    tl.store(O + h * s_Oh + rm[:, None] * s_Om + d[None, :], o.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + h * s_Lh + rm, tl.where(den > 0, safe + tl.log(tl.maximum(den, 1e-30)), float("-inf")),
             mask=rmask)


def prefix_attention_grouped(q, k, v, visible, scale: float, splits: int | None = None,
                             block_m: int | None = None, block_n: int = 64, length: int | None = None):
    """Triton version of :func:`.reference.prefix_attention_grouped_reference` (same arguments/returns).

    ``length``: use only the first ``length`` entries of ``k, v, visible`` (``[G, Hkv, capacity, ...]``
    buffers that grow in place), without copying them.
    """
    from .reference import check_inputs

    G, Hkv, M, S, D = check_inputs(q, k, v, visible, length)
    if length is not None:
        if not 0 <= length <= S:
            raise ValueError(f"length must be in [0, {S}]; got {length}")
        S = length
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D} not supported; use 16, 32, 64, 128 or 256")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    cap = k.shape[2]
    q = q.contiguous().view(G * Hkv, M, D)
    k = k.contiguous().view(G * Hkv, cap, D)
    v = v.contiguous().view(G * Hkv, cap, D)
    vis = visible.to(torch.int8).contiguous().view(G * Hkv, visible.shape[2])  # >= S columns
    block_m = block_m or max(16, min(64, triton.next_power_of_2(M)))
    m_blocks = triton.cdiv(M, block_m)
    if splits is None:
        # Enough programs to fill the GPU (~132 SMs on an H100) when G * Hkv * m_blocks is small.
        target = 264 if q.is_cuda else 1
        splits = max(1, min(triton.cdiv(S, block_n), target // max(G * Hkv * m_blocks, 1)))
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n if S > 0 else block_n
    splits = max(1, triton.cdiv(S, keys_per_split))
    o_part = _alloc((G * Hkv, splits, M, D), q.device)
    m_part = _alloc((G * Hkv, splits, M), q.device)
    l_part = _alloc((G * Hkv, splits, M), q.device)
    grid = (G * Hkv, m_blocks, splits)
    _prefix_fwd[grid](q, k, v, vis, o_part, m_part, l_part, M, S, keys_per_split, float(scale),
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), vis.stride(0),
                      o_part.stride(0), o_part.stride(1), o_part.stride(2), m_part.stride(0), m_part.stride(1),
                      D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                      # fp32 inputs get exact fp32 products (the GPU default, tf32, keeps 10 mantissa bits)
                      PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    # log-sum-exp merge of the splits: one launch (it was eight PyTorch ops per call)
    o = torch.empty((G * Hkv, M, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((G * Hkv, M), dtype=torch.float32, device=q.device)
    bm = max(16, min(32, triton.next_power_of_2(M)))
    _split_merge[(G * Hkv, triton.cdiv(M, bm))](o_part, m_part, l_part, o, lse, M, splits,
                                                o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                                m_part.stride(0), m_part.stride(1), o.stride(0), o.stride(1),
                                                lse.stride(0), D=D, BLOCK_M=bm)
    return o.view(G, Hkv, M, D), lse.view(G, Hkv, M)


@triton.jit
def _merge_two(O1, L1, O2, L2, O, L, R, s_o1, s_o2, s_o, D: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    d = tl.arange(0, D)
    l1 = tl.load(L1 + r, mask=rmask, other=float("-inf"))
    l2 = tl.load(L2 + r, mask=rmask, other=float("-inf"))
    m = tl.maximum(l1, l2)
    m = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    tot = w1 + w2
    o1 = tl.load(O1 + r[:, None] * s_o1 + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    o2 = tl.load(O2 + r[:, None] * s_o2 + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    # a side that saw no key (weight 0) is never read as a value, whatever its o holds
    o = (tl.where((w1 > 0)[:, None], o1 * w1[:, None], 0.0) + tl.where((w2 > 0)[:, None], o2 * w2[:, None], 0.0)) \
        / tl.maximum(tot, 1e-30)[:, None]
    tl.store(O + r[:, None] * s_o + d[None, :], o.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(L + r, tl.where(tot > 0, m + tl.log(tl.maximum(tot, 1e-30)), float("-inf")), mask=rmask)


def merge_two(o1, lse1, o2, lse2, out_dtype=None):
    """Exact merge of two attention results over disjoint key sets in one launch (Triton form of
    ``dms.shared_prefix._merge``): ``o [..., D]`` (any float dtype), ``lse [...]`` fp32 (-inf: no key).
    Returns ``(o in out_dtype (default fp32), lse fp32)``; a row where neither saw a key gets lse -inf and o 0."""
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(f"merge_two needs o [..., D] and lse [...] of equal shapes; got {tuple(o1.shape)}, "
                         f"{tuple(lse1.shape)}, {tuple(o2.shape)}, {tuple(lse2.shape)}")
    D = o1.shape[-1]
    if D & (D - 1):
        raise ValueError(f"head dim {D} must be a power of two")
    a1, a2 = o1.reshape(-1, D), o2.reshape(-1, D)
    a1 = a1 if a1.stride(-1) == 1 else a1.contiguous()
    a2 = a2 if a2.stride(-1) == 1 else a2.contiguous()
    b1, b2 = lse1.reshape(-1).float().contiguous(), lse2.reshape(-1).float().contiguous()
    R = a1.shape[0]
    o = torch.empty((R, D), dtype=out_dtype or torch.float32, device=o1.device)
    lse = torch.empty((R,), dtype=torch.float32, device=o1.device)
    if R:
        br = 16
        _merge_two[(triton.cdiv(R, br),)](a1, b1, a2, b2, o, lse, R, a1.stride(0), a2.stride(0), o.stride(0), D=D,
                                          BLOCK_R=br)
    return o.view(o1.shape), lse.view(lse1.shape)
