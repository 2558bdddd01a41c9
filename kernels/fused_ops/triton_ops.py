"""Triton kernels of the fused decode ops (semantics and rounding points: reference.py).

Everything is computed in fp32, with a round trip through the model dtype (``.to(bf16).to(fp32)``)
where transformers rounds (after each product of the rotary embedding, after SiLU, after the RMSNorm
normalisation). The GPU compiler does not keep every such rounding (on the H100, 25% of bf16 rope outputs
came out one unit off transformers', as a fused multiply-add would give), so results agree with the
unfused ops to one unit in the last place in bf16/fp16, and in fp32 to the reduction order. (Arithmetic
in bf16 itself is not an option: the CPU interpreter that CI runs gets bf16 arithmetic wrong.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Set by tests: outputs start as NaN so that an element a kernel fails to write fails the comparison.
POISON_OUTPUTS = False


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _new_like(t):
    out = torch.empty_like(t)  # keeps t's strides (q and k arrive as transposed views)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _has_tf32(device) -> bool:
    """TF32 tensor cores (Ampere and newer); the interpreter and older GPUs get exact fp32 ("ieee") products."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _rms_norm_kernel(X, W, Y, C, sx, sy, eps, BLOCK: tl.constexpr):
    # two passes over the row (statistics, then output); for C <= BLOCK each is one tile and the second
    # read of x comes from cache
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * sx
    y_ptr = Y + row * sy
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < C, other=0.0).to(tl.float32)
        acc += x * x
    r = tl.math.rsqrt(tl.sum(acc, 0) / C + eps)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < C
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        h = (x * r).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (w * h).to(Y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused :func:`reference.rms_norm_reference` over the last dim of ``x`` (any leading shape)."""
    C = x.shape[-1]
    if weight.shape != (C,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({C},)")
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = _new(x2.shape, out_dtype, x.device)
    if x2.shape[0]:
        blk = min(_pow2(C), 8192)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, C, x2.stride(0), y.stride(0), float(eps),
                                         BLOCK=blk, num_warps=8 if blk >= 4096 else 4)
    return y.view(*x.shape[:-1], C)


@triton.jit
def _rope_heads(X, XO, sx_h, so_h, c, s, d, partner, neg, dm, NH: tl.constexpr, BH: tl.constexpr):
    # x * cos + rotate_half(x) * sin for the NH heads of one (b, t); X / XO point at head 0 of that row
    h = tl.arange(0, BH)
    m = (h < NH)[:, None] & dm[None, :]
    base = X + h[:, None] * sx_h
    x = tl.load(base + d[None, :], mask=m, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=m, other=0.0).to(tl.float32)
    ps = (xp * s[None, :]).to(X.dtype.element_ty).to(tl.float32)
    out = (x * c[None, :]).to(X.dtype.element_ty).to(tl.float32) + tl.where(neg, -ps, ps)
    tl.store(XO + h[:, None] * so_h + d[None, :], out.to(XO.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, T, D,
                 sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, sjb, sjh, sjt, scb, sct, ssb, sst,
                 H: tl.constexpr, HKV: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BHK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)
    neg = (d < half)[None, :]
    c = tl.load(COS + b * scb + t * sct + d, mask=dm, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * ssb + t * sst + d, mask=dm, other=0.0).to(tl.float32)
    _rope_heads(Q + b * sqb + t * sqt, QO + b * sob + t * sot, sqh, soh, c, s, d, partner, neg, dm, H, BH)
    _rope_heads(K + b * skb + t * skt, KO + b * sjb + t * sjt, skh, sjh, c, s, d, partner, neg, dm, HKV, BHK)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Fused :func:`reference.rope_reference`: q ``[B, H, T, D]``, k ``[B, Hkv, T, D]`` (any strides with a
    unit last stride), cos/sin ``[B or 1, T, D]`` in the dtype of q. Returns new tensors laid out like q, k."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, T, D) or cos.shape[-2:] != (T, D) or sin.shape != cos.shape or D % 2:
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}: expected [B, H, T, D], [B, Hkv, T, D], [B, T, D] with even D")
    if q.dtype != k.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError(f"rope: dtypes q {q.dtype}, k {k.dtype}, cos {cos.dtype}, sin {sin.dtype} must match")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    cb = cos.stride(0) if cos.shape[0] == B else 0
    sb = sin.stride(0) if sin.shape[0] == B else 0
    qo, ko = _new_like(q), _new_like(k)
    if B * T:
        BD = _pow2(D)
        _rope_kernel[(B * T,)](q, k, cos, sin, qo, ko, T, D,
                               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                               qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
                               cb, cos.stride(-2), sb, sin.stride(-2),
                               H=H, HKV=Hkv, BD=BD, BH=_pow2(H), BHK=_pow2(Hkv), num_warps=4)
    return qo, ko


@triton.jit
def _silu_mul_kernel(G, U, O, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
    tl.store(O + offs, (a * u).to(O.dtype.element_ty), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused :func:`reference.silu_mul_reference` (same shapes and dtype)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    gate, up = gate.contiguous(), up.contiguous()
    out = _new_like(gate)
    n = gate.numel()
    if n:
        blk = 1024
        _silu_mul_kernel[(triton.cdiv(n, blk),)](gate, up, out, n, BLOCK=blk, num_warps=4)
    return out


@triton.jit
def _retention_head_kernel(X, NW, PW, PB, Z, C, sx, eps, NOUT, BLOCK: tl.constexpr):
    # One program per (row, output): z = rsqrt(mean(x^2) + eps) * sum(x * norm_w * proj_w[o]) + b[o], one
    # pass over the row (the scale factors out of the sum). At decode (8 rows x 8 KV heads) that is 64
    # programs; one program per row measured 15.6 us per layer on the H100 (8 programs, each reading all
    # of proj_w).
    row = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1)
    x_ptr = X + row * sx
    w_ptr = PW + o.to(tl.int64) * C
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < C
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        nw = tl.load(NW + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        sq += x * x
        dot += x * nw * w
    r = tl.math.rsqrt(tl.sum(sq, 0) / C + eps)
    tl.store(Z + row * NOUT + o, tl.sum(dot, 0) * r + tl.load(PB + o).to(tl.float32))


@triton.jit
def _retention_head_rows_kernel(X, NW, PW, PB, Z, R, C, sx, eps, NOUT,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NO_P2: tl.constexpr,
                                IN_PREC: tl.constexpr, SPLIT_W: tl.constexpr = False):
    # Many rows (prefill): BLOCK_R rows per program, x read once; z = r * ((x * norm_w) @ proj_w^T) + b, the
    # product in fp32 accuracy on the tensor cores, proj_w re-read per program from L2. Two forms:
    # * SPLIT_W (16-bit x): z = r * (x @ (norm_w * proj_w)^T) + b with x as it is (exact in its dtype) and the fp32
    #   weight product split into three parts of x's dtype (hi + mid + lo carry its 24 bits), so three 16-bit
    #   products accumulated in fp32 give fp32 accuracy and x never leaves its dtype on the way to the tensor cores;
    # * else: x upcast, scaled by norm_w, 3xTF32 products ("ieee" FMA products: 0.34 ms per 8K-token layer, H100).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    o = tl.arange(0, NO_P2)
    om = o < NOUT
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, NO_P2], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        cm = offs < C
        x = tl.load(X + rows.to(tl.int64)[:, None] * sx + offs[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        nw = tl.load(NW + offs, mask=cm, other=0.0).to(tl.float32)
        wt = tl.load(PW + o[None, :] * C + offs[:, None], mask=om[None, :] & cm[:, None], other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, 1)
        if SPLIT_W:
            w = wt * nw[:, None]
            hi = w.to(x.dtype)
            r1 = w - hi.to(tl.float32)
            mid = r1.to(x.dtype)
            lo = (r1 - mid.to(tl.float32)).to(x.dtype)
            # each chunk's products summed from zero by the tensor cores, the chunks added in fp32 registers: one
            # running tensor-core accumulator over all of C lost bits (H100: 8.2e-5 max error vs 2.7e-6 against
            # fp64 at 8K x 4096, same speed; docs/results/retention_head_s10.json)
            t = tl.dot(x, lo)
            t = tl.dot(x, mid, t)
            t = tl.dot(x, hi, t)
            acc += t
        else:
            acc = tl.dot(xf * nw[None, :], wt, acc, input_precision=IN_PREC)
    r = tl.math.rsqrt(sq / C + eps)
    bias = tl.load(PB + o, mask=om, other=0.0).to(tl.float32)
    z = acc * r[:, None] + bias[None, :]
    tl.store(Z + rows.to(tl.int64)[:, None] * NOUT + o[None, :], z, mask=rm[:, None] & om[None, :])


# Rows up to which one program per (row, output) is used (decode); above, blocks of rows (prefill).
HEAD_ROWS_PER_OUTPUT = 64


# Block rows / columns, warps and stages of the many-rows (prefill) retention-head kernel. H100, 8K rows x 4096 bf16,
# 8 outputs, CUDA-graph timed (session 10, docs/results/retention_head_s10.json): the split-weight form takes 38-39 us
# with these blocks (the read alone: 25 us), 50-57 us with the next settings; the upcast 3xTF32 form took 88 us at
# best (32 x 64, 4 stages) and 110-112 us with session 9's 64 x 64 blocks. (Session 9's sweep, results/
# retention_head_sweep.json, timed eager calls between CUDA events, host launch cost included.)
RETENTION_ROWS_CFG = dict(BLOCK_R=64, BLOCK_C=128, num_warps=4, num_stages=3)


def retention_head(x, norm_weight, proj_weight, proj_bias, eps: float, cfg: dict | None = None) -> torch.Tensor:
    """Fused :func:`reference.retention_head_reference`: x ``[..., C]`` -> fp32 ``[..., n_out]``.

    cfg: launch configuration of the many-rows kernel (keys of ``RETENTION_ROWS_CFG``, and ``split_w`` to force the
    split-weight form on or off; a benchmark hook). By default 16-bit x takes the split-weight form, fp32 x the
    3xTF32 one."""
    C = x.shape[-1]
    n_out = proj_weight.shape[0]
    if proj_weight.shape != (n_out, C) or norm_weight.shape != (C,) or proj_bias.shape != (n_out,):
        raise ValueError(f"retention_head: x [..., {C}], norm {tuple(norm_weight.shape)}, proj "
                         f"{tuple(proj_weight.shape)}, bias {tuple(proj_bias.shape)} do not fit")
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pw, nw, pb = proj_weight.contiguous(), norm_weight.contiguous(), proj_bias.contiguous()
    z = _new((x2.shape[0], n_out), torch.float32, x.device)
    R = x2.shape[0]
    if 0 < R <= HEAD_ROWS_PER_OUTPUT:
        blk = max(16, min(_pow2(C), 1024))
        _retention_head_kernel[(R, n_out)](x2, nw, pw, pb, z, C, x2.stride(0), float(eps), n_out,
                                           BLOCK=blk, num_warps=4)
    elif R:
        c = dict(RETENTION_ROWS_CFG, **(cfg or {}))
        split = c.pop("split_w", None)
        if split is None:  # 16-bit x; not bf16 under the CPU interpreter, whose bf16 tl.dot is wrong
            split = x2.dtype == torch.float16 or (x2.dtype == torch.bfloat16 and not _INTERPRET)
        _retention_head_rows_kernel[(triton.cdiv(R, c["BLOCK_R"]),)](
            x2, nw, pw, pb, z, R, C, x2.stride(0), float(eps), n_out, BLOCK_R=c["BLOCK_R"], BLOCK_C=c["BLOCK_C"],
            NO_P2=max(16, _pow2(n_out)), IN_PREC="tf32x3" if _has_tf32(x.device) else "ieee", SPLIT_W=bool(split),
            num_warps=c["num_warps"], num_stages=c["num_stages"])
    return z.view(*x.shape[:-1], n_out)


# --- skinny products of the decode step (a few rows against a whole weight matrix) ---------------------------
# At decode the projections are [rows <= 16, K] x [N, K]^T: bandwidth-bound reads of the weights. These kernels
# read each weight once with a grid over N only (no split-K reduction pass) and fuse what transformers does in
# separate launches: q/k/v of one input in one launch, gate and up with SiLU(gate) * up in the epilogue.

@triton.jit
def _linear_tile(x_ptr, w_ptr, M, K, sxm, n0, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, IN_PREC: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    nm = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        km = rk < K
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=IN_PREC)
    return acc


@triton.jit
def _grouped_linear_kernel(X, W0, W1, W2, B0, B1, B2, Y0, Y1, Y2, RES, M, K, N0, N1, N2, P0, P1, sxm, srm,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, IN_PREC: tl.constexpr, HAS_RES: tl.constexpr = False):
    # Programs [0, P0) compute Y0 = X W0^T, [P0, P0 + P1) Y1, the rest Y2 (up to three weights, one launch).
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    if pid < P0:
        w_ptr, b_ptr, y_ptr, N, n0 = W0, B0, Y0, N0, pid * BLOCK_N
    elif pid < P0 + P1:
        w_ptr, b_ptr, y_ptr, N, n0 = W1, B1, Y1, N1, (pid - P0) * BLOCK_N
    else:
        w_ptr, b_ptr, y_ptr, N, n0 = W2, B2, Y2, N2, (pid - P0 - P1) * BLOCK_N
    acc = _linear_tile(X, w_ptr, M, K, sxm, n0, N, BLOCK_M, BLOCK_N, BLOCK_K, IN_PREC)
    rn = n0 + tl.arange(0, BLOCK_N)
    nm = rn < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        # residual + linear(x), each rounded where transformers rounds (the product, then the sum); one weight only
        r = tl.load(RES + rm[:, None] * srm + rn[None, :], mask=(rm < M)[:, None] & nm[None, :], other=0.0)
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + r.to(tl.float32)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & nm[None, :])


@triton.jit
def _gate_up_silu_kernel(X, WG, WU, BG, BU, Y, M, K, N, sxm, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IN_PREC: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    g = _linear_tile(X, WG, M, K, sxm, n0, N, BLOCK_M, BLOCK_N, BLOCK_K, IN_PREC)
    u = _linear_tile(X, WU, M, K, sxm, n0, N, BLOCK_M, BLOCK_N, BLOCK_K, IN_PREC)
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    nm = rn < N
    if HAS_BIAS:
        g += tl.load(BG + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        u += tl.load(BU + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    # rounded where transformers rounds: each projection, then SiLU, then the product (see silu_mul)
    g = g.to(Y.dtype.element_ty).to(tl.float32)
    u = u.to(Y.dtype.element_ty).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rm[:, None] * N + rn[None, :], (a * u).to(Y.dtype.element_ty), mask=(rm < M)[:, None] & nm[None, :])


SKINNY_MAX_ROWS = 16  # rows handled in one tile (tl.dot's smallest M); callers use F.linear above this


def _skinny_cfg(x, n_total, two_weights: bool = False):
    """(BLOCK_N, BLOCK_K, warps, stages, input precision): enough programs to cover the SMs, one tile of rows.

    One weight per tile (:func:`grouped_linear`): K tiles of 256, and 2 warps for 16-wide tiles. H100, 8 rows, weights
    read from DRAM (``scripts/bench_skinny_gemm.py --sweep``, docs/results/skinny_gemm.json), before -> after:
    down_proj 50.3 -> 44.6 us, q/k/v 21.6 -> 20.2 us, o_proj 16.1 -> 15.1 us. Two weights per tile
    (:func:`gate_up_silu`, 0.93 of copy bandwidth) keep K tiles of 128: no config of the sweep beats it by 2%."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    bn = 64
    while bn > 16 and triton.cdiv(n_total, bn) < 2 * sms:
        bn //= 2
    prec = "tf32" if x.dtype != torch.float32 else "ieee"  # half inputs: the mode is unused
    stages = 4 if x.is_cuda else 1
    if two_weights:
        return bn, 128, 4, stages, prec
    return bn, 256, (2 if bn == 16 else 4), stages, prec


def _rows(x):
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] > SKINNY_MAX_ROWS:
        raise ValueError(f"skinny kernels take at most {SKINNY_MAX_ROWS} rows; got {x2.shape[0]} (use F.linear)")
    return x2, K


def grouped_linear(x, weights, biases=None, residual=None, cfg=None):
    """``[x @ w.T + b for w, b in zip(weights, biases)]`` for 1-3 weights ``[N_i, K]`` in one launch (x: at most
    ``SKINNY_MAX_ROWS`` rows, same dtype as the weights). Outputs ``[..., N_i]`` like ``F.linear``.

    ``residual`` (one weight only): ``[..., N]`` added in the epilogue, after the product is rounded to x.dtype
    (transformers' ``residual + proj(x)``). ``cfg``: (BLOCK_N, BLOCK_K, warps, stages) instead of
    :func:`_skinny_cfg` (scripts/bench_skinny_gemm.py sweeps it)."""
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"grouped_linear takes 1 to 3 weights; got {len(weights)}")
    x2, K = _rows(x)
    if any(w.shape[1] != K or w.dtype != x.dtype or not w.is_contiguous() for w in weights):
        raise ValueError(f"weights must be contiguous [N, {K}] in {x.dtype}; got "
                         f"{[(tuple(w.shape), w.dtype) for w in weights]}")
    has_bias = biases is not None and any(b is not None for b in biases)
    if has_bias and any(b is None for b in biases):
        raise ValueError("grouped_linear: give a bias for every weight or for none")
    M = x2.shape[0]
    r2 = x2  # placeholder pointer when there is no residual
    if residual is not None:
        N = weights[0].shape[0]
        if len(weights) != 1 or residual.shape[-1] != N or residual.shape[:-1].numel() != M \
                or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not fit one weight's output "
                             f"rows {M} x {N} in {x.dtype}")
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    ws = list(weights) + [weights[0]] * (3 - len(weights))
    bs = (list(biases) + [biases[0]] * (3 - len(biases))) if has_bias else ws
    ys = [_new((M, w.shape[0]), x.dtype, x.device) for w in weights]
    ys_full = ys + [ys[0]] * (3 - len(ys))
    Ns = [w.shape[0] for w in ws]
    Ns = Ns[:len(weights)] + [0] * (3 - len(weights))
    bn, bk, nw, st, prec = _skinny_cfg(x2, sum(Ns))
    if cfg is not None:
        bn, bk, nw, st = cfg
    P = [triton.cdiv(n, bn) for n in Ns]
    if M:
        _grouped_linear_kernel[(sum(P),)](x2, *ws, *bs, *ys_full, r2, M, K, max(Ns[0], 1), max(Ns[1], 1), max(Ns[2], 1),
                                          P[0], P[1], x2.stride(0), r2.stride(0), HAS_BIAS=has_bias,
                                          BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk, IN_PREC=prec,
                                          HAS_RES=residual is not None, num_warps=nw, num_stages=st)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def linear_residual(x, weight, residual, bias=None, cfg=None):
    """``residual + F.linear(x, weight, bias)`` in one launch (:func:`grouped_linear` with one weight and a
    residual); shaped like ``residual``."""
    y, = grouped_linear(x, [weight], None if bias is None else [bias], residual=residual, cfg=cfg)
    return y.view(residual.shape)


def gate_up_silu(x, w_gate, w_up, b_gate=None, b_up=None, cfg=None):
    """``silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)`` in one launch (x: at most ``SKINNY_MAX_ROWS`` rows;
    ``cfg`` as in :func:`grouped_linear`)."""
    x2, K = _rows(x)
    N = w_gate.shape[0]
    if w_up.shape != (N, K) or w_gate.shape != (N, K) or w_gate.dtype != x.dtype or w_up.dtype != x.dtype \
            or not (w_gate.is_contiguous() and w_up.is_contiguous()):
        raise ValueError(f"gate/up weights must be contiguous [N, {K}] in {x.dtype}; got {tuple(w_gate.shape)} "
                         f"{w_gate.dtype}, {tuple(w_up.shape)} {w_up.dtype}")
    has_bias = b_gate is not None
    M = x2.shape[0]
    y = _new((M, N), x.dtype, x.device)
    bn, bk, nw, st, prec = _skinny_cfg(x2, N, two_weights=True)
    if cfg is not None:
        bn, bk, nw, st = cfg
    if M:
        _gate_up_silu_kernel[(triton.cdiv(N, bn),)](x2, w_gate, w_up, b_gate if has_bias else w_gate,
                                                   b_up if has_bias else w_up, y, M, K, N, x2.stride(0),
                                                   HAS_BIAS=has_bias, BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=bn,
                                                   BLOCK_K=bk, IN_PREC=prec, num_warps=nw, num_stages=st)
    return y.view(*x.shape[:-1], N)
