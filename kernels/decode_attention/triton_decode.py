"""Triton kernels for paged DMS decoding (semantics and layout: reference.py).

``paged_append``: one program per stream (sequence, KV head); applies the pending decision, recycles
the slot of the key that just left the window when it is flagged, else takes the next slot and pops a
page from the free stack with an atomic when the slot opens a block. No host synchronisation.

``paged_decode_attention``: split-K flash decoding over the ragged per-head store. One program holds
all ``G = H / Hkv`` query heads of its KV head (padded to 16 rows for ``tl.dot``), so every K/V byte is
read once per step; it walks a range of pages with an online softmax in fp32 and writes a partial
output and log-sum-exp; a second kernel merges the partials (log-sum-exp weighted) and writes
``[B, H, D]`` in the query dtype. On Hopper both are launched with programmatic dependent launch (``PDL_DEFAULT``), so
that each one's programs are in place when its predecessor finishes. Two ways to cut the work (``kernel=``):

* ``split``: grid ``(N streams, splits)``, every stream cut into splits of a fixed number of pages;
* ``flat``: a fixed grid of ``P`` programs (a multiple of the SM count) over the concatenation of all
  streams' pages; each program takes an equal share of the *actual* total (computed on the device
  from ``seq_len``, so no host sync and CUDA-graph safe) and may span stream boundaries. Equal shares
  on a grid that fills the SMs evenly avoid the last-wave imbalance of the split grid, whose program
  count is rarely a multiple of the SM count and whose programs differ in length when heads do.
  Partial ``(p, n)`` (program ``p``'s share of stream ``n``) is stored at row ``p + n``: along the
  monotone staircase of (program, stream) pairs that index is unique. Both walk pages with the same
  ``_attend_pages`` loop.

Measured on the H100 side by side (``scripts/bench_decode.py --compare-kernel --flat-programs 1 3 4``,
docs/results/decode_kernel_compare.json; fractions of copy bandwidth, batch 8): the flat grid loses on dense
rows (32K: 0.86 vs 0.97) and on skewed ones (32K: 0.83 vs 0.90; 8K: 0.68 vs 0.71), ties on CR-8 rows at 32K
(0.70) and wins only on the smallest, CR 8 at 8K (0.62 vs 0.45); 1, 3 or 4 programs per SM do no better than
2. The last-wave imbalance it removes is not what limits the split grid, so ``split`` stays the default.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import SUPPORTED_HEAD_DIMS

try:  # programmatic dependent launch (Hopper on): Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off (pdl_default)
    gdc_launch_dependents = gdc_wait = None

LOG2E = 1.4426950408889634
# Tests set this to allocate outputs filled with NaN, so that an unwritten element fails.
POISON_OUTPUTS = os.environ.get("DMS_ATTN_POISON", "0") == "1"
# Triton 3.9's CPU interpreter returns garbage for bf16 tl.dot (measured: 2.8e10 max error on a 16x16
# product; fp16 exact), so under the interpreter bf16 operands are upcast to fp32 before the dot.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _append_kernel(KN, VN, LG, VALID, SEEN, KP, VP, POSP, BT, LEN, HELD, NOW, RSLOT, REV, FREE, FTOP,
                   s_knb, s_knh, s_vnb, s_vnh, s_lgb, s_lgh, s_kp, s_kt, s_vp, s_vt, s_bt,
                   HKV: tl.constexpr, W: tl.constexpr, R: tl.constexpr, PS: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr):
    n = tl.program_id(0)
    b = n // HKV
    h = n % HKV
    ok = tl.load(VALID + b) != 0
    p = tl.load(SEEN + n)
    lg = tl.load(LG + b * s_lgb + h * s_lgh)
    ev_prev = lg > 0
    tl.store(REV + n * R + (p - 1) % R, ev_prev.to(tl.int8), mask=ok & (p > 0))
    c = p - 1 - W
    ci = (c + R) % R
    rs = tl.load(RSLOT + n * R + ci)
    evc = tl.load(REV + n * R + ci) != 0
    if W == 0:
        evc = ev_prev
    drop = ok & (c >= 0) & (rs >= 0) & evc
    tl.store(RSLOT + n * R + ci, -1, mask=drop)
    ln = tl.load(LEN + n)
    slot = tl.where(drop, rs, ln)
    append = ok & (~drop)
    need = append & (slot % PS == 0)
    top = tl.atomic_add(FTOP, -1, mask=need)  # old value; the popped page is FREE[top - 1]
    new_page = tl.load(FREE + tl.maximum(top - 1, 0), mask=need, other=0)
    blk = slot // PS
    tl.store(BT + n * s_bt + blk, new_page, mask=need)
    old_page = tl.load(BT + n * s_bt + blk, mask=ok & (~need), other=0)
    page = tl.where(need, new_page, old_page).to(tl.int64)
    tl.store(LEN + n, ln + 1, mask=append)
    off = slot % PS
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    k = tl.load(KN + b * s_knb + h * s_knh + d)
    v = tl.load(VN + b * s_vnb + h * s_vnh + dv)
    oki = ok.to(tl.int32)
    tl.store(KP + page * s_kp + off * s_kt + d, k.to(KP.dtype.element_ty), mask=(d * 0 + oki) != 0)
    tl.store(VP + page * s_vp + off * s_vt + dv, v.to(VP.dtype.element_ty), mask=(dv * 0 + oki) != 0)
    tl.store(POSP + page * PS + off, p, mask=ok)
    tl.store(RSLOT + n * R + p % R, slot, mask=ok)
    tl.store(REV + n * R + p % R, 0, mask=ok)
    held = tl.load(HELD + n)
    if W == 0:
        now = held + 1 - drop.to(tl.int32)
        new_held = now
    else:
        now = held + 1
        c2 = p - W
        c2i = (c2 + R) % R
        ev2 = tl.load(REV + n * R + c2i) != 0
        ev2 = tl.where(c2 == p - 1, ev_prev, ev2)
        rs2 = tl.load(RSLOT + n * R + c2i)
        dying = (c2 >= 0) & (rs2 >= 0) & ev2
        new_held = now - dying.to(tl.int32)
    tl.store(NOW + n, now, mask=ok)
    tl.store(HELD + n, new_held, mask=ok)
    tl.store(SEEN + n, p + 1, mask=ok)


def paged_append(k_new, v_new, logits, valid, seen, k_pool, v_pool, pos_pool, block_table, seq_len,
                 held, now, ring_slot, ring_ev, free_stack, free_top, window: int):
    """Triton form of :func:`reference.paged_append_reference` (same arguments; ``ring_ev`` int8/bool)."""
    B, Hkv, D = k_new.shape
    DV = v_new.shape[-1]
    N = B * Hkv
    if valid.dtype == torch.bool:
        valid = valid.to(torch.int8)
    rev = ring_ev if ring_ev.dtype == torch.int8 else ring_ev.view(torch.int8)
    _append_kernel[(N,)](
        k_new, v_new, logits, valid, seen, k_pool, v_pool, pos_pool, block_table, seq_len, held, now,
        ring_slot, rev, free_stack, free_top,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), logits.stride(0), logits.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), block_table.stride(0),
        HKV=Hkv, W=int(window), R=ring_slot.shape[1], PS=k_pool.shape[1], D=D, DV=DV, num_warps=1,
    )


@triton.jit
def _attend_pages(q, n, j0, j1, length, KP, VP, POSP, BT, qk_scale, s_kp, s_kt, s_vp, s_vt, s_bt,
                  GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PS: tl.constexpr, IEEE: tl.constexpr,
                  V_MASK_POS: tl.constexpr, USE_TMA: tl.constexpr = False):
    # Online softmax of the GP query rows ``q`` over pages [j0, j1) of stream n: (o [GP, DV], lse [GP] in log2
    # units, -inf where nothing was seen). USE_TMA: KP / VP are tensor descriptors of the pools viewed as
    # [pages * PS, D] rows with [PS, D] blocks (one bulk copy per page).
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    t = tl.arange(0, PS)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DV], tl.float32)
    for j in range(j0, j1):
        page = tl.load(BT + n * s_bt + j).to(tl.int64)
        if USE_TMA:
            k = KP.load([(page * PS).to(tl.int32), 0])
        else:
            k = tl.load(KP + page * s_kp + t[:, None] * s_kt + d[None, :])
        pos = tl.load(POSP + page * PS + t)
        inside = (j * PS + t) < length
        ok = inside & (pos >= 0)
        # Slots past the end hold stale or uninitialised bytes: masked so that 0 * NaN never enters. Holes inside
        # a stream (pos < 0) hold an evicted token's finite values (pools start zeroed): by default they are left
        # unmasked (their probability is 0), so that the V load does not wait for the positions
        # (V_MASK_POS=True masks them too; see the module constant).
        if USE_TMA:  # a bulk copy cannot mask rows: zero them after the load instead
            v = tl.where((ok if V_MASK_POS else inside)[:, None], VP.load([(page * PS).to(tl.int32), 0]), 0.0)
        elif V_MASK_POS:
            v = tl.load(VP + page * s_vp + t[:, None] * s_vt + dv[None, :], mask=ok[:, None], other=0.0)
        else:
            v = tl.load(VP + page * s_vp + t[:, None] * s_vt + dv[None, :], mask=inside[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    return o, lse


@triton.jit
def _splits_written(length, pages_per_split, PS: tl.constexpr):
    # The splits of a stream of ``length`` slots that the split kernel runs (and writes): at least one, so that an
    # empty stream merges to zeros. Splits past it (the grid is sized by the longest stream) do nothing.
    return tl.maximum(tl.cdiv(tl.cdiv(length, PS), pages_per_split), 1)


@triton.jit
def _mask_rows(out, den, VALID, b, HAS_VALID: tl.constexpr):
    # merged output of query row(s) of sequence b: zero where no key was seen or the row is padding (HAS_VALID=False:
    # every row is valid, no flag tensor, so no fill kernel per call)
    ok = den > 0
    if HAS_VALID:
        ok = ok & (tl.load(VALID + b) != 0)
    return tl.where(ok, out, 0.0)


@triton.jit
def _decode_split_kernel(Q, KP, VP, POSP, BT, LEN, OP, LP, qk_scale, pages_per_split,
                         s_qb, s_qh, s_kp, s_kt, s_vp, s_vt, s_bt, s_opn, s_ops, s_lpn,
                         HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                         PS: tl.constexpr, IEEE: tl.constexpr, V_MASK_POS: tl.constexpr = False,
                         USE_TMA: tl.constexpr = False, PDL: tl.constexpr = False):
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel's writes, let the merge in
        gdc_wait()
        gdc_launch_dependents()
    n = tl.program_id(0)
    split = tl.program_id(1)
    b = n // HKV
    h = n % HKV
    length = tl.load(LEN + n)
    n_pages = tl.cdiv(length, PS)
    if split < _splits_written(length, pages_per_split, PS):  # the merge reads only these
        p0 = split * pages_per_split
        p1 = tl.minimum(p0 + pages_per_split, n_pages)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        q = tl.load(Q + b * s_qb + (h * G + g[:, None]) * s_qh + d[None, :], mask=g[:, None] < G, other=0.0)
        o, lse = _attend_pages(q, n, p0, p1, length, KP, VP, POSP, BT, qk_scale, s_kp, s_kt, s_vp, s_vt, s_bt,
                               GP, D, DV, PS, IEEE, V_MASK_POS, USE_TMA)
        tl.store(OP + n * s_opn + split * s_ops + g[:, None] * DV + dv[None, :], o, mask=g[:, None] < G)
        tl.store(LP + n * s_lpn + split * GP + g, lse, mask=g < G)


@triton.jit
def _merge_kernel(OP, LP, O, VALID, LEN, pages_per_split, n_grid, s_opn, s_ops, s_lpn, s_ob, s_oh,
                  HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, SP: tl.constexpr,
                  PS: tl.constexpr, HAS_VALID: tl.constexpr = True, PDL: tl.constexpr = False):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n = tl.program_id(0)
    g = tl.program_id(1)
    b = n // HKV
    h = n % HKV
    # the splits written (never more than the grid had: a stream longer than max_len is cut off, not overrun)
    n_splits = tl.minimum(_splits_written(tl.load(LEN + n), pages_per_split, PS), n_grid)
    sp = tl.arange(0, SP)
    dv = tl.arange(0, DV)
    lse = tl.load(LP + n * s_lpn + sp * GP + g, mask=sp < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    den = tl.sum(w, 0)
    o = tl.load(OP + n * s_opn + sp[:, None] * s_ops + g * DV + dv[None, :], mask=(sp < n_splits)[:, None], other=0.0)
    o = tl.where((w > 0)[:, None], o, 0.0)  # a split that saw no key stored zeros, but never trust it
    out = tl.sum(o * w[:, None], 0) / tl.maximum(den, 1e-30)
    out = _mask_rows(out, den, VALID, b, HAS_VALID)
    tl.store(O + b * s_ob + (h * G + g) * s_oh + dv, out.to(O.dtype.element_ty))


@triton.jit
def _flat_layout(LEN, N, P, PS: tl.constexpr, NP2: tl.constexpr):
    # every stream's page count, its inclusive prefix sum, and the pages per program
    idx = tl.arange(0, NP2)
    lens = tl.load(LEN + idx, mask=idx < N, other=0)
    pages = (lens + PS - 1) // PS
    hi = tl.cumsum(pages, 0)
    total = tl.sum(pages, 0)
    chunk = tl.maximum((total + P - 1) // P, 1)
    return idx, lens, pages, hi, total, chunk


@triton.jit
def _decode_flat_kernel(Q, KP, VP, POSP, BT, LEN, OP, LP, qk_scale, N, P,
                        s_qb, s_qh, s_kp, s_kt, s_vp, s_vt, s_bt, s_opn, s_lpn,
                        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        PS: tl.constexpr, NP2: tl.constexpr, IEEE: tl.constexpr, V_MASK_POS: tl.constexpr = False):
    p = tl.program_id(0)
    idx, lens, pages, hi, total, chunk = _flat_layout(LEN, N, P, PS, NP2)
    g0 = p * chunk
    g1 = tl.minimum(g0 + chunk, total)
    n = tl.sum((hi <= g0).to(tl.int32), 0)  # the stream that holds global page g0
    g = g0
    gq = tl.arange(0, GP)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    while g < g1:
        sel = idx == n
        c_hi = tl.sum(tl.where(sel, hi, 0), 0)
        length = tl.sum(tl.where(sel, lens, 0), 0)
        c_lo = c_hi - tl.sum(tl.where(sel, pages, 0), 0)
        j0 = g - c_lo
        j1 = tl.minimum(g1, c_hi) - c_lo
        b = n // HKV
        h = n % HKV
        q = tl.load(Q + b * s_qb + (h * G + gq[:, None]) * s_qh + d[None, :], mask=gq[:, None] < G, other=0.0)
        o, lse = _attend_pages(q, n, j0, j1, length, KP, VP, POSP, BT, qk_scale, s_kp, s_kt, s_vp, s_vt, s_bt,
                               GP, D, DV, PS, IEEE, V_MASK_POS)
        row = (p + n).to(tl.int64)
        tl.store(OP + row * s_opn + gq[:, None] * DV + dv[None, :], o, mask=gq[:, None] < G)
        tl.store(LP + row * s_lpn + gq, lse, mask=gq < G)
        g = tl.minimum(g1, c_hi)
        n += 1


@triton.jit
def _merge_flat_kernel(OP, LP, O, VALID, LEN, N, P, s_opn, s_lpn, s_ob, s_oh,
                       HKV: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, PS: tl.constexpr, NP2: tl.constexpr,
                       HAS_VALID: tl.constexpr = True):
    n = tl.program_id(0)
    gq = tl.program_id(1)
    b = n // HKV
    h = n % HKV
    idx, lens, pages, hi, total, chunk = _flat_layout(LEN, N, P, PS, NP2)
    sel = idx == n
    c_hi = tl.sum(tl.where(sel, hi, 0), 0)
    c_lo = c_hi - tl.sum(tl.where(sel, pages, 0), 0)
    p_first = c_lo // chunk
    p_end = tl.where(c_hi > c_lo, (c_hi - 1) // chunk + 1, p_first)  # programs [p_first, p_end) hold stream n
    dv = tl.arange(0, DV)
    m = tl.full([], float("-inf"), tl.float32)
    den = tl.zeros([], tl.float32)
    acc = tl.zeros([DV], tl.float32)
    for p in range(p_first, p_end):
        row = (p + n).to(tl.int64)
        lse = tl.load(LP + row * s_lpn + gq)
        o = tl.load(OP + row * s_opn + gq * DV + dv)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * w_old + tl.where(w > 0, o * w, 0.0)
        den = den * w_old + w
        m = m_new
    out = acc / tl.maximum(den, 1e-30)
    out = _mask_rows(out, den, VALID, b, HAS_VALID)
    tl.store(O + b * s_ob + (h * G + gq) * s_oh + dv, out.to(O.dtype.element_ty))


_SUPPORTED_D = SUPPORTED_HEAD_DIMS
# Split sizing and launch defaults of the decode kernel: no program walks more than MAX_PAGES_PER_SPLIT
# pages and the grid holds >= 4 programs per SM. From the H100 sweep (`scripts/bench_decode.py --sweep`,
# batch 8, page 64, D 128; docs/benchmarks.md "Decode"): 16 pages with 2 stages was within 1% of the best
# setting for dense 8K/32K and ragged CR-8 32K (8 pages / 3 stages: +3%, +3%, +10%).
MAX_PAGES_PER_SPLIT = 16
SPLIT_PROGRAMS_PER_SM = 4
DEFAULT_WARPS = 4
DEFAULT_STAGES = 2
# From this many streams (sequences x KV heads) on, the split kernel pipelines its page loads 3 deep
# (MANY_STREAMS_STAGES). H100, session 9, bench_decode --sections kernel, stages 2 / 3 / 2 / 3 interleaved in one lease
# (docs/results/decode_kernel_stages_s9.json): at batch 8 (64 streams) 3 stages lifted skewed 8K from 0.781 / 0.781 to
# 0.805 / 0.801 of copy bandwidth and ragged CR 8 32K from 1.28x to 1.24x ideal, dense rows within 0.01; at batch 1
# (8 streams) they lost (dense 8K 0.82 -> 0.70); at batch 32 they gave and took 0.02 by row.
MANY_STREAMS = 64
MANY_STREAMS_STAGES = 3
# The flat grid: this many programs per SM (all resident at once; each holds two 64 x 128 bf16 K/V tiles
# per stage in shared memory).
FLAT_PROGRAMS_PER_SM = 2
KERNELS = ("split", "flat")
# Split kernel: mask V tiles by slot position (True) or by the stream length only (False, the default: the V load
# then does not wait for the positions). H100, CUDA graphs, batch 8 (scripts/bench_decode_variants.py,
# docs/results/decode_kernel_variants.json, fractions of copy bandwidth, True -> False): dense 8K 0.81 -> 0.86,
# skewed 8K 0.72 -> 0.76, CR 8 32K 0.70 -> 0.74, dense 32K 0.96 -> 0.96. 8 warps and two pages per loop iteration
# were timed too and were not better overall (3 stages: see MANY_STREAMS).
V_MASK_POS = False
# Programmatic dependent launch of the split and merge kernels (pdl_default): each kernel's programs are dispatched
# while the kernel before it drains, and wait (griddepcontrol.wait) for its writes before reading. H100, session 10,
# bench_decode_variants.py, PDL / plain launches interleaved, 3 repeats (docs/results/decode_kernel_pdl_s10.json):
# skewed 8K/B8 0.79 -> 0.81, CR 8 32K/B8 0.80 -> 0.81, CR 8 8K/B32 0.79 -> 0.80, dense rows +0.003-0.007. Tried in the
# same session and removed (timings in the same JSON): the stream's last split program merging the partials (an arrival counter per
# stream; slower on every row, as session 7's fused merge), and dispatching the splits longest first (lost to the
# natural grid on every row).
PDL_DEFAULT = True


def split_stages(n_streams: int) -> int:
    """Default pipeline depth of the split kernel for ``n_streams`` streams (see ``MANY_STREAMS``)."""
    return MANY_STREAMS_STAGES if n_streams >= MANY_STREAMS else DEFAULT_STAGES


def decode_tma_default(device) -> bool:
    """Page loads through tensor descriptors by default? ``DMS_DECODE_TMA=1`` turns them on; off otherwise: on the
    H100 they read slower on every row of ``scripts/bench_decode_variants.py`` (session 8, fractions of copy
    bandwidth, batch 8: dense 8K 0.846 vs 0.872, skewed 8K 0.764 vs 0.794, CR 8 32K 0.743 vs 0.777)."""
    env = os.environ.get("DMS_DECODE_TMA", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"DMS_DECODE_TMA={env!r}; use 0 or 1")
    return env == "1"


def _pool_descriptors(k_pool, v_pool):
    """Host tensor descriptors of the pools as ``[pages * PS, D]`` rows with ``[PS, D]`` blocks, or None when
    the layout does not allow them (pages not contiguous rows, unaligned, too many rows for int32 coordinates)."""
    from ..tma import aligned, available

    if not available():
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    ps = k_pool.shape[1]
    for p in (k_pool, v_pool):
        if p.stride(0) != ps * p.stride(1) or not aligned(p) or p.shape[0] * ps >= 2 ** 31:
            return None
    return tuple(TensorDescriptor(p, [p.shape[0] * ps, p.shape[2]], [p.stride(1), 1], [ps, p.shape[2]])
                 for p in (k_pool, v_pool))


def pdl_default(device) -> bool:
    """Launch the split and merge kernels with programmatic dependent launch? ``DMS_DECODE_PDL`` (0 / 1), else
    ``PDL_DEFAULT`` where it can work: a CUDA device of compute capability >= 9 (Hopper), a Triton that has the
    grid-dependency intrinsics, not the CPU interpreter. Each kernel then starts while its predecessor in the stream
    drains and waits (``griddepcontrol.wait``) for that kernel's writes before it reads anything; see ``PDL_DEFAULT``."""
    env = os.environ.get("DMS_DECODE_PDL", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"DMS_DECODE_PDL={env!r}; use 0 or 1")
    if env == "1" and not _pdl_possible(device):
        raise ValueError(f"DMS_DECODE_PDL=1 {_PDL_NEEDS}; unset it")
    return _pdl_possible(device) and (PDL_DEFAULT if env == "" else env == "1")


_PDL_NEEDS = ("needs a CUDA device of compute capability >= 9 and a Triton with "
              "triton.language.extra.cuda.gdc_wait (not the interpreter)")


def _pdl_possible(device) -> bool:
    if device.type != "cuda" or _INTERPRET or gdc_wait is None:
        return False
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:  # asked on every decode call: once per device
    return torch.cuda.get_device_capability(index)[0] >= 9


def default_kernel() -> str:
    """``DMS_DECODE_KERNEL`` (split / flat), else ``split``."""
    k = os.environ.get("DMS_DECODE_KERNEL", "split")
    if k not in KERNELS:
        raise ValueError(f"DMS_DECODE_KERNEL={k!r}; choose one of {KERNELS}")
    return k


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_decode_attention(q, k_pool, v_pool, pos_pool, block_table, seq_len, scale: float, valid=None,
                           max_len: int | None = None, num_splits: int | None = None,
                           pages_per_split: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, kernel: str | None = None, flat_programs: int | None = None,
                           use_tma: bool | None = None, pdl: bool | None = None):
    """Decode attention over the paged store (Triton). Arguments as :func:`reference.paged_decode_attention_reference`.

    Args:
        q ``[B, H, D]``; max_len: an upper bound on ``seq_len`` known to the caller (avoids reading
        ``seq_len`` on the host); num_splits: sequence splits per stream (default: enough programs
        to fill the device twice over); pages_per_split: fixed split length in pages instead (overrides
        num_splits). The default uses short fixed splits (at most ``MAX_PAGES_PER_SPLIT`` pages, fewer
        when that would leave the device under-filled), so that streams of very different lengths
        (DMS heads keep different numbers of tokens) spread over many programs instead of the longest
        stream's few programs running alone at the end; empty splits of short streams exit at once.
        num_warps / num_stages: Triton launch options (defaults: ``DEFAULT_WARPS`` / :func:`split_stages` for the split
            kernel, ``DEFAULT_STAGES`` for the flat one).
        kernel: ``split`` or ``flat`` (module docstring; default :func:`default_kernel`); flat_programs: the
        flat grid (default ``FLAT_PROGRAMS_PER_SM`` x SMs); the split options above do not apply to it.
        use_tma: ``split`` kernel only: read pages through tensor descriptors (one bulk copy per page); None
            (default) follows :func:`decode_tma_default` where the pool layout allows, True insists (error if
            the layout does not allow), False never.
        pdl: ``split`` kernel only: programmatic dependent launch of the split and merge kernels (default
            :func:`pdl_default`; True where it cannot work is an error).
    Returns:
        ``[B, H, DV]`` in q.dtype.
    """
    B, H, D = q.shape
    N, maxb = block_table.shape
    if N % B:
        raise ValueError(f"block_table has {N} streams, not a multiple of the batch {B}")
    Hkv = N // B
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    if D not in _SUPPORTED_D or k_pool.shape[-1] != D:
        raise ValueError(f"head dim {D} (keys {k_pool.shape[-1]}) not supported; supported: {_SUPPORTED_D}")
    PS = k_pool.shape[1]
    if PS < 16 or PS & (PS - 1):
        raise ValueError(f"page size {PS} must be a power of two >= 16 (tl.dot tiles)")
    DV = v_pool.shape[-1]
    G = H // Hkv
    GP = max(16, triton.next_power_of_2(G))
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q, k_pool, v_pool need a contiguous last dimension")
    has_valid = valid is not None
    if not has_valid:
        valid = seq_len  # a placeholder pointer, never read (HAS_VALID=False)
    elif valid.dtype == torch.bool:
        valid = valid.to(torch.int8)
    kernel = default_kernel() if kernel is None else kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    ieee = q.dtype == torch.float32 or (_INTERPRET and q.dtype == torch.bfloat16)
    if num_warps is None:
        num_warps = DEFAULT_WARPS if PS * D >= 64 * 128 else 2
    if num_stages is None:
        num_stages = split_stages(N) if kernel == "split" else DEFAULT_STAGES
    if kernel == "flat":
        P = int(flat_programs) if flat_programs is not None else FLAT_PROGRAMS_PER_SM * _num_sms(q.device)
        if P < 1:
            raise ValueError(f"flat_programs must be >= 1; got {P}")
        op = _empty((P + N, GP, DV), torch.float32, q.device)
        lp = _empty((P + N, GP), torch.float32, q.device)
        out = _empty((B, H, DV), q.dtype, q.device)
        NP2 = max(2, triton.next_power_of_2(N))
        _decode_flat_kernel[(P,)](
            q, k_pool, v_pool, pos_pool, block_table, seq_len, op, lp, float(scale) * LOG2E, N, P,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
            block_table.stride(0), op.stride(0), lp.stride(0),
            HKV=Hkv, G=G, GP=GP, D=D, DV=DV, PS=PS, NP2=NP2, IEEE=ieee, V_MASK_POS=V_MASK_POS, num_warps=num_warps,
            num_stages=num_stages,
        )
        _merge_flat_kernel[(N, G)](
            op, lp, out, valid, seq_len, N, P, op.stride(0), lp.stride(0), out.stride(0), out.stride(1),
            HKV=Hkv, G=G, DV=DV, PS=PS, NP2=NP2, HAS_VALID=has_valid, num_warps=1,
        )
        return out
    if max_len is None:
        max_len = int(seq_len.max()) if N else 0
    max_pages = max(1, min(maxb, triton.cdiv(max(max_len, 1), PS)))
    if pages_per_split is not None:
        if pages_per_split < 1:
            raise ValueError(f"pages_per_split must be >= 1; got {pages_per_split}")
        pps = int(pages_per_split)
    else:
        if num_splits is None:
            # enough programs to fill the device several times over, but never splits longer than
            # MAX_PAGES_PER_SPLIT (the longest stream must not serialise on a few programs)
            want = max(1, triton.cdiv(SPLIT_PROGRAMS_PER_SM * _num_sms(q.device), N))
            pps = max(1, min(MAX_PAGES_PER_SPLIT, triton.cdiv(max_pages, want)))
        else:
            pps = triton.cdiv(max_pages, max(1, int(num_splits)))
    num_splits = triton.cdiv(max_pages, pps)
    op = _empty((N, num_splits, GP, DV), torch.float32, q.device)
    lp = _empty((N, num_splits, GP), torch.float32, q.device)
    out = _empty((B, H, DV), q.dtype, q.device)
    want_tma = decode_tma_default(q.device) if use_tma is None else bool(use_tma)
    tma = _pool_descriptors(k_pool, v_pool) if want_tma else None
    if use_tma and tma is None:
        raise ValueError("use_tma=True needs pools whose pages are contiguous [pages, PS, D] rows with 16-byte "
                         "aligned strides; pass use_tma=None to fall back to pointer loads")
    kp_arg, vp_arg = tma if tma is not None else (k_pool, v_pool)
    if pdl is None:
        can_pdl = pdl_default(q.device)
    elif pdl and not _pdl_possible(q.device):
        raise ValueError(f"pdl=True {_PDL_NEEDS}; pass pdl=None")
    else:
        can_pdl = bool(pdl)
    launch = dict(launch_pdl=True) if can_pdl else {}
    _decode_split_kernel[(N, num_splits)](
        q, kp_arg, vp_arg, pos_pool, block_table, seq_len, op, lp, float(scale) * LOG2E, pps,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        block_table.stride(0), op.stride(0), op.stride(1), lp.stride(0),
        HKV=Hkv, G=G, GP=GP, D=D, DV=DV, PS=PS, IEEE=ieee, V_MASK_POS=V_MASK_POS, USE_TMA=tma is not None,
        PDL=can_pdl, num_warps=num_warps, num_stages=num_stages, **launch,
    )
    _merge_kernel[(N, G)](
        op, lp, out, valid, seq_len, pps, num_splits, op.stride(0), op.stride(1), lp.stride(0), out.stride(0), out.stride(1),
        HKV=Hkv, G=G, GP=GP, DV=DV, SP=max(2, triton.next_power_of_2(num_splits)), PS=PS, HAS_VALID=has_valid,
        PDL=can_pdl, num_warps=1, **launch,
    )
    return out
