"""Fused Triton DMS training attention vs the fp32 reference (output, lse and all four gradients).

CPU (CI): runs the Triton kernels under ``TRITON_INTERPRET=1`` at small sizes.
GPU: the same tests run on CUDA without the interpreter, plus larger shapes.

Tolerances (relative Frobenius error ``|x - ref| / |ref|``, and max-abs error over ``max|ref|``),
against the reference evaluated in fp32 on the same (upcast) inputs:
  fp32 inputs: 1e-5 / 1e-4   (products in exact fp32; measured <= 1.6e-6 on CPU and H100)
  fp16 inputs: 2e-3 / 2e-2   (P and dS are rounded to fp16 before the second matmuls; measured <= 3.8e-4)
  bf16 inputs: 1e-2 / 6e-2   (same, with bf16's 8-bit mantissa; measured <= 2.8e-3 on H100)
Outputs are poisoned with NaN before every kernel call (``triton_fwd.POISON_OUTPUTS``), so an
unwritten element fails; no tensor may hold NaN.
"""
from __future__ import annotations


import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 on CPU first

import dms_kernels.train_attention as ta  # noqa: E402

from dms_kernels.train_attention import triton_bwd, triton_fwd  # noqa: E402
from dms_kernels.train_attention.reference import dms_attention_reference, hard_log_keep  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-2), torch.bfloat16: (1e-2, 6e-2)}


@pytest.fixture(autouse=True)
def _poison():
    old = triton_fwd.POISON_OUTPUTS
    triton_fwd.POISON_OUTPUTS = True
    yield
    triton_fwd.POISON_OUTPUTS = old
    triton_fwd.FWD_CONFIG_OVERRIDE = None
    triton_bwd.BWD_CONFIG_OVERRIDE = None


def _docs(B, T, n_docs, gen):
    """Uneven contiguous documents: ``[B, T]`` int64 ids (each row its own cut points)."""
    d = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        cuts = torch.randint(1, max(T, 2), (n_docs - 1,), generator=gen).tolist()
        for c in cuts:
            d[b, c:] += 1
    return d.to(DEV)


def _inputs(B, H, hkv, T, D, dtype, seed, p_evict=0.2, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # [B, T, H, D] storage viewed as [B, H, T, D] (non-contiguous)
        q = torch.randn(B, T, H, D, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(B, H, T, D, generator=gen)
    k = torch.randn(B, hkv, T, D, generator=gen)
    v = torch.randn(B, hkv, T, D, generator=gen)
    lk = torch.log(torch.rand(B, hkv, T, generator=gen)).clamp(min=-8.0)
    lk[torch.rand(B, hkv, T, generator=gen) < p_evict] = float("-inf")
    q, k, v = (x.to(DEV, dtype).requires_grad_(True) for x in (q, k, v))
    return q, k, v, lk.to(DEV).requires_grad_(True), gen


def _check(name, x, ref, dtype):
    rel, mx = TOL[dtype]
    assert not torch.isnan(x).any(), f"{name}: NaN (unwritten or invalid element)"
    x, ref = x.double(), ref.double()
    scale_n, scale_m = ref.norm().item(), ref.abs().max().item()
    err_n, err_m = (x - ref).norm().item(), (x - ref).abs().max().item()
    if scale_n == 0:  # e.g. d log_keep with window >= T is exactly 0
        assert err_m <= 1e-6, f"{name}: expected 0, max err {err_m:.3e}"
        return err_n
    assert err_n <= rel * scale_n, f"{name}: rel err {err_n / scale_n:.3e} > {rel:.1e}"
    assert err_m <= mx * scale_m, f"{name}: max err {err_m / scale_m:.3e} of max|ref| > {mx:.1e}"
    return err_n / scale_n


def _compare(B, H, hkv, T, D, window, n_docs, dtype, seed, transposed=False, p_evict=0.2):
    q, k, v, lk, gen = _inputs(B, H, hkv, T, D, dtype, seed, p_evict, transposed)
    doc = _docs(B, T, n_docs, gen) if n_docs else None
    o, lse = ta.dms_attention(q, k, v, lk, window, doc)
    go = torch.randn(o.shape, generator=gen).to(DEV, dtype)
    gl = torch.randn(lse.shape, generator=gen).to(DEV)
    grads = torch.autograd.grad((o.float() * go.float()).sum() + (lse * gl).sum(), (q, k, v, lk))
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    lkf = lk.detach().clone().requires_grad_(True)
    o2, lse2 = dms_attention_reference(qf, kf, vf, lkf, window, doc)
    grads2 = torch.autograd.grad((o2 * go.float()).sum() + (lse2 * gl).sum(), (qf, kf, vf, lkf))
    errs = {}
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv", "dlog_keep"), (o, lse) + grads, (o2, lse2) + grads2):
        errs[name] = _check(name, a, b, dtype)
    print(f"\n[B={B} H={H} Hkv={hkv} T={T} D={D} W={window} docs={n_docs} {dtype}] "
          + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    return o, grads


# (B, H, Hkv, T, D, window, n_docs): odd sizes, GQA groups 1/4/8, windows 0 / 16 / >= T, uneven docs.
CPU_CASES = [
    (1, 2, 2, 1, 16, 0, 0),
    (1, 4, 1, 63, 32, 16, 0),
    (1, 8, 1, 63, 16, 0, 0),
    (2, 2, 2, 63, 16, 63, 3),
    (1, 4, 2, 130, 16, 16, 4),
    (1, 2, 1, 130, 64, 5, 0),
    (1, 2, 2, 500, 16, 16, 3),
    (1, 1, 1, 1000, 16, 300, 2),
]
GPU_CASES = [
    (2, 8, 2, 1000, 128, 16, 5),
    (1, 32, 4, 1000, 128, 256, 0),
    (2, 8, 1, 1000, 64, 0, 3),
    (1, 4, 4, 777, 256, 1000, 0),
    (1, 16, 2, 2048, 128, 256, 4),
]


@pytest.mark.parametrize("case", CPU_CASES + (GPU_CASES if CUDA else []), ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_fp32(case):
    _compare(*case, dtype=torch.float32, seed=hash(case) % 1000)


LOWP = [(1, 4, 2, 63, 32, 16, 2)]
if CUDA:
    LOWP += [(2, 16, 4, 1000, 128, 256, 3), (1, 8, 8, 500, 64, 0, 0), (1, 8, 2, 600, 256, 64, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOWP, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_low_precision(case, dtype):
    if dtype == torch.bfloat16 and not CUDA:
        # Seen with triton 3.9's interpreter: a plain 16x16 bf16 tl.dot returns values ~1e10 (fp16 is right).
        pytest.skip("the Triton CPU interpreter miscomputes bf16 tl.dot; bf16 is tested on GPU")
    _compare(*case, dtype=dtype, seed=7)


def test_noncontiguous_inputs():
    _compare(1, 4, 2, 40, 16, 8, 2, torch.float32, seed=3, transposed=True)


@pytest.mark.parametrize("cfg", ["square", "wide"])
def test_other_block_shapes(cfg):
    """Tile classification must hold for BLOCK_M == BLOCK_N and BLOCK_M = 4 BLOCK_N too."""
    if cfg == "square":
        triton_fwd.FWD_CONFIG_OVERRIDE = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        triton_bwd.BWD_CONFIG_OVERRIDE = {"dkdv": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
                                          "dq": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)}
    else:
        triton_fwd.FWD_CONFIG_OVERRIDE = dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1)
        triton_bwd.BWD_CONFIG_OVERRIDE = {"dkdv": dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1),
                                          "dq": dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1)}
    _compare(1, 2, 1, 150, 16, 20, 3, torch.float32, seed=11)


@pytest.mark.parametrize("bias_mma,dkdv_mma", [("0", "0"), ("1", "0"), ("1", "1")])
def test_far_tile_bias_paths(bias_mma, dkdv_mma, monkeypatch):
    """FAR tiles add log_keep through a K=16 matmul (default) or elementwise (DMS_ATTN_BIAS_MMA=0); the dK/dV
    kernel's FAR tiles do it by a matmul only with DMS_ATTN_DKDV_BIAS_MMA=1 (off by default, untimed)."""
    monkeypatch.setenv("DMS_ATTN_BIAS_MMA", bias_mma)
    monkeypatch.setenv("DMS_ATTN_DKDV_BIAS_MMA", dkdv_mma)
    assert triton_bwd.dkdv_bias_mma_enabled() == (bias_mma == dkdv_mma == "1")
    _compare(1, 4, 2, 100, 16, 7, 2, torch.float16, seed=31)
    if dkdv_mma == "1":  # several key blocks, GQA 4, log_keep with -inf entries and documents, fp32 products
        _compare(1, 8, 2, 131, 16, 5, 3, torch.float32, seed=37)


@pytest.mark.parametrize("case", [(1, 4, 2, 63, 32, 16, 2, False), (1, 8, 2, 131, 16, 5, 3, True),
                                  (2, 2, 2, 40, 16, 40, 0, False)], ids=lambda c: "-".join(map(str, c)))
def test_tensor_descriptor_loads(case, monkeypatch):
    """DMS_ATTN_TMA=1: every kernel reads its tiles through tensor descriptors (the GPU default for the backward on
    sm90+); rows past T read as zero there. Same results as the reference, incl. odd T, documents, a transposed q
    and the gathered hard-mask forward."""
    *shape, transposed = case
    monkeypatch.setenv("DMS_ATTN_TMA", "1")
    seen = []
    for mod in (triton_fwd, triton_bwd):
        real = mod.use_tma
        monkeypatch.setattr(mod, "use_tma", lambda *a, _r=real: seen.append(_r(*a)) or seen[-1])
    _compare(*shape, dtype=torch.float32, seed=41, transposed=transposed)
    assert seen and all(seen), f"descriptor loads not used by every launch: {seen}"
    B, H, hkv, T, D, W, _ = shape
    q, k, v, _, gen = _inputs(B, H, hkv, T, D, torch.float32, seed=43)
    evict = torch.rand(B, hkv, T, generator=gen).to(DEV) < 0.5
    q, k, v = (x.detach() for x in (q, k, v))
    ref_o, _ = dms_attention_reference(q, k, v, hard_log_keep(evict), W)
    _check("o (hard, gathered)", ta.dms_attention_hard(q, k, v, evict, W)[0], ref_o, torch.float32)


@pytest.mark.parametrize("tile", ["1", "0"])
def test_dlk_tile_accumulator(tile, monkeypatch):
    """d log_keep summed into a tile-shaped accumulator reduced once per program (default) or reduced per query
    tile (DMS_ATTN_DLK_TILE=0); same gradients, incl. documents, GQA 4, -inf log_keep and window-edge tiles."""
    monkeypatch.setenv("DMS_ATTN_DLK_TILE", tile)
    assert triton_bwd.dlk_tile_enabled() == (tile == "1")
    _compare(1, 8, 2, 131, 16, 5, 3, torch.float32, seed=47)


def test_tensor_descriptor_mode_parsing(monkeypatch):
    from dms_kernels import tma

    x = torch.zeros(1, 2, 8, 16, device=DEV, dtype=torch.float16)
    monkeypatch.setenv("DMS_ATTN_TMA", "0")
    assert not tma.use_tma(x)
    monkeypatch.setenv("DMS_ATTN_TMA", "1")
    assert tma.use_tma(x)
    assert not tma.use_tma(torch.zeros(1, 2, 8, 18, device=DEV)[..., :16])  # rows 72 bytes apart: not 16-aligned
    monkeypatch.setenv("DMS_ATTN_TMA", "yes")
    with pytest.raises(ValueError, match="DMS_ATTN_TMA"):
        tma.use_tma(x)


def test_tensor_descriptor_allocator_installed_only_where_missing():
    """Device-side descriptors need a Triton allocator: ensure_allocator installs a torch-backed one in a context
    that has none (e.g. autograd's backward thread) and leaves a user's own allocator alone."""
    import contextvars

    from triton.runtime._allocation import NullAllocator, _allocator

    from dms_kernels import tma

    def run():
        _allocator.set(NullAllocator())
        tma.ensure_allocator()
        mine = _allocator.get()
        assert not isinstance(mine, NullAllocator) and mine(64, 16, None).numel() == 64

        def users(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        _allocator.set(users)
        tma.ensure_allocator()
        assert _allocator.get() is users

    contextvars.copy_context().run(run)  # the test's own context keeps whatever it had


@pytest.mark.parametrize("D", [8, 24, 80])
def test_odd_head_dims_run_zero_padded(D):
    """Head dims outside 16/32/64/128/256 run zero-padded to the next one (8 -> 16, 24 -> 32, 80 -> 128): output,
    lse and all four gradients equal the reference at the true D (scale D^-0.5), and the hard forward too."""
    assert ta.padded_head_dim(D) > D and ta.unsupported_reason(torch.zeros(1, 1, 1, D), None) is None
    _compare(1, 4, 2, 37, D, 5, 2, torch.float32, seed=53 + D)
    _compare(1, 2, 1, 20, D, 3, 0, torch.float32, seed=59 + D, transposed=True)
    q, k, v, _, gen = _inputs(1, 4, 2, 37, D, torch.float32, seed=61)
    evict = torch.rand(1, 2, 37, generator=gen).to(DEV) < 0.5
    q, k, v = (x.detach() for x in (q, k, v))
    ref_o, ref_lse = dms_attention_reference(q, k, v, hard_log_keep(evict), 5)
    o, lse = ta.dms_attention_hard(q, k, v, evict, 5)
    assert o.shape == q.shape
    _check("o (hard, padded)", o, ref_o, torch.float32)
    _check("lse (hard, padded)", lse, ref_lse, torch.float32)


def test_all_evicted_no_nan():
    """log_keep = -inf everywhere, window 0: each query sees only itself, so o = v (per group)."""
    B, H, hkv, T, D = 1, 4, 2, 37, 16
    q, k, v, lk, _ = _inputs(B, H, hkv, T, D, torch.float32, seed=5, p_evict=1.0)
    assert torch.isinf(lk).all()
    o, lse = ta.dms_attention(q, k, v, lk, 0)
    torch.testing.assert_close(o, v.detach().repeat_interleave(H // hkv, 1), rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(o.sum() + lse.sum(), (q, k, v, lk))
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[3] == 0).all()


def test_no_dms_term_is_causal_attention():
    """The benchmark baseline (_has_dms=False) ignores log_keep: equals the reference with log_keep = 0."""
    q, k, v, lk, _ = _inputs(1, 4, 2, 70, 16, torch.float32, seed=9)
    o, lse = ta.dms_attention(q, k, v, lk, 4, _has_dms=False)
    o2, lse2 = dms_attention_reference(q.detach(), k.detach(), v.detach(), torch.zeros_like(lk), 4)
    _check("o", o.detach(), o2, torch.float32)
    _check("lse", lse.detach(), lse2, torch.float32)


def test_hard_mask_forward():
    q, k, v, _, gen = _inputs(2, 4, 2, 90, 32, torch.float32, seed=13)
    evict = torch.rand(2, 2, 90, generator=gen).to(DEV) < 0.5
    doc = _docs(2, 90, 3, gen)
    o, lse = ta.dms_attention_hard(q, k, v, evict, 8, doc)
    o2, lse2 = dms_attention_reference(q.detach(), k.detach(), v.detach(), hard_log_keep(evict), 8, doc)
    assert not o.requires_grad
    _check("o", o, o2, torch.float32)
    _check("lse", lse, lse2, torch.float32)
    o3, _ = ta.dms_attention_hard(q, k, v, hard_log_keep(evict), 8, doc)
    assert torch.equal(o, o3)


def test_hard_mask_forward_reads_transposed_projections():
    """transformers hands q/k/v over as transposed [B, T, H, D] views: the forward-only kernel reads them in
    place and writes o with q's strides (so o.transpose(1, 2) reshapes to [B, T, H * D] without a copy)."""
    q, k, v, _, gen = _inputs(2, 4, 2, 37, 16, torch.float32, seed=21)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    evict = torch.rand(2, 2, 37, generator=gen).to(DEV) < 0.4
    o, lse = ta.dms_attention_hard(qt, kt, vt, evict, 5)
    o2, lse2 = dms_attention_reference(q.detach(), k.detach(), v.detach(), hard_log_keep(evict), 5)
    assert o.stride() == qt.stride() and o.transpose(1, 2).is_contiguous()
    _check("o", o, o2, torch.float32)
    _check("lse", lse, lse2, torch.float32)


# (B, H, Hkv, T, D, window, p_evict): odd sizes, GQA 1/4/8, windows 0 / 16 / >= T, nothing / most evicted
HARD_CASES = [(1, 4, 4, 1, 16, 0, 0.5), (2, 8, 2, 63, 16, 0, 0.3), (1, 8, 1, 100, 32, 16, 0.9),
              (2, 4, 2, 77, 16, 5, 0.0), (1, 4, 1, 45, 16, 64, 0.5), (1, 4, 2, 130, 16, 3, 1.0)]
GPU_HARD_CASES = [(1, 32, 8, 1000, 128, 256, 0.6), (2, 8, 8, 500, 64, 16, 0.1), (1, 16, 2, 2049, 128, 100, 0.875)]


# bf16 on the GPU only: the CPU interpreter's bf16 tl.dot is wrong (decode_attention/triton_decode.py)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
@pytest.mark.parametrize("case", HARD_CASES + (GPU_HARD_CASES if CUDA else []), ids=lambda c: "-".join(map(str, c)))
def test_hard_mask_gathered_far_region(case, dtype, monkeypatch):
    """Hard masks without documents: FAR tiles run over the compacted kept keys (gather_kept); equal to the
    reference and to the bias-product path (DMS_ATTN_GATHER=0)."""
    B, H, hkv, T, D, W, p = case
    q, k, v, _, gen = _inputs(B, H, hkv, T, D, dtype, seed=31 + T)
    evict = torch.rand(B, hkv, T, generator=gen).to(DEV) < p
    q, k, v = (x.detach() for x in (q, k, v))
    ref_o, ref_lse = dms_attention_reference(q.float(), k.float(), v.float(), hard_log_keep(evict), W)
    calls = []
    real = triton_fwd.compact_kept
    monkeypatch.setattr(triton_fwd, "compact_kept", lambda *a: calls.append(1) or real(*a))
    o, lse = ta.dms_attention_hard(q, k, v, evict, W)
    assert calls, "the gathered path was not taken"
    _check("o", o, ref_o, dtype)
    _check("lse", lse, ref_lse, dtype)
    monkeypatch.setenv("DMS_ATTN_COMPACT", "0")  # the PyTorch compaction: same result
    o1, lse1 = ta.dms_attention_hard(q, k, v, evict, W)
    assert len(calls) == 1
    torch.testing.assert_close(o1, o, atol=0, rtol=0)
    monkeypatch.setenv("DMS_ATTN_GATHER", "0")
    o2, lse2 = ta.dms_attention_hard(q, k, v, evict, W)
    assert len(calls) == 1
    _check("o (bias path)", o2, ref_o, dtype)
    torch.testing.assert_close(lse, lse2, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_compact_kept_matches_gather_kept(transposed):
    """The Triton compaction == the PyTorch one on the kept rows, zeros after them (odd T, an all-evicted and an
    all-kept stream, keys as a transposed [B, T, Hkv, D] projection)."""
    g = torch.Generator().manual_seed(5)
    B, hkv, T, D = 2, 3, 77, 32
    k = torch.randn(B, T, hkv, D, generator=g) if transposed else torch.randn(B, hkv, T, D, generator=g)
    k = (k.transpose(1, 2) if transposed else k).to(DEV)
    v = k * 3 - 1
    lk = torch.where(torch.rand(B, hkv, T, generator=g) < 0.3, float("-inf"), 0.0).to(DEV)
    lk[0, 1] = float("-inf")
    lk[1, 2] = 0.0
    kc, vc, cum = triton_fwd.compact_kept(k, v, lk)
    kr, vr, cr = triton_fwd.gather_kept(k, v, lk)
    assert torch.equal(cum, cr)
    for b in range(B):
        for h in range(hkv):
            c = int(cum[b, h, -1])
            assert torch.equal(kc[b, h, :c], kr[b, h, :c]) and torch.equal(vc[b, h, :c], vr[b, h, :c])
            assert not kc[b, h, c:].any() and not vc[b, h, c:].any()


def test_gather_kept_layout():
    lk = torch.zeros(1, 2, 6, device=DEV)
    lk[0, 0, [1, 4]] = float("-inf")
    lk[0, 1, :] = float("-inf")
    k = torch.arange(12, dtype=torch.float32, device=DEV).view(1, 2, 6, 1).expand(1, 2, 6, 16).contiguous()
    kc, vc, cum = triton_fwd.gather_kept(k, k * 2, lk)
    assert cum.tolist() == [[[0, 1, 1, 2, 3, 3, 4], [0] * 7]]
    assert kc[0, 0, :4, 0].tolist() == [0.0, 2.0, 3.0, 5.0] and torch.equal(vc[0, 0, :4], 2 * kc[0, 0, :4])


def test_hard_mask_tile_flags(monkeypatch):
    """DMS_ATTN_TILE_FLAGS=1: far key tiles without an evicted key skip the bias product; same result."""
    monkeypatch.setenv("DMS_ATTN_TILE_FLAGS", "1")
    monkeypatch.setenv("DMS_ATTN_GATHER", "0")  # flags belong to the bias-product path
    q, k, v, _, gen = _inputs(1, 4, 2, 150, 16, torch.float32, seed=23)
    evict = torch.zeros(1, 2, 150, dtype=torch.bool, device=DEV)
    evict[:, 0, 40:60] = True  # head 0: evictions in a few tiles only; head 1: one key
    evict[:, 1, 3] = True
    flags = triton_fwd.hard_tile_flags(hard_log_keep(evict), 16)
    assert flags.shape == (1, 2, 10) and int(flags.sum()) == 3  # tiles 2, 3 of head 0; tile 0 of head 1
    o, lse = ta.dms_attention_hard(q, k, v, evict, 5)
    o2, lse2 = dms_attention_reference(q.detach(), k.detach(), v.detach(), hard_log_keep(evict), 5)
    _check("o", o, o2, torch.float32)
    _check("lse", lse, lse2, torch.float32)
    # the flags are really read: claiming every tile all-kept drops head 0's far evictions
    monkeypatch.setattr(triton_fwd, "hard_tile_flags", lambda lk, bn: torch.zeros_like(flags))
    o3, _ = ta.dms_attention_hard(q, k, v, evict, 5)
    assert not torch.allclose(o3[:, :2], o2[:, :2], atol=1e-3)


def test_backward_deterministic():
    q, k, v, lk, gen = _inputs(1, 8, 2, 200 if CUDA else 50, 32, torch.bfloat16 if CUDA else torch.float32, seed=17)
    outs = []
    for _ in range(2):
        o, lse = ta.dms_attention(q, k, v, lk, 8)
        outs.append(torch.autograd.grad(o.float().sum() + lse.sum(), (q, k, v, lk)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_poison_is_active():
    x = triton_fwd._empty((3,), torch.float32, DEV)
    assert torch.isnan(x).all()


def test_validation_errors():
    q, k, v, lk, _ = _inputs(1, 4, 2, 8, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        k3 = torch.randn(1, 3, 8, 16, device=DEV)
        ta.dms_attention(q, k3, k3, torch.zeros(1, 3, 8, device=DEV), 4)
    with pytest.raises(ValueError, match="log_keep"):
        ta.dms_attention(q, k, v, lk[:, :, :4], 4)
    with pytest.raises(ValueError, match="window"):
        ta.dms_attention(q, k, v, lk, -1)
    with pytest.raises(ValueError, match="head dim D=320"):
        big = torch.randn(1, 2, 8, 320, device=DEV)
        ta.dms_attention(big, big[:, :1], big[:, :1], lk[:, :1], 4)
    with pytest.raises(ValueError, match="dtype"):
        ta.dms_attention(q, k.double(), v, lk, 4)


def test_flex_matches_reference():
    """FlexAttention path: forward on CPU (eager flex has no CPU backward), forward + grads on GPU."""
    B, H, hkv, T, D, W = (2, 8, 2, 300, 64, 16) if CUDA else (1, 4, 2, 70, 16, 8)
    q, k, v, lk, gen = _inputs(B, H, hkv, T, D, torch.float32, seed=21)
    doc = _docs(B, T, 3, gen)
    for d in (None, doc):
        if CUDA:
            o, lse = ta.dms_attention_flex(q, k, v, lk, W, d)
            gl = torch.randn(lse.shape, generator=gen).to(DEV)
            grads = torch.autograd.grad(o.sum() + (lse * gl).sum(), (q, k, v, lk))
            o2, lse2 = dms_attention_reference(q, k, v, lk, W, d)
            grads2 = torch.autograd.grad(o2.sum() + (lse2 * gl).sum(), (q, k, v, lk))
            for n, a, b in zip(("dq", "dk", "dv", "dlog_keep"), grads, grads2):
                # flex computes fp32 products in tf32 on GPU: 1e-2-level tolerance, not the fp32 one
                assert (a - b).norm() <= 1e-2 * b.norm() + 1e-6, n
            tol = 1e-2
        else:
            qd, kd, vd, lkd = (x.detach() for x in (q, k, v, lk))
            o, lse = ta.dms_attention_flex(qd, kd, vd, lkd, W, d)
            o2, lse2 = dms_attention_reference(qd, kd, vd, lkd, W, d)
            tol = 1e-5
        assert (o - o2).norm() <= tol * o2.norm() and (lse - lse2).norm() <= tol * lse2.norm()


def test_grad_through_output_only():
    """Loss on o alone: the lse gradient arrives as None (no zero-filled tensor) and must be handled."""
    q, k, v, lk, _ = _inputs(1, 2, 1, 30, 16, torch.float32, seed=23)
    o, _ = ta.dms_attention(q, k, v, lk, 3)
    grads = torch.autograd.grad(o.sum(), (q, k, v, lk))
    o2, _ = dms_attention_reference(q, k, v, lk, 3)
    grads2 = torch.autograd.grad(o2.sum(), (q, k, v, lk))
    for n, a, b in zip(("dq", "dk", "dv", "dlog_keep"), grads, grads2):
        _check(n, a, b, torch.float32)


def test_precomputed_doc_bounds_same_result():
    """Bounds computed once per forward and passed to every layer == bounds computed inside each call."""
    q, k, v, lk, _ = _inputs(2, 4, 2, 70, 16, torch.float32, seed=9)
    doc = _docs(2, 70, 3, torch.Generator().manual_seed(9))
    bounds = ta.precompute_doc_bounds(doc)
    outs = []
    for b in (None, bounds):
        qq, kk, vv, ll = (t.detach().clone().requires_grad_(True) for t in (q, k, v, lk))
        o, _ = ta.dms_attention(qq, kk, vv, ll, 8, doc, doc_bounds=b)
        o.square().sum().backward()
        outs.append([o.detach(), qq.grad, kk.grad, vv.grad, ll.grad])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert ta.dms_attention.precompute_doc_bounds is ta.precompute_doc_bounds
