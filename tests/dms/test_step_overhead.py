"""The lean DMS training step: fused decisions equal the reference composition, shared per-forward work,
no per-layer host syncs, layer granularity, and the library's gradient checkpointing."""
import pytest
import torch
import torch.nn.functional as F

import dms
from dms.attention import ForwardPlan, decision_valid
from dms.heads import TrainDecisions, logistic_noise_offsets, shift_decisions, train_decisions
from dms.losses import compression_loss


def _reference(z, g, valid, scale, offset, tau, doc_ids):
    """The unfused definition: shift (key t <- logit t+1), Gumbel-sigmoid with the given noise, masking,
    straight-through hard decisions summed per head (what dms/attention.py did per layer before)."""
    logits = z * scale - offset
    shifted = shift_decisions(logits, float("-inf"), doc_ids)
    y = (shifted + g) / tau
    alpha = torch.sigmoid(y)
    hard = (alpha > 0.5).to(alpha.dtype) + alpha - alpha.detach()
    log_keep = F.logsigmoid(-y).masked_fill(~valid[..., None], 0.0)
    evicted = (hard * valid[..., None].to(hard.dtype)).sum(dim=(0, 1))
    return log_keep.transpose(1, 2), evicted


@pytest.mark.parametrize("docs", [False, True])
def test_fused_decisions_match_reference(docs):
    torch.manual_seed(0)
    B, T, H, scale, offset, tau = 2, 37, 3, 100.0, 5.0, 0.1
    doc_ids = None
    if docs:
        doc_ids = torch.zeros(B, T, dtype=torch.int32)
        doc_ids[:, 15:] = 1
        doc_ids[1, 30:] = -1  # padding
    valid = decision_valid(doc_ids, B, T, "cpu")
    z = (torch.randn(B, T, H, dtype=torch.float64) * 0.03 + 0.05).requires_grad_(True)
    u = torch.rand(1, B, H, T, dtype=torch.float64).clamp_(1e-6, 1 - 1e-6)
    g_bht = torch.log(u) - torch.log1p(-u)  # the noise the fused path draws, [1, B, H, T]
    c = ((offset - g_bht) / tau).masked_fill(~valid[:, None, :], float("inf"))[0]
    lk, ev = TrainDecisions.apply(z, c, scale / tau)
    z_ref = z.detach().clone().requires_grad_(True)
    lk_ref, ev_ref = _reference(z_ref, g_bht[0].transpose(1, 2), valid, scale, offset, tau, doc_ids)
    assert lk.shape == (B, H, T) and lk.is_contiguous()
    torch.testing.assert_close(lk, lk_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(ev.double(), ev_ref.detach())
    assert 0 < float(ev.detach().sum()) < float(valid.sum()) * H  # not vacuous: some, not all, keys evicted
    assert (lk[~valid[:, None, :].expand(B, H, T)] == 0).all()
    # gradients of a loss through both outputs, and through each alone
    w_lk, w_ev = torch.randn(B, H, T, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    for a, b in ((1, 1), (1, 0), (0, 1)):
        gz = torch.autograd.grad(a * (lk * w_lk).sum() + b * (ev * w_ev).sum(), z, retain_graph=True)[0]
        gr = torch.autograd.grad(a * (lk_ref * w_lk).sum() + b * (ev_ref * w_ev).sum(), z_ref, retain_graph=True)[0]
        torch.testing.assert_close(gz, gr, rtol=1e-9, atol=1e-12)
    assert (gz[:, 0] == 0).all()  # position 0 decides nothing (no key before it)


def test_noise_is_logistic_and_masked():
    valid = torch.ones(2, 4001, dtype=torch.bool)
    valid[:, -1] = False
    c = logistic_noise_offsets((3, 2, 2, 4001), valid, 5.0, 0.1, "cpu")
    assert c.shape == (3, 2, 2, 4001) and torch.isinf(c[..., -1]).all() and torch.isfinite(c[..., :-1]).all()
    g = 5.0 - 0.1 * c[..., :-1]
    assert abs(float(g.mean())) < 0.05 and abs(float(g.var()) - torch.pi ** 2 / 3) < 0.15  # logistic(0, 1)


def _train_forward(model, ids, docs=None):
    with dms.packed_documents(model, docs):
        out = model(ids, use_cache=False).logits
    return out


def test_plan_built_once_per_forward_and_no_host_sync(make_tiny_model, monkeypatch):
    """One plan (one noise draw) per training forward; no layer reads a device value on the host."""
    model = dms.retrofit(make_tiny_model(layers=3), dms.DMSConfig(window=2, attention_impl="eager"))
    model.train()
    ids = torch.randint(3, 97, (2, 16))
    docs = torch.zeros(2, 16, dtype=torch.long)
    docs[:, 9:] = 1
    built, draws = [], []
    init = ForwardPlan.__init__
    monkeypatch.setattr(ForwardPlan, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    import dms.attention as A
    orig = A.logistic_noise_offsets
    monkeypatch.setattr(A, "logistic_noise_offsets", lambda *a, **k: (draws.append(1), orig(*a, **k))[1])
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        orig_m = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=orig_m, _n=name, **k: (syncs.append(_n), _o(self, *a, **k))[1])
    _train_forward(model, ids, docs)
    assert len(built) == 1 and len(draws) == 1
    assert syncs == [], syncs
    records = dms.dms_state(model).records
    assert sorted(records) == [0, 1, 2]
    assert all(r["count"] is records[0]["count"] for r in records.values())
    assert float(records[0]["count"]) == 2 * (16 - 2)  # last token of each document decides nothing


def test_layer_granularity_one_decision_per_layer(make_tiny_model, randomize):
    model = dms.retrofit(make_tiny_model(kv_heads=2), dms.DMSConfig(window=1, granularity="layer",
                                                                       attention_impl="eager"))
    randomize(model, 0.005)  # logits near the threshold: per-head noise would split the heads
    model.train()
    _train_forward(model, torch.randint(3, 97, (2, 24)))
    recs = dms.dms_state(model).records.values()
    for r in recs:
        assert r["evicted"].shape == (2,) and r["evicted"][0] == r["evicted"][1]  # shared by both KV heads
    assert 0 < sum(float(r["evicted"].detach().sum()) for r in recs) < 2 * 2 * 23 * 2  # not vacuous


def test_compression_loss_vectorised_equals_per_layer_sum():
    ev = [torch.tensor([3.0, 1.0], requires_grad=True), torch.tensor([0.0, 4.0], requires_grad=True)]
    count = torch.tensor(10.0)
    recs = {0: {"evicted": ev[0], "count": count}, 1: {"evicted": ev[1], "count": count}}
    loss, frac = compression_loss(recs, 0.5)
    assert float(frac) == pytest.approx(8 / 40) and float(loss.detach()) == pytest.approx(0.5 - 8 / 40)
    loss.backward()
    assert torch.allclose(ev[0].grad, torch.full((2,), -1 / 40))
    recs[1]["count"] = torch.tensor(20.0)  # different counts: the general path
    _, frac = compression_loss(recs, 0.5)
    assert float(frac) == pytest.approx(8 / 60)


@pytest.mark.parametrize("retention", ["adapter", "q_neuron"])
def test_gradient_checkpointing_in_library_same_grads(make_tiny_model, randomize, retention):
    """dms.enable_gradient_checkpointing: same loss and gradients as without (noise reused, heads recomputed)."""
    grads = []
    for ckpt in (False, True):
        model = dms.retrofit(make_tiny_model(layers=2), dms.DMSConfig(window=2, attention_impl="eager",
                                                                        retention=retention))
        randomize(model, 0.005)  # logits near the threshold: the noise matters
        model.train()
        if ckpt:
            assert dms.enable_gradient_checkpointing(model) is model
            dms.enable_gradient_checkpointing(model)  # idempotent
        torch.manual_seed(3)
        ids = torch.randint(3, 97, (2, 20))
        docs = torch.zeros(2, 20, dtype=torch.long)
        docs[1, 12:] = 1
        out = _train_forward(model, ids, docs)
        comp, _ = compression_loss(dms.dms_state(model).records, 0.6)
        with torch.no_grad(), dms.dms_disabled(model):  # another forward (new plan) before the backward:
            model(ids[:, :7], use_cache=False)         # the recomputation must replay the first pass's plan
        (out.float().square().mean() + comp).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(("dms_retention" if retention == "adapter" else "q_proj") in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_kernel_doc_bounds_precomputed_once_per_forward(make_tiny_model):
    """A kernel publishing ``precompute_doc_bounds`` gets it computed once per forward, passed to every layer."""
    from dms.attention import TRAIN_KERNELS, register_train_kernel
    from dms_kernels.train_attention import dms_attention_reference

    pre_calls, seen = [], []

    def kernel(q, k, v, lk, window, doc_ids=None, scale=None, doc_bounds=None):
        seen.append(doc_bounds)
        return dms_attention_reference(q, k, v, lk, window, doc_ids, scale)

    kernel.precompute_doc_bounds = lambda d: (pre_calls.append(1), ("bounds", d.shape))[1]
    register_train_kernel("_test_bounds", kernel)
    try:
        cfg = dms.DMSConfig(window=2)
        cfg.attention_impl = "_test_bounds"
        model = dms.retrofit(make_tiny_model(layers=3), cfg)
        model.train()
        docs = torch.zeros(2, 12, dtype=torch.long)
        docs[:, 5:] = 1
        _train_forward(model, torch.randint(3, 97, (2, 12)), docs)
        assert pre_calls == [1] and seen == [("bounds", (2, 12))] * 3
        _train_forward(model, torch.randint(3, 97, (2, 12)))  # no documents: plain kernel call
        assert pre_calls == [1] and seen[3:] == [None] * 3
    finally:
        TRAIN_KERNELS.pop("_test_bounds", None)
