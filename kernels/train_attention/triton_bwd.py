"""Fused Triton backward for DMS training attention (semantics: reference.py).

Three deterministic launches, no atomics:

1. ``delta[b, h, i] = sum_d o * do`` (minus the incoming lse gradient, since d lse / d S = P);
2. key-block-major ``dK, dV, d log_keep``: one program owns ``BLOCK_N`` keys of one KV head and walks
   the query tiles of every query head of its GQA group, so the group sum of dK/dV and the mask
   gradient stay in registers. ``d log_keep[j] = sum_{i: i - j > W} dS[i, j]`` is the column sum of
   dS over the far region, which this program already holds (FAR tiles add log_keep elementwise, or by a
   K=16 matmul with ``DMS_ATTN_DKDV_BIAS_MMA=1``: off until timed);
3. query-block-major ``dQ`` (recomputes P like the forward, FAR tiles adding log_keep by a matmul too).

With ``S = scale * q.k + [i - j > W] log_keep[j]``, ``P = exp(S - lse)``: ``dV = P^T dO``,
``dS = P * (dO V^T - delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``.
Query tiles are classified per key block like the forward (DIAG, NEAR, MIXED, FAR), so only
diagonal and window-edge tiles do elementwise mask work. On sm90+ the streamed tiles (q/dO in launch 2,
K/V and the FAR bias operand in launch 3) are read through tensor descriptors (``dms_kernels.tma``), and
launch 2 sums dS into a tile-shaped accumulator that becomes d log_keep once per program.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tma import ensure_allocator, use_tma
from .triton_fwd import (LOG2E, _INTERPRET, _bias_rows, _check_lk2, _empty, _env_cfg, _in_prec, _lk2_stride,
                         bias_mma_enabled, lk2_descriptor, split_log_keep)


@triton.jit(do_not_specialize=["N"])
def _bwd_delta_kernel(O, DO, DLSE, DELTA, N, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    offs64 = offs.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + offs64[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs64[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + offs64, mask=mask, other=0.0)
    tl.store(DELTA + offs64, delta, mask=mask)


@triton.jit
def _dkdv_tiles(dk, dv, dlk, k, v, lk, lkr, ones_t, kdoc, offs_n, offs_d, q_ptr, do_ptr, lse_ptr, delta_ptr,
                qdoc_ptr, stride_qt, start, end, T, W, qk_scale,
                MODE: tl.constexpr, HAS_DMS: tl.constexpr, HAS_DOC: tl.constexpr,
                BLOCK_M: tl.constexpr, IN_PREC: tl.constexpr, USE_TMA: tl.constexpr = False,
                DLK_TILE: tl.constexpr = False):
    # MODE 4 is FAR with log_keep added by the tensor cores: the program's keys are the rows of the tile, so
    # the K=16 product is lkr[BLOCK_N, 16] x ones_t[16, BLOCK_M] (columns / rows 0, 1: the hi and lo parts of
    # log_keep / scale, see triton_fwd.split_log_keep), both loaded once per program.
    offs_m0 = tl.arange(0, BLOCK_M)
    # Software prefetch of the per-row vectors (lse, delta) one query tile ahead, like log_keep in
    # the forward: they are not matmul operands, so the pipeliner does not stage them.
    lse_next = tl.load(lse_ptr + start + offs_m0, mask=(start + offs_m0) < T, other=float("inf"))
    delta_next = tl.load(delta_ptr + start + offs_m0, mask=(start + offs_m0) < T, other=0.0)
    for m0 in tl.range(start, end, BLOCK_M):
        offs_m = m0 + offs_m0
        rmask = offs_m < T
        if USE_TMA:  # q_ptr / do_ptr are tensor descriptors of this head's [T, D] rows (zero past T)
            qt = tl.trans(q_ptr.load([m0, 0]))
        else:
            qt = tl.load(q_ptr + offs_m[None, :] * stride_qt + offs_d[:, None], mask=rmask[None, :], other=0.0)
        # Padded rows get lse = +inf, hence p = 0 there.
        lse = lse_next * 1.4426950408889634
        delta = delta_next
        nxt = offs_m + BLOCK_M
        lse_next = tl.load(lse_ptr + nxt, mask=nxt < T, other=float("inf"))
        delta_next = tl.load(delta_ptr + nxt, mask=nxt < T, other=0.0)
        st = tl.dot(k, qt, input_precision=IN_PREC)  # [BLOCK_N, BLOCK_M], raw q.k units (see the forward)
        if HAS_DMS:
            if MODE == 4:
                st = tl.dot(lkr, ones_t, st, input_precision=IN_PREC)
            elif MODE == 1:
                st = st + lk[:, None]
            elif MODE != 0:
                far = (offs_m[None, :] - offs_n[:, None]) > W
                st = tl.where(far, st + lk[:, None], st)
        if MODE == 3:
            st = tl.where(offs_m[None, :] >= offs_n[:, None], st, float("-inf"))
        if HAS_DOC:
            qdoc = tl.load(qdoc_ptr + offs_m, mask=rmask, other=-2)
            st = tl.where(kdoc[:, None] == qdoc[None, :], st, float("-inf"))
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if USE_TMA:
            do = do_ptr.load([m0, 0])
        else:
            do = tl.load(do_ptr + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rmask[:, None], other=0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=IN_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=IN_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=IN_PREC)
        if HAS_DMS:
            if MODE == 1 or MODE == 4:
                # DLK_TILE: dlk is a [BLOCK_N, BLOCK_M] running sum of dS, reduced once per program
                dlk += dst if DLK_TILE else tl.sum(dst, 1)
            elif MODE != 0:
                dlk += tl.where(far, dst, 0.0) if DLK_TILE else tl.sum(tl.where(far, dst, 0.0), 1)
    return dk, dv, dlk


@triton.jit(do_not_specialize=["T", "W"])
def _dms_bwd_dkdv_kernel(Q, K, V, LK, LK2, DOC, LAST, DO, LSE, DELTA, DK, DV, DLK,
                         sqb, sqh, sqt, skb, skh, skt,
                         H, T, W, qk_scale, sm_scale,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_DMS: tl.constexpr, HAS_DOC: tl.constexpr, IN_PREC: tl.constexpr,
                         FAR_MODE: tl.constexpr, USE_TMA: tl.constexpr = False, DLK_TILE: tl.constexpr = False):
    # Key block 0 walks the most query tiles: start it first.
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    HKV = H // GROUP
    b = bhk // HKV
    hk = bhk % HKV
    b64 = b.to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    nmask = offs_n < T
    kv_off = b64 * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skt + offs_d[None, :]
    k = tl.load(K + kv_off, mask=nmask[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=nmask[:, None], other=0.0)
    lk_ptr = LK + bhk.to(tl.int64) * T
    lk = tl.load(lk_ptr + offs_n, mask=nmask, other=0.0) * (1.4426950408889634 / qk_scale)
    c16 = tl.arange(0, 16)
    lkr = lk  # placeholders unless FAR_MODE == 4
    ones_t = lk
    if FAR_MODE == 4:
        tp = _lk2_stride(T)
        lkr = tl.load(LK2 + bhk.to(tl.int64) * 2 * tp + c16[None, :] * tp + offs_n[:, None],
                      mask=(c16[None, :] < 2) & nmask[:, None], other=0.0)
        rows16 = c16[:, None] + tl.zeros([16, BLOCK_M], dtype=tl.int32)
        ones_t = tl.where(rows16 < 2, 1.0, 0.0).to(LK2.dtype.element_ty)

    hi = T
    kdoc = offs_n  # placeholder when HAS_DOC is False
    qdoc_ptr = DOC
    if HAS_DOC:
        qdoc_ptr = DOC + b64 * T
        kdoc = tl.load(qdoc_ptr + offs_n, mask=nmask, other=-1)
        last = tl.load(LAST + b64 * T + offs_n, mask=nmask, other=-1)
        hi = tl.minimum(tl.max(last, 0) + 1, T)
    diag_end = tl.minimum(n0 + BLOCK_N, hi)
    if HAS_DMS:
        near_end = ((n0 + W + 1) // BLOCK_M) * BLOCK_M
        near_end = tl.minimum(tl.maximum(near_end, diag_end), hi)
        far_start = ((n0 + BLOCK_N + W + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        far_start = tl.minimum(tl.maximum(far_start, near_end), hi)
    else:
        near_end = hi
        far_start = hi

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if DLK_TILE:
        dlk = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        dlk = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptr = Q + b64 * sqb + h.to(tl.int64) * sqh
        do_ptr = DO + b64 * sqb + h.to(tl.int64) * sqh
        if USE_TMA:
            q_ptr = tl.make_tensor_descriptor(q_ptr, shape=[T, HEAD_DIM], strides=[sqt, 1],
                                              block_shape=[BLOCK_M, HEAD_DIM])
            do_ptr = tl.make_tensor_descriptor(do_ptr, shape=[T, HEAD_DIM], strides=[sqt, 1],
                                               block_shape=[BLOCK_M, HEAD_DIM])
        row = (b64 * H + h) * T
        lse_ptr = LSE + row
        delta_ptr = DELTA + row
        dk, dv, dlk = _dkdv_tiles(dk, dv, dlk, k, v, lk, lkr, ones_t, kdoc, offs_n, offs_d, q_ptr, do_ptr, lse_ptr,
                                  delta_ptr, qdoc_ptr, sqt, n0, diag_end, T, W, qk_scale,
                                  3, HAS_DMS, HAS_DOC, BLOCK_M, IN_PREC, USE_TMA, DLK_TILE)
        dk, dv, dlk = _dkdv_tiles(dk, dv, dlk, k, v, lk, lkr, ones_t, kdoc, offs_n, offs_d, q_ptr, do_ptr, lse_ptr,
                                  delta_ptr, qdoc_ptr, sqt, diag_end, near_end, T, W, qk_scale,
                                  0, HAS_DMS, HAS_DOC, BLOCK_M, IN_PREC, USE_TMA, DLK_TILE)
        if HAS_DMS:
            dk, dv, dlk = _dkdv_tiles(dk, dv, dlk, k, v, lk, lkr, ones_t, kdoc, offs_n, offs_d, q_ptr, do_ptr, lse_ptr,
                                      delta_ptr, qdoc_ptr, sqt, near_end, far_start, T, W, qk_scale,
                                      2, HAS_DMS, HAS_DOC, BLOCK_M, IN_PREC, USE_TMA, DLK_TILE)
            dk, dv, dlk = _dkdv_tiles(dk, dv, dlk, k, v, lk, lkr, ones_t, kdoc, offs_n, offs_d, q_ptr, do_ptr, lse_ptr,
                                      delta_ptr, qdoc_ptr, sqt, far_start, hi, T, W, qk_scale,
                                      FAR_MODE, HAS_DMS, HAS_DOC, BLOCK_M, IN_PREC, USE_TMA, DLK_TILE)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=nmask[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=nmask[:, None])
    if DLK_TILE:
        tl.store(DLK + bhk.to(tl.int64) * T + offs_n, tl.sum(dlk, 1), mask=nmask)
    else:
        tl.store(DLK + bhk.to(tl.int64) * T + offs_n, dlk, mask=nmask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, stride_kt,
              start, end, T, W, qk_scale,
              MODE: tl.constexpr, HAS_DMS: tl.constexpr, HAS_DOC: tl.constexpr,
              BLOCK_N: tl.constexpr, IN_PREC: tl.constexpr, USE_TMA: tl.constexpr = False):
    # MODE 4 is FAR with log_keep added by the tensor cores (see triton_fwd._fwd_tiles).
    # USE_TMA: k_ptr / v_ptr are tensor descriptors of the KV head's [T, D] rows (zero past T).
    offs_n0 = tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    if HAS_DMS and MODE % 4 != 0:
        lk_next = tl.load(lk_ptr + start + offs_n0, mask=(start + offs_n0) < T, other=0.0)
    lk_mul = 1.4426950408889634 / qk_scale
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        kmask = offs_n < T
        if HAS_DMS and MODE % 4 != 0:  # prefetch the next tile's log_keep
            lk = lk_next * lk_mul
            nxt = offs_n + BLOCK_N
            lk_next = tl.load(lk_ptr + nxt, mask=nxt < T, other=0.0)
        if USE_TMA:
            kt = tl.trans(k_ptr.load([n0, 0]))
            vt = tl.trans(v_ptr.load([n0, 0]))
        elif MODE == 3:
            kt = tl.load(k_ptr + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
            vt = tl.load(v_ptr + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
        else:
            kt = tl.load(k_ptr + offs_n[None, :] * stride_kt + offs_d[:, None])
            vt = tl.load(v_ptr + offs_n[None, :] * stride_kt + offs_d[:, None])
        s = tl.dot(q, kt, input_precision=IN_PREC)
        if MODE == 4:  # elementwise add measured 1.30x over no mask for this kernel (7.52 vs 5.77 ms)
            s = tl.dot(ones, _bias_rows(lk2_ptr, r16, offs_n, n0, T, USE_TMA), s, input_precision=IN_PREC)
        if HAS_DMS and MODE % 4 != 0:
            if MODE == 1:
                s = s + lk[None, :]
            else:
                far = (offs_m[:, None] - offs_n[None, :]) > W
                s = tl.where(far, s + lk[None, :], s)
        if MODE == 3:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if HAS_DOC:
            kdoc = tl.load(kdoc_ptr + offs_n, mask=kmask, other=-1)
            s = tl.where(qdoc[:, None] == kdoc[None, :], s, float("-inf"))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        dp = tl.dot(do, vt, input_precision=IN_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=IN_PREC)
    return dq


@triton.jit(do_not_specialize=["T", "W"])
def _dms_bwd_dq_kernel(Q, K, V, LK, LK2, DOC, FIRST, DO, LSE, DELTA, DQ,
                       sqb, sqh, sqt, skb, skh, skt,
                       H, T, W, qk_scale, sm_scale,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_DMS: tl.constexpr, HAS_DOC: tl.constexpr, IN_PREC: tl.constexpr,
                       FAR_MODE: tl.constexpr, USE_TMA: tl.constexpr = False):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < T
    b64 = b.to(tl.int64)
    q_off = b64 * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_off, mask=rmask[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=rmask[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=rmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=rmask, other=0.0)
    k_ptr = K + b64 * skb + hk.to(tl.int64) * skh
    v_ptr = V + b64 * skb + hk.to(tl.int64) * skh
    if USE_TMA:
        k_ptr = tl.make_tensor_descriptor(k_ptr, shape=[T, HEAD_DIM], strides=[skt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_ptr = tl.make_tensor_descriptor(v_ptr, shape=[T, HEAD_DIM], strides=[skt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    lk_ptr = LK + (b64 * (H // GROUP) + hk) * T
    lk2_ptr = LK2 + (b64 * (H // GROUP) + hk) * 2 * _lk2_stride(T)
    if USE_TMA and FAR_MODE == 4:
        lk2_ptr = lk2_descriptor(lk2_ptr, T, BLOCK_N)
    c16 = tl.arange(0, 16)[None, :] + tl.zeros([BLOCK_M, 16], dtype=tl.int32)
    ones = tl.where(c16 < 2, 1.0, 0.0).to(Q.dtype.element_ty)

    lo = 0
    qdoc = offs_m
    kdoc_ptr = DOC
    if HAS_DOC:
        kdoc_ptr = DOC + b64 * T
        qdoc = tl.load(kdoc_ptr + offs_m, mask=rmask, other=-2)
        first = tl.load(FIRST + b64 * T + offs_m, mask=rmask, other=T)
        lo = (tl.min(first, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_DMS:
        f_end = (tl.maximum(m0 - W, 0) // BLOCK_N) * BLOCK_N
        f_end = tl.minimum(tl.maximum(f_end, lo), m0)
        x_end = ((tl.maximum(m0 + BLOCK_M - 1 - W, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        x_end = tl.minimum(tl.maximum(x_end, f_end), m0)
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, skt,
                       lo, f_end, T, W, qk_scale, FAR_MODE, HAS_DMS, HAS_DOC, BLOCK_N, IN_PREC, USE_TMA)
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, skt,
                       f_end, x_end, T, W, qk_scale, 2, HAS_DMS, HAS_DOC, BLOCK_N, IN_PREC, USE_TMA)
    else:
        x_end = lo
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, skt,
                   x_end, m0, T, W, qk_scale, 0, HAS_DMS, HAS_DOC, BLOCK_N, IN_PREC, USE_TMA)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, skt,
                   m0, hi, T, W, qk_scale, 3, HAS_DMS, HAS_DOC, BLOCK_N, IN_PREC, USE_TMA)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask[:, None])


# Test hook: force block configurations, e.g. {"dkdv": {...}, "dq": {...}}.
BWD_CONFIG_OVERRIDE: dict | None = None


def bwd_config(D: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(dK/dV/dlog_keep config with BLOCK_N keys x BLOCK_M query tiles, dQ config)."""
    if BWD_CONFIG_OVERRIDE is not None:
        return dict(BWD_CONFIG_OVERRIDE["dkdv"]), dict(BWD_CONFIG_OVERRIDE["dq"])
    e1, e2 = _env_cfg("DMS_ATTN_DKDV_CFG"), _env_cfg("DMS_ATTN_DQ_CFG")
    if _INTERPRET:
        d1 = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
        d2 = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    elif dtype == torch.float32 and D > 128:
        d1 = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
        d2 = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
    elif dtype == torch.float32:
        d1 = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
        d2 = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    elif D > 128:
        d1 = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
        d2 = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    else:
        # H100, L=8192, bf16, D=128 (--sweep): dK/dV 32q x 64k, 4 warps 10.5 ms vs 64x128/8 warps 12.1 ms
        # (no mask 10.2 ms); dQ 128x64/8 warps/3 stages 5.45 ms without the DMS term, 128x128 5.77 ms.
        # With tensor-descriptor loads (session 8, DMS on, ms with the matmul / elementwise log_keep add and without
        # the DMS term) the same tiles stay best: dK/dV 32x64/4/3 TMA 10.46 / 9.91 / 8.76 vs pointer loads 11.62 /
        # 10.68 / 10.30 (64x128/8/2 TMA 18.1); dQ with the bias operand a bulk copy too (_bias_rows): 128x64/8/3
        # 6.56 / 8.31 / 5.60, 128x128/8/2 6.78 / 7.48 / 5.66, pointer loads 128x128/8/2 6.92 / 7.68 / 5.86 (one run).
        d1 = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3)
        d2 = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return e1 or d1, e2 or d2


def dms_attention_bwd(do, q, k, v, lk, o, lse, window, docs, scale, has_dms=True, dlse=None, lk2=None):
    """Launch the backward kernels. Shapes as in :func:`triton_fwd.dms_attention_fwd`; ``do`` like ``o``.

    Returns ``dq [B, H, T, D]``, ``dk, dv [B, Hkv, T, D]`` (input dtypes) and ``dlk [B, Hkv, T]`` fp32.
    """
    B, H, T, D = q.shape
    hkv = k.shape[1]
    W = min(int(window), T)
    do = do.contiguous()
    o = o.contiguous()
    delta = _empty((B, H, T), torch.float32, q.device)
    N = B * H * T
    blk = 64 if not _INTERPRET else 256
    if dlse is not None:
        dlse = dlse.float().contiguous()
    _bwd_delta_kernel[(triton.cdiv(N, blk),)](o, do, dlse if dlse is not None else delta, delta, N,
                                              HEAD_DIM=D, BLOCK=blk, HAS_DLSE=dlse is not None)
    assert q.stride() == do.stride()
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    dlk = _empty((B, hkv, T), torch.float32, q.device)
    c1, c2 = bwd_config(D, q.dtype)
    launch_dkdv(q, k, v, lk, do, lse, delta, dk, dv, dlk, W, docs, scale, has_dms, c1, lk2)
    launch_dq(q, k, v, lk, do, lse, delta, dq, W, docs, scale, has_dms, c2, lk2)
    return dq, dk, dv, dlk


def _common(q, k, docs, has_dms):
    return dict(GROUP=q.shape[1] // k.shape[1], HEAD_DIM=q.shape[3], HAS_DMS=has_dms, HAS_DOC=docs is not None,
                IN_PREC=_in_prec(q.dtype))


def dkdv_bias_mma_enabled() -> bool:
    """FAR tiles of the dK/dV kernel add log_keep through the tensor cores too (``DMS_ATTN_DKDV_BIAS_MMA=1``,
    with ``DMS_ATTN_BIAS_MMA`` on); off by default until timed on a GPU (``bench_train_attention.py --sweep``
    times it beside the elementwise add)."""
    return bias_mma_enabled() and os.environ.get("DMS_ATTN_DKDV_BIAS_MMA", "0") == "1"


def launch_dkdv(q, k, v, lk, do, lse, delta, dk, dv, dlk, W, docs, scale, has_dms, cfg, lk2=None):
    """dK, dV, d log_keep launch (separate so the benchmark sweep can time it alone); lk2 as in :func:`launch_dq`."""
    B, H, T, D = q.shape
    assert cfg["BLOCK_N"] % cfg["BLOCK_M"] == 0
    bias_mma = has_dms and dkdv_bias_mma_enabled()
    if bias_mma and lk2 is None:
        lk2 = split_log_keep(lk, scale, q.dtype)
    if bias_mma:
        _check_lk2(lk2, lk)
    doc, first, last = docs if docs is not None else (lse, lse, lse)
    tma = cfg.get("tma", use_tma(q, do))
    if tma:
        ensure_allocator()
    _dms_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * k.shape[1])](
        q, k, v, lk, lk2 if bias_mma else q, doc, last, do, lse, delta, dk, dv, dlk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        H, T, W, scale * LOG2E, scale,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        FAR_MODE=4 if bias_mma else 1, USE_TMA=tma, DLK_TILE=cfg.get("dlk_tile", dlk_tile_enabled()),
        **_common(q, k, docs, has_dms))


def dlk_tile_enabled() -> bool:
    """The dK/dV kernel sums dS into a tile-shaped accumulator and reduces it to d log_keep once per program, instead
    of a row reduction per query tile (``DMS_ATTN_DLK_TILE=0``). H100, L=8192, DMS on (bench --sweep, session 8),
    32x64/4/3 TMA: 9.66 vs 9.94 ms with the elementwise log_keep add, 9.94 vs 10.38 with the matmul add."""
    return os.environ.get("DMS_ATTN_DLK_TILE", "1") != "0"


def launch_dq(q, k, v, lk, do, lse, delta, dq, W, docs, scale, has_dms, cfg, lk2=None):
    """dQ launch (lk2: :func:`triton_fwd.split_log_keep` of lk, computed here when needed)."""
    B, H, T, D = q.shape
    bias_mma = has_dms and bias_mma_enabled()
    if bias_mma and lk2 is None:
        lk2 = split_log_keep(lk, scale, q.dtype)
    if bias_mma:
        _check_lk2(lk2, lk)
    assert cfg["BLOCK_M"] % cfg["BLOCK_N"] == 0
    doc, first, last = docs if docs is not None else (lse, lse, lse)
    tma = cfg.get("tma", use_tma(k, v))
    if tma:
        ensure_allocator()
    _dms_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
        q, k, v, lk, lk2 if bias_mma else lk, doc, first, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        H, T, W, scale * LOG2E, scale,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        FAR_MODE=4 if bias_mma else 1, USE_TMA=tma, **_common(q, k, docs, has_dms))
