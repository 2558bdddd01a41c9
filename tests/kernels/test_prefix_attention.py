"""Shared-prefix decode attention: Triton kernel vs fp32 reference on random inputs, odd shapes.

On CPU the kernel runs under TRITON_INTERPRET=1; on CUDA natively. Partial outputs are poisoned with
NaN before each call (POISON_OUTPUTS), so an unwritten element fails. Tolerances: fp32 inputs 2e-5 on o
and lse; bf16/fp16 (GPU only) 2e-2 on o, 1e-2 on lse (inputs rounded to 8/11 mantissa bits).
"""

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 on CPU first

from dms_kernels.prefix_attention import prefix_attention  # noqa: E402
from dms_kernels.prefix_attention import triton_kernel  # noqa: E402
from dms_kernels.prefix_attention.reference import prefix_attention_grouped_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison():
    old = triton_kernel.POISON_OUTPUTS
    triton_kernel.POISON_OUTPUTS = True
    yield
    triton_kernel.POISON_OUTPUTS = old


def _check(o1, l1, o2, l2, atol_o, atol_l):
    assert torch.isfinite(o2).all()
    assert torch.equal(torch.isinf(l1), torch.isinf(l2))
    torch.testing.assert_close(o2.float(), o1.float(), atol=atol_o, rtol=0)
    fin = torch.isfinite(l1)
    torch.testing.assert_close(l2[fin], l1[fin], atol=atol_l, rtol=0)


@pytest.mark.parametrize("G,Hkv,M,S,D,splits", [
    (1, 1, 1, 1, 16, None),      # one query row, one key
    (1, 2, 5, 63, 32, 2),        # odd prefix length, two splits
    (2, 1, 24, 100, 64, 3),      # two prompts, M > 16
    (1, 2, 70, 130, 64, None),   # M over one query block
    (1, 1, 8, 0, 16, None),      # empty prefix: nothing visible
])
def test_matches_reference(G, Hkv, M, S, D, splits):
    torch.manual_seed(G * 100 + S)
    q = torch.randn(G, Hkv, M, D, device=DEV)
    k, v = torch.randn(G, Hkv, S, D, device=DEV), torch.randn(G, Hkv, S, D, device=DEV)
    vis = torch.rand(G, Hkv, S, device=DEV) < 0.6
    if S:
        vis[0, 0] = False  # a head with nothing visible: lse -inf, o zeros
    o1, l1 = prefix_attention_grouped_reference(q, k, v, vis, D ** -0.5)
    o2, l2 = triton_kernel.prefix_attention_grouped(q, k, v, vis, D ** -0.5, splits=splits)
    _check(o1, l1, o2, l2, 2e-5, 2e-5)


@pytest.mark.parametrize("visible_cols", [37, 50, 64])
def test_length_with_short_visible(visible_cols):
    """Static decode: buffers of capacity 64 grown in place, ``length`` = 37 used, ``visible`` covering only
    the first ``visible_cols`` slots (the shared-prefix static path passes the first ``length`` columns).
    Both implementations agree with attention over the sliced buffers."""
    torch.manual_seed(visible_cols)
    G, Hkv, M, cap, L, D = 2, 2, 3, 64, 37, 32
    q = torch.randn(G * 1, Hkv * M, 1, D, device=DEV)
    k, v = torch.randn(G, Hkv, cap, D, device=DEV), torch.randn(G, Hkv, cap, D, device=DEV)
    k[:, :, L:] = float("nan")  # slots past length are never read
    v[:, :, L:] = float("nan")
    vis = torch.rand(G, Hkv, visible_cols, device=DEV) < 0.6
    want = prefix_attention(q, k[:, :, :L], v[:, :, :L], vis[:, :, :L], D ** -0.5, 1, impl="reference")
    for impl in ("reference", "triton"):
        got = prefix_attention(q, k, v, vis, D ** -0.5, 1, impl=impl, length=L)
        _check(want[0], want[1], got[0], got[1], 2e-5, 2e-5)
    with pytest.raises(ValueError, match="visible must be"):
        prefix_attention(q, k, v, vis[:, :, :L - 1], D ** -0.5, 1, impl="triton", length=L)


def test_sample_grouping_roundtrip():
    """[G*W, H, 1, D] queries: grouping by KV head then ungrouping gives per-sample attention."""
    torch.manual_seed(0)
    G, W, H, Hkv, S, D = 2, 3, 4, 2, 37, 16
    q = torch.randn(G * W, H, 1, D, device=DEV)
    k, v = torch.randn(G, Hkv, S, D, device=DEV), torch.randn(G, Hkv, S, D, device=DEV)
    vis = torch.rand(G, Hkv, S, device=DEV) < 0.7
    o, lse = prefix_attention(q, k, v, vis, D ** -0.5, W, impl="triton")
    for b in range(G * W):
        for h in range(H):
            kv = h // (H // Hkv)
            s = (q[b, h, 0] @ k[b // W, kv].T) * D ** -0.5
            s = s.masked_fill(~vis[b // W, kv], float("-inf"))
            p = torch.softmax(s, -1)
            torch.testing.assert_close(o[b, h, 0], p @ v[b // W, kv], atol=2e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision runs on the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_half_precision_gpu(dtype, D):
    torch.manual_seed(1)
    G, Hkv, M, S = 1, 8, 4 * 32, 4099
    q = torch.randn(G, Hkv, M, D, device=DEV, dtype=dtype)
    k, v = torch.randn(G, Hkv, S, D, device=DEV, dtype=dtype), torch.randn(G, Hkv, S, D, device=DEV, dtype=dtype)
    vis = torch.rand(G, Hkv, S, device=DEV) < 0.2
    o1, l1 = prefix_attention_grouped_reference(q, k, v, vis, D ** -0.5)
    o2, l2 = triton_kernel.prefix_attention_grouped(q, k, v, vis, D ** -0.5)
    _check(o1, l1, o2, l2, 2e-2, 1e-2)


def test_bad_shapes_raise():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="visible must be"):
        triton_kernel.prefix_attention_grouped(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
                                               torch.ones(1, 2, 4, dtype=torch.bool), 0.25)


@pytest.mark.parametrize("D,dtype_in,dtype_out", [(16, torch.float32, None), (64, torch.float16, torch.float16),
                                                  (32, torch.float32, torch.float16)])
def test_merge_two_matches_pytorch(D, dtype_in, dtype_out):
    """The one-launch prefix/suffix merge equals the PyTorch form, including rows where one side or both saw no key."""
    import dms.shared_prefix as sp

    torch.manual_seed(D)
    shape = (3, 5, 1)
    o1, o2 = torch.randn(*shape, D, device=DEV).to(dtype_in), torch.randn(*shape, D, device=DEV).to(dtype_in)
    l1, l2 = torch.randn(shape, device=DEV) * 3, torch.randn(shape, device=DEV) * 3
    l1[0, 0] = float("-inf")            # only the second side saw keys
    l2[1, 2] = float("-inf")            # only the first
    l1[2, 4] = l2[2, 4] = float("-inf")  # neither: o 0, lse -inf
    o1[0, 0] = o2[1, 2] = float("nan")  # a side with no key is never read as a value
    o, lse = triton_kernel.merge_two(o1, l1, o2, l2, dtype_out)
    saved = sp.PREFIX_IMPL
    try:
        sp.PREFIX_IMPL = "reference"
        want_o, want_l = sp._merge(o1.nan_to_num(0.0), l1, o2.nan_to_num(0.0), l2, dtype_out)
    finally:
        sp.PREFIX_IMPL = saved
    assert o.dtype == (dtype_out or torch.float32) and not torch.isnan(o).any()
    torch.testing.assert_close(o.float(), want_o.float(), atol=2e-3 if dtype_out else 1e-6, rtol=0)
    torch.testing.assert_close(lse, want_l, atol=1e-6, rtol=0)
    assert lse[2, 4] == float("-inf") and (o[2, 4] == 0).all()
    with pytest.raises(ValueError, match="equal shapes"):
        triton_kernel.merge_two(o1, l1, o2[:1], l2[:1])
