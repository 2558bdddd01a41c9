"""Fused decode ops (``dms_kernels.fused_ops``) against their PyTorch references (the transformers ops).

Random inputs, odd sizes (rows 1/3/7, hidden sizes that are not powers of two, the two-pass RMSNorm path),
strided q/k views as transformers produces them, GQA head counts, fp32/bf16/fp16. Outputs are poisoned
with NaN first. Tolerances: fp32 1e-5 (reduction order only); bf16/fp16 RMSNorm 2 units in the last place
(its fp32 statistics may round the normalised value the other way, then the weight product rounds again);
rope and silu_mul one unit (the compiler may fuse a product and a sum into one FMA, and CUDA's exp differs
from Triton's in the last bit). Under the CPU interpreter bf16 gets 4 units (it truncates fp32 -> bf16).
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 on CPU first
from dms_kernels.fused_ops import reference as ref  # noqa: E402
from dms_kernels.fused_ops import triton_ops as fo  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fo, "POISON_OUTPUTS", True)


def _close(a, b, dtype, rel_ulps=1, floor=1e-3):
    if not CUDA and dtype == torch.bfloat16:
        # the interpreter rounds fp32 -> bf16 by truncation (measured; CUDA rounds to nearest), so a sum of
        # rounded terms (rope) is off by units of its terms, not of the (possibly cancelled) result
        rel_ulps, floor = max(rel_ulps, 4), max(floor, 4.0)
    elif not CUDA and dtype == torch.float16:
        rel_ulps = max(rel_ulps, 1)  # numpy's exp/rsqrt differ from CUDA's in the last bit
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert not torch.isnan(a).any(), "unwritten (NaN) elements"
    a, b = a.float(), b.float()
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=floor))))
        tol = rel_ulps * ulp + 1e-6
        bad = (a - b).abs() > tol
        assert not bad.any(), f"{int(bad.sum())} of {a.numel()} elements off by more than {rel_ulps} ulp; " \
                              f"max diff {float((a - b).abs().max())}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,C", [(1, 64), (3, 200), (7, 96), (2, 9000)])
def test_rms_norm(dtype, rows, C):
    g = torch.Generator().manual_seed(rows * 1000 + C)
    x = (torch.randn(rows, 1, C, generator=g) * 3).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype).to(DEV)
    # two roundings (the normalised value, then its product with the weight): 2 ulp when the fp32
    # statistics round the normalised value the other way
    _close(fo.rms_norm(x, w, 1e-6), ref.rms_norm_reference(x, w, 1e-6), dtype, rel_ulps=2)


def test_rms_norm_fp32_weight_on_bf16_input():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 130, generator=g).to(torch.bfloat16).to(DEV)
    w = torch.randn(130, generator=g).to(DEV)  # fp32 weight: the product is fp32, as in transformers
    _close(fo.rms_norm(x, w, 1e-5), ref.rms_norm_reference(x, w, 1e-5), torch.bfloat16, rel_ulps=1 / 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,T,D", [(1, 4, 4, 1, 64), (3, 8, 2, 1, 128), (2, 6, 1, 5, 16), (1, 5, 5, 3, 80)])
def test_rope(dtype, B, H, Hkv, T, D):
    g = torch.Generator().manual_seed(B * 100 + H * 10 + T)
    # as transformers makes them: projections viewed [B, T, H, D] and transposed (non-contiguous)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).to(DEV).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).to(dtype).to(DEV).transpose(1, 2)
    ang = torch.rand(B, T, D // 2, generator=g) * 50
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)
    qo, ko = fo.rope(q, k, cos, sin)
    qr, kr = ref.rope_reference(q, k, cos, sin)
    _close(qo, qr, dtype)
    _close(ko, kr, dtype)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()


def test_rope_broadcast_cos_and_bad_shapes():
    q = torch.randn(2, 4, 3, 32, device=DEV)
    k = torch.randn(2, 2, 3, 32, device=DEV)
    emb = torch.rand(1, 3, 32, device=DEV)
    qo, ko = fo.rope(q, k, emb.cos(), emb.sin())
    qr, kr = ref.rope_reference(q, k, emb.cos(), emb.sin())
    _close(qo, qr, torch.float32)
    _close(ko, kr, torch.float32)
    with pytest.raises(ValueError, match="expected"):
        fo.rope(q, k[:, :, :2], emb.cos(), emb.sin())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 1, 1000), (2, 3, 2500)])
def test_silu_mul(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = (torch.randn(*shape, generator=g) * 4).to(dtype).to(DEV)
    b = torch.randn(*shape, generator=g).to(dtype).to(DEV)
    _close(fo.silu_mul(a, b), ref.silu_mul_reference(a, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,C,n_out", [(1, 64, 1), (3, 200, 8), (5, 1000, 3), (2, 96, 32),
                                         (70, 100, 8), (97, 64, 1), (65, 48, 20)])  # > 64 rows: row blocks
@pytest.mark.parametrize("block_r", [16, 64])
def test_retention_head(dtype, rows, C, n_out, block_r):
    g = torch.Generator().manual_seed(rows + C + n_out)
    x = (torch.randn(rows, 1, C, generator=g) * 2).to(dtype).to(DEV)
    nw = (1 + 0.1 * torch.randn(C, generator=g)).to(DEV)
    pw = (torch.randn(n_out, C, generator=g) / C ** 0.5).to(DEV)
    pb = torch.randn(n_out, generator=g).to(DEV)
    # rows <= 64 take the per-(row, output) kernel whatever the rows-kernel cfg says
    z = fo.retention_head(x, nw, pw, pb, 1e-6, cfg=dict(BLOCK_R=block_r, BLOCK_C=32))
    assert z.shape == (rows, 1, n_out) and z.dtype == torch.float32
    torch.testing.assert_close(z, ref.retention_head_reference(x, nw, pw, pb, 1e-6), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("rows,C", [(70, 100), (150, 1000), (129, 4096)])
def test_retention_head_split_weight_form(dtype, rows, C):
    """Many rows of 16-bit x: the split-weight form (x @ (norm_w * proj_w)^T with the fp32 weight product carried by
    three 16-bit parts) keeps fp32 accuracy: as close to the fp32 reference as the upcast 3xTF32 / fp32 form."""
    g = torch.Generator().manual_seed(rows + C)
    x = (torch.randn(rows, C, generator=g) * 2).to(dtype).to(DEV)
    nw = (1 + 0.1 * torch.randn(C, generator=g)).to(DEV)
    pw = (torch.randn(8, C, generator=g) / C ** 0.5).to(DEV)
    pb = torch.randn(8, generator=g).to(DEV)
    want = ref.retention_head_reference(x, nw, pw, pb, 1e-6)
    split = fo.retention_head(x, nw, pw, pb, 1e-6, cfg=dict(BLOCK_R=32, BLOCK_C=64, split_w=True))
    plain = fo.retention_head(x, nw, pw, pb, 1e-6, cfg=dict(BLOCK_R=32, BLOCK_C=64, split_w=False))
    torch.testing.assert_close(split, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(plain, want, rtol=0, atol=2e-5)


SKINNY_DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if CUDA else [torch.float16])


def _skinny_tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
@pytest.mark.parametrize("rows,K,Ns,bias", [(1, 64, (64, 16, 16), False), (3, 200, (70, 24, 24), True),
                                            (16, 130, (33,), False), (8, 96, (40, 17), True)])
def test_grouped_linear(dtype, rows, K, Ns, bias):
    g = torch.Generator().manual_seed(rows * 10 + K)
    x = torch.randn(rows, 1, K, generator=g).to(dtype).to(DEV)
    ws = [(torch.randn(n, K, generator=g) / K ** 0.5).to(dtype).to(DEV) for n in Ns]
    bs = [torch.randn(n, generator=g).to(dtype).to(DEV) for n in Ns] if bias else None
    ys = fo.grouped_linear(x, ws, bs)
    for y, r in zip(ys, ref.grouped_linear_reference(x, ws, bs)):
        assert y.shape == r.shape and not torch.isnan(y).any()
        torch.testing.assert_close(y.float(), r.float(), **_skinny_tol(dtype))


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
@pytest.mark.parametrize("rows,K,N,bias", [(1, 64, 48, False), (5, 200, 100, True), (16, 72, 130, False)])
def test_gate_up_silu(dtype, rows, K, N, bias):
    g = torch.Generator().manual_seed(rows + K + N)
    x = torch.randn(rows, K, generator=g).to(dtype).to(DEV)
    wg, wu = ((torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(DEV) for _ in range(2))
    bg, bu = ((torch.randn(N, generator=g).to(dtype).to(DEV) for _ in range(2)) if bias else (None, None))
    y = fo.gate_up_silu(x, wg, wu, bg, bu)
    r = ref.gate_up_silu_reference(x, wg, wu, bg, bu)
    assert y.shape == r.shape and not torch.isnan(y).any()
    torch.testing.assert_close(y.float(), r.float(), **_skinny_tol(dtype))


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
@pytest.mark.parametrize("rows,K,N,bias", [(1, 64, 48, False), (5, 200, 100, True), (16, 72, 130, False)])
def test_linear_residual(dtype, rows, K, N, bias):
    """residual + linear(x): the product rounded to the dtype first, then the sum (transformers' order)."""
    g = torch.Generator().manual_seed(7 * rows + K + N)
    x = torch.randn(rows, 1, K, generator=g).to(dtype).to(DEV)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(DEV)
    b = torch.randn(N, generator=g).to(dtype).to(DEV) if bias else None
    res = (4 * torch.randn(rows, 1, N, generator=g)).to(dtype).to(DEV)
    y = fo.linear_residual(x, w, res, b)
    r = ref.linear_residual_reference(x, w, res, b)
    assert y.shape == r.shape == res.shape and not torch.isnan(y).any()
    torch.testing.assert_close(y.float(), r.float(), **_skinny_tol(dtype))
    with pytest.raises(ValueError, match="residual"):
        fo.linear_residual(x, w, res[..., :-1], b)


def test_skinny_kernels_reject_bad_input():
    x = torch.randn(17, 32, device=DEV)
    w = torch.randn(16, 32, device=DEV)
    with pytest.raises(ValueError, match="at most 16 rows"):
        fo.grouped_linear(x, [w])
    with pytest.raises(ValueError, match="1 to 3 weights"):
        fo.grouped_linear(x[:2], [w] * 4)
    with pytest.raises(ValueError, match="for every weight or for none"):
        fo.grouped_linear(x[:2], [w, w], [torch.zeros(16, device=DEV), None])
    with pytest.raises(ValueError, match="contiguous"):
        fo.gate_up_silu(x[:2], w, w.t().contiguous().t())
