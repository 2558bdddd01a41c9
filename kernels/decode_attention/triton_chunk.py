"""Triton form of :func:`reference.masked_attention_lse`: a prompt chunk attends to the cached keys.

Used by the paged cache for every prefill chunk after the first and for each new turn of a multi-turn
conversation: the chunk's queries (positions ``q_pos``) read the keys the cache holds (dense padded view
``[B, Hkv, S, D]`` with positions ``k_pos``, -1 = empty, and pending evict flags), with the DMS hard
mask ``visible = 0 <= k_pos <= q_pos and not (evict and q_pos - k_pos > window)``. Flash-style: grid
``(ceil(Tq / BLOCK_M), B * H)``, an online softmax over key blocks in fp32, so memory stays O(Tq + S)
instead of the reference's O(q_chunk * S) fp32 score tensors. Returns fp32 ``o`` and the natural-log
``lse`` (zeros / -inf where a query sees nothing, e.g. padding queries with ``q_pos = -1``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import SUPPORTED_HEAD_DIMS

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a global used inside @triton.jit must be constexpr (compiled, not interpreted)
POISON_OUTPUTS = os.environ.get("DMS_ATTN_POISON", "0") == "1"
# Triton 3.9's CPU interpreter computes bf16 tl.dot wrongly (see triton_decode.py): upcast there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SUPPORTED_D = SUPPORTED_HEAD_DIMS


@triton.jit
def _chunk_attn_kernel(Q, K, V, QPOS, KPOS, KEV, O, LSE, Tq, S, qk_scale, window,
                       s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_qpb, s_kpb, s_kph,
                       s_ob, s_oh, s_ot, s_lb, s_lh,
                       H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mq = offs_m < Tq
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + d[None, :], mask=mq[:, None], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    qp = tl.load(QPOS + b * s_qpb + offs_m, mask=mq, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    for n0 in range(0, S, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < S
        kp = tl.load(KPOS + b * s_kpb + hk * s_kph + offs_n, mask=mn, other=-1)
        ke = tl.load(KEV + b * s_kpb + hk * s_kph + offs_n, mask=mn, other=0) != 0
        live = kp >= 0
        k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_ks + d[None, :], mask=live[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        dist = qp[:, None] - kp[None, :]
        vis = live[None, :] & (dist >= 0) & ~(ke[None, :] & (dist > window))
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vs + dv[None, :], mask=live[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0
    o = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + dv[None, :], o, mask=mq[:, None])
    tl.store(LSE + b * s_lb + h * s_lh + offs_m, lse, mask=mq)


def chunk_attention(query, keys, values, q_pos, k_pos, k_evict, window: int, scaling: float,
                    block_m: int | None = None, block_n: int = 64):
    """Triton :func:`reference.masked_attention_lse` (same arguments and returns, no ``q_chunk``).

    query ``[B, H, Tq, D]``; keys/values ``[B, Hkv, S, D]``; q_pos ``[B, Tq]``; k_pos ``[B, Hkv, S]``
    (-1 = empty); k_evict ``[B, Hkv, S]`` bool. Returns ``o [B, H, Tq, DV]`` fp32 and ``lse [B, H, Tq]`` fp32.
    """
    B, H, Tq, D = query.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    DV = values.shape[-1]
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    if D not in _SUPPORTED_D or DV not in _SUPPORTED_D or keys.shape[-1] != D:
        raise ValueError(f"head dims q {D} / k {keys.shape[-1]} / v {DV} not supported; supported: {_SUPPORTED_D}")
    if query.dtype != keys.dtype or keys.dtype != values.dtype:
        raise ValueError(f"query, keys, values must share a dtype; got {query.dtype}, {keys.dtype}, {values.dtype}")
    if tuple(q_pos.shape) != (B, Tq) or tuple(k_pos.shape) != (B, Hkv, S) or tuple(k_evict.shape) != (B, Hkv, S):
        raise ValueError(f"q_pos must be {(B, Tq)} and k_pos / k_evict {(B, Hkv, S)}; got "
                         f"{tuple(q_pos.shape)}, {tuple(k_pos.shape)}, {tuple(k_evict.shape)}")
    dev = query.device
    fill = float("nan") if POISON_OUTPUTS else 0.0
    o = torch.full((B, H, Tq, DV), fill, dtype=torch.float32, device=dev)
    lse = torch.full((B, H, Tq), fill, dtype=torch.float32, device=dev)
    if Tq == 0:
        return o, lse
    if S == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    q = query if query.stride(-1) == 1 else query.contiguous()
    k = keys if keys.stride(-1) == 1 else keys.contiguous()
    v = values if values.stride(-1) == 1 else values.contiguous()
    qp = q_pos.to(torch.int32).contiguous()
    kp = k_pos.to(torch.int32).contiguous()
    ke = k_evict.to(torch.int8).contiguous()
    ieee = query.dtype == torch.float32 or (_INTERPRET and query.dtype == torch.bfloat16)
    if block_m is None:
        block_m = max(16, min(64, triton.next_power_of_2(Tq)))
    grid = (triton.cdiv(Tq, block_m), B * H)
    _chunk_attn_kernel[grid](
        q, k, v, qp, kp, ke, o, lse, Tq, S, float(scaling) * LOG2E, int(window),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qp.stride(0), kp.stride(0), kp.stride(1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        H=H, G=H // Hkv, D=D, DV=DV, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
        num_warps=4 if block_m * D >= 64 * 128 else 2, num_stages=2,
    )
    return o, lse
