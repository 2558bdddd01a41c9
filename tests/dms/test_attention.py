"""DMS attention: masks (causal, documents, window), training gradient, inference hard mask."""
import pytest
import torch

import dms
from dms.cache import masked_attention
from dms_kernels.train_attention import dms_attention_reference, hard_log_keep


def test_reference_matches_positional_hard_mask():
    torch.manual_seed(0)
    B, H, Hkv, T, D, W = 2, 4, 2, 17, 8, 3
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    evict = torch.rand(B, Hkv, T) < 0.5
    o, _ = dms_attention_reference(q, k, v, hard_log_keep(evict), W)
    pos = torch.arange(T).expand(B, T)
    o2 = masked_attention(q, k, v, pos, pos[:, None, :].expand(B, Hkv, T), evict, W, D ** -0.5)
    torch.testing.assert_close(o, o2, atol=1e-5, rtol=1e-5)


def test_window_semantics_exact():
    """Key j is visible to query i iff j <= i and (i - j <= window or kept)."""
    T, W = 8, 2
    q = torch.zeros(1, 1, T, T)
    k = torch.zeros(1, 1, T, T)
    v = torch.eye(T)[None, None]  # value j = one-hot j: the output row is the attention distribution
    evict = torch.zeros(1, 1, T, dtype=torch.bool)
    evict[0, 0, 1] = True
    o, _ = dms_attention_reference(q, k, v, hard_log_keep(evict), W)
    p = o[0, 0]
    for i in range(T):
        for j in range(T):
            visible = j <= i and (i - j <= W or j != 1)
            assert (p[i, j] > 0) == visible, (i, j)


def test_documents_isolated():
    torch.manual_seed(1)
    T1, T2, H, D = 5, 7, 2, 4
    q, k, v = torch.randn(1, H, T1 + T2, D), torch.randn(1, H, T1 + T2, D), torch.randn(1, H, T1 + T2, D)
    lk = torch.log(torch.rand(1, H, T1 + T2))
    docs = torch.tensor([[0] * T1 + [1] * T2])
    o, _ = dms_attention_reference(q, k, v, lk, 1, docs)
    o1, _ = dms_attention_reference(q[:, :, :T1], k[:, :, :T1], v[:, :, :T1], lk[:, :, :T1], 1)
    o2, _ = dms_attention_reference(q[:, :, T1:], k[:, :, T1:], v[:, :, T1:], lk[:, :, T1:], 1)
    torch.testing.assert_close(o, torch.cat([o1, o2], 2))


def test_minus_inf_log_keep_no_nan_and_gradients():
    torch.manual_seed(2)
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    k = torch.randn(1, 1, 9, 4, requires_grad=True)
    v = torch.randn(1, 1, 9, 4, requires_grad=True)
    lk = torch.log(torch.rand(1, 1, 9))
    lk[0, 0, :4] = float("-inf")
    lk.requires_grad_(True)
    o, lse = dms_attention_reference(q, k, v, lk, 0)
    (o.square().sum() + lse.sum()).backward()
    for t in (o, q.grad, k.grad, v.grad, lk.grad):
        assert torch.isfinite(t).all()


def test_training_gradient_reaches_retention_head(make_tiny_model):
    model = dms.retrofit(make_tiny_model(), dms.DMSConfig(window=2))
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 32))
    with torch.no_grad():
        for p in dms.retention_parameters(model):
            p.normal_(0, 0.01)
    out = model(ids).logits
    from dms.losses import compression_loss

    comp, frac = compression_loss(dms.dms_state(model).records, 0.5)
    (out.float().square().mean() + comp).backward()
    grads = [p.grad for p in dms.retention_parameters(model)]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_packed_documents_match_separate_sequences(make_tiny_model, randomize):
    """Hard-mask forward of two packed documents equals running each alone."""
    model = dms.retrofit(make_tiny_model(), dms.DMSConfig(window=3))
    randomize(model, 0.3)
    torch.manual_seed(0)
    a, b = torch.randint(3, 97, (1, 11)), torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
        docs = torch.tensor([[0] * 11 + [1] * 9])
        with dms.packed_documents(model, docs):
            lab = model(torch.cat([a, b], 1)).logits
    # RoPE is relative, so the shifted positions of document b do not change its attention.
    torch.testing.assert_close(lab[:, :11], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lab[:, 11:], lb, atol=1e-4, rtol=1e-4)


def test_auto_kernel_falls_back_for_shapes_triton_cannot_take(monkeypatch):
    """attention_impl='auto' on CUDA picks the Triton kernel, which takes any head dim up to 256 (odd ones run
    zero-padded); above that, or for a dtype it lacks, 'auto' gets the eager reference with one warning instead of
    an error mid-training; 'triton' asked by name still raises the kernel's clear error."""
    import warnings

    from dms import attention as A
    import dms_kernels.train_attention as ta

    monkeypatch.setattr(A, "triton_available", lambda: True)
    monkeypatch.setattr(A, "_FALLBACK_WARNED", set())
    cuda = torch.device("cuda")
    q8, k8 = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)
    q80, k80 = torch.zeros(1, 2, 4, 80), torch.zeros(1, 1, 4, 80)
    q320, k320 = torch.zeros(1, 2, 4, 320), torch.zeros(1, 1, 4, 320)
    assert A.get_train_kernel("auto", cuda, q8, k8) is ta.dms_attention
    assert A.get_train_kernel("auto", cuda, q80, k80) is ta.dms_attention
    with pytest.warns(UserWarning, match="head dim 320"):
        assert A.get_train_kernel("auto", cuda, q320, k320) is ta.dms_attention_reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason
        assert A.get_train_kernel("auto", cuda, q320, k320) is ta.dms_attention_reference
    with pytest.warns(UserWarning, match="dtype"):
        assert A.get_train_kernel("auto", cuda, q8.double(), k8.double()) is ta.dms_attention_reference
    assert A.get_train_kernel("auto", torch.device("cpu"), q8, k8) is ta.dms_attention_reference
    assert A.get_train_kernel("triton", cuda, q320, k320) is ta.dms_attention
    with pytest.raises(ValueError, match="head dim D=320"):
        ta.dms_attention(q320, k320, k320, torch.zeros(1, 1, 4), 2)
