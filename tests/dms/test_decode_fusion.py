"""Fused decode ops swapped into a model (dms/decode_fusion.py): same logits as the unfused step.

Each supported family (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms) with an adapter
retention head: a padded prompt is prefilled into two paged caches, then static-mode decode steps run
with ``fuse=True`` (Triton kernels; the interpreter on CPU) and ``fuse=False``; logits must agree to 1e-4
(fp32; the fused RMSNorm and retention head sum in another order) and the greedy tokens and the cache
contents must be identical. The swap must be undone on exit.
"""
import os
import sys

import pytest
import torch

import dms
from dms.decode_fusion import fusable, fused_decode_ops
from dms.graphs import GraphedDecodeStep
from dms.paged_cache import PagedDMSCache

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
HD = 64 if CUDA else 16
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or the Triton interpreter")


def _model(make_tiny_model, randomize, family, granularity="head"):
    m = make_tiny_model(family, kv_heads=2, heads=4, hidden=4 * HD, head_dim=HD)
    dms.retrofit(m, dms.DMSConfig(window=2, attention_impl="eager", granularity=granularity))
    randomize(m, 0.3)
    return m.to(DEV).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_step_equals_unfused(make_tiny_model, randomize, family, monkeypatch):
    import dms_kernels.fused_ops as fo

    calls = {}
    for name in ("rms_norm", "rope", "silu_mul", "retention_head"):  # count that the fused kernels really ran
        def counted(*a, _f=getattr(fo, name), _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(fo, name, counted)
    model = _model(make_tiny_model, randomize, family)
    n = fusable(model)
    L = model.config.num_hidden_layers
    assert n["mlp"] == L and n["retention_head"] == L and n["rope_modules"] == 1
    assert n["rms_norm"] == 2 * L + 1 + (2 * L if family == "qwen3" else 0)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 9), device=DEV)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    caches = []
    with torch.no_grad():
        for _ in range(2):
            c = PagedDMSCache(model, page_size=16, backend="torch")
            lg = model(ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0), past_key_values=c,
                       use_cache=True).logits[:, -1]
            caches.append(c)
    pos0 = am.sum(-1, keepdim=True)
    steps = [GraphedDecodeStep(model, caches[0], horizon=4, cuda_graph=False, fuse=True),
             GraphedDecodeStep(model, caches[1], horizon=4, cuda_graph=False, fuse=False)]
    tok = lg.argmax(-1)[:, None]
    for i in range(6):
        calls.clear()
        a = steps[0](tok, pos0 + i).clone()
        fused_calls = dict(calls)
        calls.clear()
        b = steps[1](tok, pos0 + i).clone()
        # the fused step runs every fused kernel once per module; the unfused one none (on CUDA the retention
        # head uses its Triton kernel at inference in both)
        assert fused_calls == {"rms_norm": n["rms_norm"], "rope": L, "silu_mul": L, "retention_head": L}
        assert calls == ({"retention_head": L} if CUDA else {})
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        tok = a.argmax(-1)[:, None]
    for s in steps:
        s.close()
    sa, sb = caches[0].stats(), caches[1].stats()
    assert sa["tokens_held_per_layer_head"] == sb["tokens_held_per_layer_head"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_fused_gemm_step_equals_unfused(make_tiny_model, randomize, family, monkeypatch):
    """fuse_gemm: q/k/v in one launch, gate/up/SiLU in one launch and the residual adds in the o_proj / down_proj
    epilogues (decode rows), same logits; DMS_DECODE_RESIDUAL=0 keeps the adds separate, same logits too."""
    import dms_kernels.fused_ops as fo

    calls = {}
    for name in ("grouped_linear", "gate_up_silu", "silu_mul", "linear_residual"):
        def counted(*a, _f=getattr(fo, name), _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(fo, name, counted)
    model = _model(make_tiny_model, randomize, family)
    L = model.config.num_hidden_layers
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (3, 7), device=DEV)
    caches = []
    with torch.no_grad():
        for _ in range(2):
            c = PagedDMSCache(model, page_size=16, backend="torch")
            lg = model(ids, past_key_values=c, use_cache=True).logits[:, -1]
            caches.append(c)
    c3 = PagedDMSCache(model, page_size=16, backend="torch")
    with torch.no_grad():
        model(ids, past_key_values=c3, use_cache=True)
    fused = GraphedDecodeStep(model, caches[0], horizon=3, cuda_graph=False, fuse=True, fuse_gemm=True)
    plain = GraphedDecodeStep(model, caches[1], horizon=3, cuda_graph=False, fuse=False)
    monkeypatch.setenv("DMS_DECODE_RESIDUAL", "0")
    no_res = GraphedDecodeStep(model, c3, horizon=3, cuda_graph=False, fuse=True, fuse_gemm=True)
    monkeypatch.delenv("DMS_DECODE_RESIDUAL")
    assert fused.fuse_gemm and not plain.fuse_gemm
    tok = lg.argmax(-1)[:, None]
    for i in range(4):
        calls.clear()
        a = fused(tok, torch.full_like(tok, 7 + i)).clone()
        assert calls == {"grouped_linear": L, "gate_up_silu": L, "linear_residual": 2 * L}
        b = plain(tok, torch.full_like(tok, 7 + i)).clone()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        monkeypatch.setenv("DMS_DECODE_RESIDUAL", "0")
        calls.clear()
        c = no_res(tok, torch.full_like(tok, 7 + i)).clone()
        monkeypatch.delenv("DMS_DECODE_RESIDUAL")
        assert calls == {"grouped_linear": L, "gate_up_silu": L}
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)
        tok = a.argmax(-1)[:, None]
    fused.close()
    plain.close()
    no_res.close()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_swap_is_undone(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, "llama")
    mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rope_before = mod.apply_rotary_pos_emb
    norm = model.model.layers[0].input_layernorm
    with fused_decode_ops(model):
        assert "forward" in norm.__dict__ and mod.apply_rotary_pos_emb is not rope_before
        with fused_decode_ops(model):  # nested: no second swap
            pass
        assert "forward" in norm.__dict__
    assert "forward" not in norm.__dict__ and mod.apply_rotary_pos_emb is rope_before
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fuse_needs_triton_device(make_tiny_model, randomize, monkeypatch):
    import dms.decode_fusion as df

    model = _model(make_tiny_model, randomize, "llama")
    c = PagedDMSCache(model, page_size=16, backend="torch")
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 5), device=DEV), past_key_values=c, use_cache=True)
    monkeypatch.setattr(df, "fusion_available", lambda device: False)
    with pytest.raises(ValueError, match="fuse=True needs CUDA"):
        GraphedDecodeStep(model, c, cuda_graph=False, fuse=True)
    assert GraphedDecodeStep(model, c, cuda_graph=False).fuse is False
