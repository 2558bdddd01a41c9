"""Fused Triton forward for DMS training attention (semantics: reference.py).

One program computes ``BLOCK_M`` query rows of one query head with an online softmax over key tiles
of ``BLOCK_N`` keys. Key tiles are classified once per program, so that only the tiles that need it
do per-element mask work (``q``/``k`` below are positions, ``W`` the window):

* FAR    (every ``q - k > W``): ``log_keep[k]`` enters through the tensor cores (a K=16 product
  ``ones x [hi; lo]`` accumulated onto q.k, see :func:`split_log_keep`), no per-element work at all;
  ``DMS_ATTN_BIAS_MMA=0`` adds it elementwise instead (1.41x slower forward, see ``_fwd_tiles``);
* MIXED  (the window edge crosses the tile): elementwise ``where(q - k > W, s + log_keep, s)``;
* NEAR   (every ``q - k <= W``, all keys before the first query): plain causal-free tile;
* DIAG   (tiles on the diagonal): causal mask (+ window mask) and the ``k < T`` bound.

Hard masks (``log_keep`` in {0, -inf}: prefill, teacher-forced evaluation) without documents take a
*gathered* FAR region instead (:func:`compact_kept`, PyTorch form :func:`gather_kept`): the kept keys,
compacted in position order into a copy of K/V, are the only keys a FAR tile can see, so FAR tiles become
plain tiles over that copy (mode
``GATHERED``; only the last, partial one masks its columns) with no bias at all, and evicted keys cost
nothing there. The MIXED / NEAR / DIAG tiles read the original keys as above.

Tiles before the first key that shares a document with any query of the block are skipped (for
contiguous documents that is every cross-document tile); the document mask is applied elementwise
only when document ids are given. With ``HAS_DMS=False`` the same tiling runs as plain causal flash
attention (the "no mask" baseline of the benchmark). Memory is O(T): no T x T buffer. On sm90+ the K/V
tiles and the FAR bias operand are read through tensor descriptors (``dms_kernels.tma``, ``USE_TMA``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tma import ensure_allocator, use_tma

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Set by tests: allocate outputs filled with NaN so that an unwritten element fails the comparison.
POISON_OUTPUTS = os.environ.get("DMS_ATTN_POISON", "0") == "1"


def _empty(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Mode ids of the key/query tiles (see the module docstring); 4 is FAR with the bias as a matmul, 5 the last
# (partial) tile of a gathered FAR region.
NEAR, FAR, MIXED, DIAG, FAR_MMA, GATHERED_TAIL = 0, 1, 2, 3, 4, 5


@triton.jit
def _lk2_stride(T):
    # row stride of split_log_keep's rows inside the kernels (lk2_row_stride on the host)
    return (T + 7) // 8 * 8


@triton.jit
def _bias_rows(lk2_ptr, r16, offs_n, n0, T, USE_TMA: tl.constexpr):
    # [16, BLOCK_N] operand of the FAR-tile bias product: rows 0/1 the (hi, lo) log_keep parts, rows 2-15 zero.
    # USE_TMA: lk2_ptr is a descriptor of the 2 x T rows whose box is 16 rows tall (rows past 2 read as zero), so
    # the operand lands in shared memory by one bulk copy.
    # (one return: code after a constexpr-taken early return is still compiled, and would use the descriptor as a
    # pointer)
    if USE_TMA:
        rows = lk2_ptr.load([0, n0])
    else:
        rows = tl.load(lk2_ptr + r16[:, None] * _lk2_stride(T) + offs_n[None, :], mask=r16[:, None] < 2, other=0.0)
    return rows


@triton.jit
def lk2_descriptor(lk2_ptr, T, BLOCK_N: tl.constexpr):
    """Tensor descriptor of one head's ``split_log_keep`` rows for :func:`_bias_rows`."""
    return tl.make_tensor_descriptor(lk2_ptr, shape=[2, T], strides=[_lk2_stride(T), 1], block_shape=[16, BLOCK_N])


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, stride_kt,
               start, end, T, W, qk_scale, flag_ptr,
               MODE: tl.constexpr, HAS_DMS: tl.constexpr, HAS_DOC: tl.constexpr,
               BLOCK_N: tl.constexpr, IN_PREC: tl.constexpr, HAS_FLAGS: tl.constexpr = False,
               USE_TMA: tl.constexpr = False):
    # MODE 4 is FAR with log_keep added by the tensor cores; modes 1-3 add it elementwise; MODE 5 is the
    # last tile of a gathered FAR region (columns >= T masked: there T is the number of gathered keys).
    offs_n0 = tl.arange(0, BLOCK_N)
    r16 = tl.arange(0, 16)
    if HAS_DMS and (MODE == 1 or MODE == 2 or MODE == 3):
        lk_next = tl.load(lk_ptr + start + offs_n0, mask=(start + offs_n0) < T, other=0.0)
    # Scores stay in raw q.k units until the exp: log_keep is pre-divided by the scale, so that
    # scale, log2(e) and the row max fold into one FMA per element (as without the DMS term).
    lk_mul = 1.4426950408889634 / qk_scale
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        kmask = offs_n < T
        if HAS_DMS and (MODE == 1 or MODE == 2 or MODE == 3):
            # Software prefetch of the next tile's log_keep (measured: no gain, 7.16 vs 7.25 ms).
            lk = lk_next * lk_mul
            nxt = offs_n + BLOCK_N
            lk_next = tl.load(lk_ptr + nxt, mask=nxt < T, other=0.0)
        # K loaded transposed [D, BLOCK_N]; only diagonal (and gathered tail) tiles can run past T.
        if USE_TMA:  # k_ptr / v_ptr are tensor descriptors of [rows, D] (zero past their rows)
            kt = tl.trans(k_ptr.load([n0, 0]))
        elif MODE == 3 or MODE == 5:
            kt = tl.load(k_ptr + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
        else:
            kt = tl.load(k_ptr + offs_n[None, :] * stride_kt + offs_d[:, None])
        s = tl.dot(q, kt, input_precision=IN_PREC)
        if MODE == 4:
            # FAR tiles: the tensor cores add log_keep, as a K=16 product ones[BLOCK_M, 16] x lk2[16, BLOCK_N]
            # whose rows 0/1 hold log_keep/scale split into q.dtype hi + lo parts (~2^-16 relative error in
            # bf16). An elementwise add of a per-column vector here cost the forward 1.41x over no mask
            # (7.16 vs 4.70 ms at L=8192 on H100, tiles 128x128), the dQ kernel 1.30x.
            if HAS_FLAGS:
                # hard masks: a tile whose keys are all kept adds log_keep = 0, so its bias product is skipped
                if tl.load(flag_ptr + n0 // BLOCK_N) != 0:
                    s = tl.dot(ones, _bias_rows(lk2_ptr, r16, offs_n, n0, T, USE_TMA), s, input_precision=IN_PREC)
            else:
                s = tl.dot(ones, _bias_rows(lk2_ptr, r16, offs_n, n0, T, USE_TMA), s, input_precision=IN_PREC)
        if HAS_DMS and (MODE == 1 or MODE == 2 or MODE == 3):
            if MODE == 1:
                s = s + lk[None, :]
            else:
                far = (offs_m[:, None] - offs_n[None, :]) > W
                s = tl.where(far, s + lk[None, :], s)
        if MODE == 3:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if MODE == 5:
            s = tl.where(kmask[None, :], s, float("-inf"))
        if HAS_DOC:
            kdoc = tl.load(kdoc_ptr + offs_n, mask=kmask, other=-1)
            s = tl.where(qdoc[:, None] == kdoc[None, :], s, float("-inf"))
        # m_i starts finite (-1e30) so a row that is fully masked in this tile gives p = 0, never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_ptr.load([n0, 0])
        elif MODE == 3 or MODE == 5:
            v = tl.load(v_ptr + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kmask[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + offs_n[:, None] * stride_kt + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=IN_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T", "W"])
def _dms_fwd_kernel(Q, K, V, LK, LK2, DOC, FIRST, O, LSE, FLAGS, KC, VC, CUM,
                    sqb, sqh, sqt, skb, skh, skt, sob, soh, sot,
                    H, T, W, qk_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_DMS: tl.constexpr, HAS_DOC: tl.constexpr, IN_PREC: tl.constexpr,
                    FAR_MODE: tl.constexpr, HAS_FLAGS: tl.constexpr = False, GATHERED: tl.constexpr = False,
                    USE_TMA: tl.constexpr = False):
    # Longest rows first: causal programs near the end of the sequence do the most tiles.
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
    q_ptr = Q + b64 * sqb + h.to(tl.int64) * sqh
    k_ptr = K + b64 * skb + hk.to(tl.int64) * skh
    v_ptr = V + b64 * skb + hk.to(tl.int64) * skh
    if USE_TMA:
        k_ptr = tl.make_tensor_descriptor(k_ptr, shape=[T, HEAD_DIM], strides=[skt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_ptr = tl.make_tensor_descriptor(v_ptr, shape=[T, HEAD_DIM], strides=[skt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    lk_ptr = LK + (b64 * (H // GROUP) + hk) * T
    lk2_ptr = LK2 + (b64 * (H // GROUP) + hk) * 2 * _lk2_stride(T)
    if USE_TMA and FAR_MODE == 4:
        lk2_ptr = lk2_descriptor(lk2_ptr, T, BLOCK_N)
    flag_ptr = FLAGS + (b64 * (H // GROUP) + hk) * tl.cdiv(T, BLOCK_N)
    q = tl.load(q_ptr + offs_m[:, None] * sqt + offs_d[None, :], mask=rmask[:, None], other=0.0)
    c16 = tl.arange(0, 16)[None, :] + tl.zeros([BLOCK_M, 16], dtype=tl.int32)
    ones = tl.where(c16 < 2, 1.0, 0.0).to(Q.dtype.element_ty)

    lo = 0
    qdoc = offs_m  # placeholder when HAS_DOC is False
    kdoc_ptr = DOC
    if HAS_DOC:
        kdoc_ptr = DOC + b64 * T
        qdoc = tl.load(kdoc_ptr + offs_m, mask=rmask, other=-2)
        first = tl.load(FIRST + b64 * T + offs_m, mask=rmask, other=T)
        lo = (tl.min(first, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_DMS:
        f_end = (tl.maximum(m0 - W, 0) // BLOCK_N) * BLOCK_N
        f_end = tl.minimum(tl.maximum(f_end, lo), m0)
        x_end = ((tl.maximum(m0 + BLOCK_M - 1 - W, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        x_end = tl.minimum(tl.maximum(x_end, f_end), m0)
        if GATHERED:
            # FAR: the kept keys before f_end, compacted (contiguous [B, Hkv, T, D] copies): plain tiles
            sl = (b64 * (H // GROUP) + hk) * T
            kc_ptr = KC + sl * HEAD_DIM
            vc_ptr = VC + sl * HEAD_DIM
            if USE_TMA:
                kc_ptr = tl.make_tensor_descriptor(kc_ptr, shape=[T, HEAD_DIM], strides=[HEAD_DIM, 1],
                                                   block_shape=[BLOCK_N, HEAD_DIM])
                vc_ptr = tl.make_tensor_descriptor(vc_ptr, shape=[T, HEAD_DIM], strides=[HEAD_DIM, 1],
                                                   block_shape=[BLOCK_N, HEAD_DIM])
            n_far = tl.load(CUM + (b64 * (H // GROUP) + hk) * (T + 1) + f_end)
            n_full = (n_far // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kc_ptr, vc_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m,
                                       offs_d, HEAD_DIM, 0, n_full, T, W, qk_scale, flag_ptr, 0, HAS_DMS, HAS_DOC,
                                       BLOCK_N, IN_PREC, USE_TMA=USE_TMA)
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kc_ptr, vc_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m,
                                       offs_d, HEAD_DIM, n_full, n_far, n_far, W, qk_scale, flag_ptr, 5, HAS_DMS,
                                       HAS_DOC, BLOCK_N, IN_PREC, USE_TMA=USE_TMA)
        else:
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m,
                                       offs_d, skt, lo, f_end, T, W, qk_scale, flag_ptr, FAR_MODE, HAS_DMS, HAS_DOC,
                                       BLOCK_N, IN_PREC, HAS_FLAGS, USE_TMA=USE_TMA)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, skt,
                                   f_end, x_end, T, W, qk_scale, flag_ptr, 2, HAS_DMS, HAS_DOC, BLOCK_N, IN_PREC,
                                   USE_TMA=USE_TMA)
    else:
        x_end = lo
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, skt,
                               x_end, m0, T, W, qk_scale, flag_ptr, 0, HAS_DMS, HAS_DOC, BLOCK_N, IN_PREC,
                               USE_TMA=USE_TMA)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, lk_ptr, lk2_ptr, ones, kdoc_ptr, qdoc, offs_m, offs_d, skt,
                               m0, hi, T, W, qk_scale, flag_ptr, 3, HAS_DMS, HAS_DOC, BLOCK_N, IN_PREC,
                               USE_TMA=USE_TMA)
    # Every valid row sees its own key, so l_i > 0 there; padded rows are not stored.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    o_ptr = O + b64 * sob + h.to(tl.int64) * soh
    tl.store(o_ptr + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=rmask)


def _env_cfg(name):
    s = os.environ.get(name)
    if not s:
        return None
    bm, bn, w, st = (int(x) for x in s.split(","))
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)


# Test hook: force a block configuration (dict like the ones below), e.g. to exercise BLOCK_M != BLOCK_N.
FWD_CONFIG_OVERRIDE: dict | None = None


def fwd_config(D: int, dtype: torch.dtype, gathered: bool = False) -> dict:
    """Block sizes for the forward kernel (BLOCK_M queries x BLOCK_N keys; BLOCK_M % BLOCK_N == 0).

    ``gathered``: the hard-mask form with a gathered FAR region (no bias operand in shared memory)."""
    if FWD_CONFIG_OVERRIDE is not None:
        return dict(FWD_CONFIG_OVERRIDE)
    env = _env_cfg("DMS_ATTN_FWD_CFG_HARD" if gathered else "DMS_ATTN_FWD_CFG")
    if env is not None:
        return env
    if _INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32 and D > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if D > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if D <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if gathered:
        # no log_keep operand in shared memory, so 128x128 tiles fit 3 stages. H100, 4-layer Llama-3-8B-shape
        # prefill of 32K tokens, nothing evicted (bench_decode --sections prefill, DMS_ATTN_FWD_CFG_HARD):
        # 128x128/8/3 196.2 ms, 128x64/8/4 196.7, 128x64/8/3 198.9, 128x64/4/3 220.1 (SDPA: 180 ms).
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    # H100, L=8192, B=4, H=32, Hkv=8, bf16, window 256 (bench --pick-fwd), forward ms with / without the
    # DMS term: 128x128, 8 warps, 2 stages 5.47 / 4.94; 128x64/8/3 7.07 / 4.76; 64x64/4/3 10.07 / 5.03.
    # 128x128 with 3 stages needs 237 KB of shared memory once log_keep is a matmul operand (limit 227 KB).
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)


def _in_prec(dtype):
    # fp32 inputs (tests): exact fp32 products instead of tf32, so tolerances can stay tight.
    return "ieee" if dtype == torch.float32 else "tf32"


def doc_bounds(doc_ids: torch.Tensor):
    """Per position ``[B, T]``: dense int32 doc id, first and last index of that document (any id layout)."""
    B, T = doc_ids.shape
    _, inv = torch.unique(doc_ids, return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 1
    key = (inv + torch.arange(B, device=doc_ids.device)[:, None] * n).flatten()
    pos = torch.arange(T, device=doc_ids.device).expand(B, T).flatten()
    first = torch.full((B * n,), T, dtype=torch.int64, device=doc_ids.device).scatter_reduce(0, key, pos, "amin")
    last = torch.full((B * n,), -1, dtype=torch.int64, device=doc_ids.device).scatter_reduce(0, key, pos, "amax")
    return (inv.to(torch.int32).contiguous(), first[key].view(B, T).to(torch.int32).contiguous(),
            last[key].view(B, T).to(torch.int32).contiguous())


def bias_mma_enabled() -> bool:
    """FAR-tile log_keep through the tensor cores (see _fwd_tiles); DMS_ATTN_BIAS_MMA=0 turns it off."""
    return os.environ.get("DMS_ATTN_BIAS_MMA", "1") != "0"


def lk2_row_stride(T: int) -> int:
    """Row stride of :func:`split_log_keep`'s rows: T rounded up to 8, so rows start 16-byte aligned (TMA)."""
    return -(-T // 8) * 8


def split_log_keep(lk: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Hkv, T]`` fp32 log_keep -> ``[B, Hkv, 2, T]`` (hi, lo) parts of ``log_keep / scale`` in ``dtype``.

    hi + lo carries ~16 mantissa bits in bf16 (hi alone would be 8); -inf stays -inf in hi with lo = 0.
    The rows are :func:`lk2_row_stride` apart (a view of a zero-padded buffer), which the kernels assume.
    """
    B, hkv, T = lk.shape
    raw = lk / scale
    hi = raw.to(dtype)
    lo = torch.where(torch.isinf(hi), torch.zeros_like(raw), raw - hi.float()).to(dtype)
    out = torch.zeros(B, hkv, 2, lk2_row_stride(T), dtype=dtype, device=lk.device)
    out[:, :, 0, :T] = hi
    out[:, :, 1, :T] = lo
    return out[..., :T]


def _check_lk2(lk2: torch.Tensor, lk: torch.Tensor) -> None:
    B, hkv, T = lk.shape
    tp = lk2_row_stride(T)
    if lk2.shape != (B, hkv, 2, T) or lk2.stride() != (hkv * 2 * tp, 2 * tp, tp, 1):
        raise ValueError(f"lk2 must come from split_log_keep (shape {(B, hkv, 2, T)}, rows {tp} apart); "
                         f"got shape {tuple(lk2.shape)}, strides {lk2.stride()}")


def hard_tile_flags_enabled() -> bool:
    """Hard-mask forward skips the bias product of all-kept tiles (``DMS_ATTN_TILE_FLAGS=1``; off by default
    until timed on a GPU)."""
    return os.environ.get("DMS_ATTN_TILE_FLAGS", "0") == "1"


def hard_tile_flags(lk: torch.Tensor, block_n: int) -> torch.Tensor:
    """``[B, Hkv, T]`` hard log_keep -> int8 ``[B, Hkv, ceil(T / block_n)]``: 1 where a key tile has an evicted key."""
    B, hkv, T = lk.shape
    nb = -(-T // block_n)
    ev = torch.zeros(B, hkv, nb * block_n, dtype=torch.int8, device=lk.device)
    ev[..., :T] = (lk != 0).to(torch.int8)
    return ev.view(B, hkv, nb, block_n).amax(-1).contiguous()


def gathered_far_enabled() -> bool:
    """Hard masks without documents use the gathered FAR region (module docstring); ``DMS_ATTN_GATHER=0``
    turns it off (the bias-product path then serves hard masks too)."""
    return os.environ.get("DMS_ATTN_GATHER", "1") != "0"


@triton.jit
def _compact_kernel(K, V, LK, CUM, KC, VC, T, s_kb, s_kh, s_kt, HKV: tl.constexpr, D: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    # Program (stream n, block of positions): each kept key's row goes to row cum[t] of the stream's compact copy;
    # rows at or past the stream's count become zeros (the filler must be finite: a masked tile still multiplies
    # its V rows by p = 0).
    n = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = n // HKV
    h = n % HKV
    inb = t < T
    keep = (tl.load(LK + n.to(tl.int64) * T + t, mask=inb, other=float("-inf")) == 0) & inb
    rank = tl.load(CUM + n.to(tl.int64) * (T + 1) + t, mask=inb, other=0)
    count = tl.load(CUM + n.to(tl.int64) * (T + 1) + T)
    d = tl.arange(0, D)
    src = b.to(tl.int64) * s_kb + h * s_kh + t.to(tl.int64)[:, None] * s_kt + d[None, :]
    dst_base = n.to(tl.int64) * T * D
    kr = tl.load(K + src, mask=keep[:, None], other=0.0)
    vr = tl.load(V + src, mask=keep[:, None], other=0.0)
    dst = dst_base + rank.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(KC + dst, kr, mask=keep[:, None])
    tl.store(VC + dst, vr, mask=keep[:, None])
    fill = inb & (t >= count)
    zdst = dst_base + t.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(KC + zdst, tl.zeros([BLOCK_T, D], KC.dtype.element_ty), mask=fill[:, None])
    tl.store(VC + zdst, tl.zeros([BLOCK_T, D], VC.dtype.element_ty), mask=fill[:, None])


def compact_kept(k, v, lk, block_t: int = 64):
    """Triton :func:`gather_kept` (same returns) in one launch besides the cumulative sum; the filler rows past
    each stream's kept keys are zeros. k and v need equal strides and a unit last stride."""
    B, hkv, T = lk.shape
    D = k.shape[-1]
    if k.stride() != v.stride() or k.stride(-1) != 1 or not lk.is_contiguous():
        raise ValueError(f"compact_kept needs k and v with equal strides and a unit last stride, and a contiguous lk; "
                         f"got strides {k.stride()} / {v.stride()}, lk contiguous: {lk.is_contiguous()}")
    cum = torch.zeros(B, hkv, T + 1, dtype=torch.int32, device=lk.device)
    torch.cumsum(lk == 0, -1, dtype=torch.int32, out=cum[..., 1:])
    kc = torch.empty(B, hkv, T, D, dtype=k.dtype, device=k.device)
    vc = torch.empty_like(kc)
    _compact_kernel[(B * hkv, triton.cdiv(T, block_t))](
        k, v, lk, cum, kc, vc, T, k.stride(0), k.stride(1), k.stride(2), HKV=hkv, D=D, BLOCK_T=block_t, num_warps=4)
    return kc, vc, cum


def compact_enabled() -> bool:
    """The gathered FAR region is compacted by :func:`compact_kept` (one Triton launch); ``DMS_ATTN_COMPACT=0``
    uses the PyTorch :func:`gather_kept` (a scatter and two gathers)."""
    return os.environ.get("DMS_ATTN_COMPACT", "1") != "0"


def gather_kept(k, v, lk):
    """Kept keys of a hard mask, compacted: ``(kc, vc, cum)`` (PyTorch form; :func:`compact_kept` is the kernel).

    ``kc/vc [B, Hkv, T, D]`` (contiguous) hold each stream's keys with ``lk == 0`` in position order at the
    front (the rest is filler that the kernel never reads unmasked); ``cum [B, Hkv, T + 1]`` int32 counts the
    kept keys before each position, so the kept keys before ``t`` are ``kc[..., :cum[t], :]``. No host sync.
    """
    B, hkv, T = lk.shape
    keep = lk == 0
    cum = torch.zeros(B, hkv, T + 1, dtype=torch.int32, device=lk.device)
    torch.cumsum(keep, -1, dtype=torch.int32, out=cum[..., 1:])
    # src[r] = position of the r-th kept key (a scatter by rank; dropped keys go to a dump column T)
    src = torch.zeros(B, hkv, T + 1, dtype=torch.long, device=lk.device)
    pos = torch.arange(T, device=lk.device).expand(B, hkv, T)
    src.scatter_(2, torch.where(keep, cum[..., :-1].long(), T), pos)
    idx = src[..., :T, None]
    kc = torch.gather(k, 2, idx.expand(B, hkv, T, k.shape[-1]))
    vc = torch.gather(v, 2, idx.expand(B, hkv, T, v.shape[-1]))
    return kc, vc, cum


def dms_attention_fwd(q, k, v, lk, window, docs, scale, has_dms=True, lk2=None, out_like_q=False, hard=False):
    """Launch the forward kernel.

    Args: q ``[B, H, T, D]``, k/v ``[B, Hkv, T, D]`` (last dim contiguous), lk ``[B, Hkv, T]`` fp32
    contiguous, docs ``None`` or ``(doc, first, last)`` from :func:`doc_bounds`, lk2 ``None`` or
    :func:`split_log_keep` of lk (computed here when needed). q/k/v may be strided views (unit last
    stride, k and v with equal strides); ``out_like_q`` allocates o with q's strides (a q that is a
    transposed ``[B, T, H, D]`` projection then gives an o that reshapes to ``[B, T, H * D]`` for free).
    ``hard``: lk holds only 0 / -inf: without documents the FAR tiles run over the gathered kept keys
    (:func:`gather_kept`, :func:`gathered_far_enabled`); otherwise with :func:`hard_tile_flags_enabled`
    all-kept tiles skip the bias.
    Returns ``o [B, H, T, D]`` (q.dtype) and ``lse [B, H, T]`` fp32 (natural log).
    """
    B, H, T, D = q.shape
    hkv = k.shape[1]
    W = min(int(window), T)  # window >= T behaves as T; keeps the int32 arithmetic in range
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and k.stride() == v.stride()
    if out_like_q:
        o = torch.empty_like(q)  # same strides as q (dense, non-overlapping)
        if POISON_OUTPUTS:
            o.fill_(float("nan"))
    else:
        o = _empty((B, H, T, D), q.dtype, q.device)
    lse = _empty((B, H, T), torch.float32, q.device)
    gathered = has_dms and hard and docs is None and gathered_far_enabled()
    cfg = fwd_config(D, q.dtype, gathered=gathered)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    assert bm % bn == 0
    doc, first = (docs[0], docs[1]) if docs is not None else (lse, lse)
    bias_mma = has_dms and bias_mma_enabled() and not gathered
    if bias_mma and lk2 is None:
        lk2 = split_log_keep(lk, scale, q.dtype)
    if bias_mma:
        _check_lk2(lk2, lk)
    flags = hard_tile_flags(lk, bn) if (hard and bias_mma and hard_tile_flags_enabled()) else None
    kc, vc, cum = (compact_kept if compact_enabled() else gather_kept)(k, v, lk) if gathered else (lse, lse, lse)
    # H100, L=8192, DMS on, 128x128/8/2 (bench --sweep, session 8): descriptor loads of K/V alone made this forward
    # slower (6.21 vs 5.67 ms); with the bias operand also a bulk copy (_bias_rows) 5.97 vs 6.19 ms in one run.
    # Hard-mask prefill (gathered FAR region, bench_decode --sections prefill, 8K): 37.87 vs 38.04 ms.
    tma = cfg.get("tma", use_tma(k, v))
    if tma:
        ensure_allocator()
    grid = (triton.cdiv(T, bm), B * H)
    _dms_fwd_kernel[grid](
        q, k, v, lk, lk2 if bias_mma else lk, doc, first, o, lse, flags if flags is not None else lse, kc, vc, cum,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, T, W, scale * LOG2E,
        GROUP=H // hkv, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
        HAS_DMS=has_dms, HAS_DOC=docs is not None, IN_PREC=_in_prec(q.dtype), FAR_MODE=4 if bias_mma else 1,
        HAS_FLAGS=flags is not None, GATHERED=gathered, USE_TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, lse
