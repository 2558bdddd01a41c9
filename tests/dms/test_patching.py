"""Patching: eviction off == original model, for every supported family (the first test of any patch)."""
import pytest
import torch

import dms
from dms.attention import dms_attention_forward


CASES = [
    # family, heads, kv_heads, head_dim
    ("llama", 4, 2, 64), ("llama", 4, 4, 128),
    ("mistral", 4, 1, 64), ("mistral", 4, 4, 128),
    ("qwen2", 4, 2, 64), ("qwen2", 4, 4, 128),
    ("qwen3", 4, 2, 128), ("qwen3", 4, 4, 64),
]


def _inputs(B=2, T=24, pad=5, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :pad] = 0  # left padding on the second row
    return ids, am


@pytest.mark.parametrize("family,heads,kv,hd", CASES)
@pytest.mark.parametrize("retention", ["adapter", "q_neuron"])
def test_eviction_off_equals_original(make_tiny_model, family, heads, kv, hd, retention):
    model = make_tiny_model(family, hidden=64, heads=heads, kv_heads=kv, head_dim=hd)
    ids, am = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        dms.retrofit(model, dms.DMSConfig(window=4, retention=retention))
        with dms.dms_disabled(model):
            out = model(ids, attention_mask=am).logits
    real = am.bool()
    # Same SDPA kernel and the same mask: bit-identical in fp32 on CPU.
    assert torch.equal(out[real], ref[real])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fresh_adapter_evicts_nothing(make_tiny_model, family):
    """Zero-initialised heads give l = -5 < 0: DMS on, nothing evicted, logits match (fp32 tolerance 1e-5)."""
    model = make_tiny_model(family)
    ids, am = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        dms.retrofit(model, dms.DMSConfig(window=2))
        out = model(ids, attention_mask=am).logits
    rec = dms.dms_state(model).records
    assert all(float(r["evicted"].sum()) == 0 for r in rec.values())
    torch.testing.assert_close(out[am.bool()], ref[am.bool()], atol=1e-5, rtol=1e-5)


def test_unknown_family_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported families: llama, mistral, qwen2, qwen3"):
        dms.retrofit(model)


def test_double_retrofit_raises(make_tiny_model):
    model = dms.retrofit(make_tiny_model())
    with pytest.raises(ValueError, match="already retrofitted"):
        dms.retrofit(model)


def test_registered_attention_and_config(make_tiny_model):
    from transformers import AttentionInterface

    model = dms.retrofit(make_tiny_model(), dms.DMSConfig(window=7, granularity="layer"))
    assert AttentionInterface._global_mapping["dms"] is dms_attention_forward
    assert model.config._attn_implementation == "dms"
    assert model.config.dms["window"] == 7 and model.config.dms["granularity"] == "layer"
    heads = [m for n, m in model.named_modules() if n.endswith("dms_retention")]
    assert len(heads) == 2 and heads[0].proj.out_features == 1  # one decision per layer


def test_q_neuron_adds_no_parameters(make_tiny_model):
    model = make_tiny_model()
    n0 = sum(p.numel() for p in model.parameters())
    dms.retrofit(model, dms.DMSConfig(retention="q_neuron"))
    assert sum(p.numel() for p in model.parameters()) == n0
    assert dms.retention_parameters(model) == []


def test_decision_for_key_comes_from_next_token(make_tiny_model):
    """Forcing the logit at position t to 'evict' removes key t-1 (only), for queries beyond the window."""
    from dms.heads import shift_decisions

    logits = torch.full((1, 6, 1), -1.0)
    logits[0, 3, 0] = 1.0
    shifted = shift_decisions(logits, float("-inf"))
    assert (shifted[0, :, 0] > 0).nonzero().flatten().tolist() == [2]
    assert shifted[0, -1, 0] == float("-inf")  # the last token has no decision yet: kept
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    shifted = shift_decisions(logits, float("-inf"), docs)
    assert shifted[0, 2, 0] == float("-inf")  # last token of document 0 is kept (its successor is another doc)
