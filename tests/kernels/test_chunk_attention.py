"""Prefill-chunk attention over cached keys (Triton ``chunk_attention``) vs ``masked_attention_lse``.

Random inputs, odd sizes, GQA 1/4, windows 0 / 3 / >= S, random evict flags, empty slots (k_pos -1) and
padding queries (q_pos -1, which see nothing: zeros and -inf). Outputs are poisoned with NaN first.
Tolerances (max-abs on o ~ N(0, 1/S), and on lse): fp32 2e-5, fp16 4e-3, bf16 2e-2 (inputs rounded once,
P rounded before the P.V product on CUDA; the interpreter upcasts bf16).
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 on CPU first
from dms_kernels.decode_attention import triton_chunk as tc  # noqa: E402
from dms_kernels.decode_attention.reference import masked_attention_lse  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tc, "POISON_OUTPUTS", True)


def _inputs(B, H, Hkv, Tq, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    base = S + 5
    # cached keys hold positions below the chunk's; some slots empty; rows differ
    k_pos = torch.stack([torch.randperm(base, generator=g)[:S].sort().values for _ in range(B * Hkv)]).view(B, Hkv, S)
    k_pos = k_pos.masked_fill(torch.rand(B, Hkv, S, generator=g) < 0.2, -1)
    k_ev = torch.rand(B, Hkv, S, generator=g) < 0.5
    q_pos = (base + torch.arange(Tq))[None].repeat(B, 1)
    if B > 1:
        q_pos[1, : Tq // 3] = -1  # padding queries
    return [t.to(DEV) for t in (q.to(dtype), k.to(dtype), v.to(dtype), q_pos, k_pos, k_ev)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,Tq,S,D,window", [
    (2, 4, 1, 37, 130, 16, 3),   # GQA 4, odd sizes
    (1, 2, 2, 1, 5, 32, 0),      # one query, window 0
    (2, 8, 2, 20, 64, 64, 1000),  # window beyond everything: only empty slots hidden
    (1, 4, 2, 63, 500, 16, 16),  # the odd sizes of DESIGN.md's habit 1
])
def test_chunk_attention_matches_reference(dtype, B, H, Hkv, Tq, S, D, window):
    q, k, v, qp, kp, ke = _inputs(B, H, Hkv, Tq, S, D, dtype)
    o, lse = tc.chunk_attention(q, k, v, qp, kp, ke, window, D ** -0.5)
    ro, rlse = masked_attention_lse(q.float(), k.float(), v.float(), qp, kp, ke, window, D ** -0.5)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o, ro, atol=TOL[dtype], rtol=0)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], rlse[fin], atol=TOL[dtype] * 5, rtol=0)
    if B > 1:
        assert (o[1, :, : Tq // 3] == 0).all()  # padding queries see nothing


def test_chunk_attention_empty_cache_and_errors():
    q, k, v, qp, kp, ke = _inputs(1, 2, 1, 3, 0, 16, torch.float32)
    o, lse = tc.chunk_attention(q, k, v, qp, kp, ke, 2, 0.25)
    assert (o == 0).all() and torch.isneginf(lse).all()
    q, k, v, qp, kp, ke = _inputs(1, 3, 2, 3, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        tc.chunk_attention(q, k, v, qp, kp, ke, 2, 0.25)
    q, k, v, qp, kp, ke = _inputs(1, 2, 1, 3, 4, 24, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        tc.chunk_attention(q, k, v, qp, kp, ke, 2, 0.25)
