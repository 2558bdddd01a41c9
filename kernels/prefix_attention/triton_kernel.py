"""Triton shared-prefix decode attention: split along the prefix, log-sum-exp merge.

Grid ``(G * Hkv, ceil(M / BLOCK_M), splits)``: each program takes a block of the ``M = W * g`` query rows
of one KV head and one slice of the prefix, so every prefix key block is loaded once per query block
(once in total while ``M <= BLOCK_M``) and multiplied with a tensor-core ``tl.dot``.
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
    # log-sum-exp merge of the splits
    lse_part = m_part + torch.log(l_part)  # -inf where a split saw no visible key
    lse = torch.logsumexp(lse_part, dim=1)  # [GH, M]
    w = torch.exp(lse_part - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[:, None]).nan_to_num(0.0)
    o = (o_part * w[..., None]).sum(1)
    return o.view(G, Hkv, M, D).to(q.dtype), lse.view(G, Hkv, M)
