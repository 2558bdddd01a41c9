"""Training-free KV baselines (dms.eval.baselines): budget respected, exact when the budget covers the context."""
from __future__ import annotations

import pytest
import torch

from dms.eval.baselines import POLICIES, PolicyCache, make_cache, prepare_policy_model

T = 40


def _chunked_logits(model, ids, cache, chunk):
    outs = [model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits
            for s in range(0, ids.shape[1], chunk)]
    return torch.cat(outs, 1)


@pytest.fixture(scope="module")
def model_and_ids():
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("_cf", pathlib.Path(__file__).parents[1] / "conftest.py")
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)
    model = cf.tiny_model("llama", layers=2)
    ids = torch.randint(3, 97, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    prepare_policy_model(model)
    return model, ids, ref


@pytest.mark.parametrize("policy", POLICIES)
def test_equals_full_attention_when_budget_covers_context(model_and_ids, policy):
    model, ids, ref = model_and_ids
    cache = make_cache(model, policy, None if policy == "full" else T + 5)
    with torch.no_grad():
        out = _chunked_logits(model, ids, cache, 7)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert cache.stats()["tokens_held"] == 2 * 2 * 2 * T  # layers x rows x kv heads x tokens


@pytest.mark.parametrize("policy", ["sliding_window", "streaming_llm", "h2o", "tova"])
def test_budget_respected_and_output_changes(model_and_ids, policy):
    model, ids, ref = model_and_ids
    budget = 10
    cache = make_cache(model, policy, budget)
    with torch.no_grad():
        out = _chunked_logits(model, ids, cache, 5)
        for _ in range(3):  # decode steps
            nxt = out[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
            for layer in cache.layers:
                assert layer.pos.shape[-1] == budget
    assert not torch.allclose(_chunked_logits(model, ids, make_cache(model, policy, budget), 5), ref, atol=1e-3)
    st = cache.stats()
    assert st["tokens_held"] == 2 * 2 * 2 * budget
    assert st["peak_tokens_held"] <= 2 * 2 * 2 * (budget + 5)
    assert st["decode_kv_reads"] == 3 * 2 * 2 * 2 * (budget + 1)  # steps x layers x rows x heads x (held + new)


def test_what_each_policy_keeps(model_and_ids):
    model, ids, _ = model_and_ids
    budget = 12
    with torch.no_grad():
        c = make_cache(model, "sliding_window", budget)
        _chunked_logits(model, ids, c, 8)
        assert c.layers[0].pos[0, 0].tolist() == list(range(T - budget, T))
        c = make_cache(model, "streaming_llm", budget, sink_tokens=4)
        _chunked_logits(model, ids, c, 8)
        assert c.layers[0].pos[0, 0].tolist() == [0, 1, 2, 3] + list(range(T - 8, T))
        c = make_cache(model, "h2o", budget, recent_fraction=0.5)
        _chunked_logits(model, ids, c, 8)
        pos = c.layers[0].pos[0, 0].tolist()
        assert pos[-6:] == list(range(T - 6, T)) and len(pos) == budget
        c = make_cache(model, "tova", budget)
        _chunked_logits(model, ids, c, 8)
        assert c.layers[1].pos[1, 1, -1].item() == T - 1 and c.layers[1].pos.shape[-1] == budget


def test_sliding_and_streaming_are_chunking_invariant(model_and_ids):
    model, ids, _ = model_and_ids
    for policy in ("sliding_window", "streaming_llm"):
        with torch.no_grad():
            a = _chunked_logits(model, ids, make_cache(model, policy, 9), 1)
            b = _chunked_logits(model, ids, make_cache(model, policy, 9), 13)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_quest_keeps_all_and_reads_pages(model_and_ids):
    model, ids, ref = model_and_ids
    cache = make_cache(model, "quest", 16, page_size=4)
    with torch.no_grad():
        out = _chunked_logits(model, ids, cache, 4)
        for _ in range(3):
            model(input_ids=out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert cache.stats()["tokens_held"] == 2 * 2 * 2 * (T + 3)
    assert not torch.allclose(out, ref, atol=1e-3)
    # Each decode step reads budget // page_size pages (its own, possibly partial, page included).
    assert 3 * 2 * 2 * 2 * 12 < cache.stats()["decode_kv_reads"] <= 3 * 2 * 2 * 2 * 16


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown KV policy"):
        PolicyCache(2, "lru", 8)
    with pytest.raises(ValueError, match="budget"):
        PolicyCache(2, "h2o", 0)
    with pytest.raises(ValueError, match="sink_tokens"):
        PolicyCache(2, "streaming_llm", 4, sink_tokens=4)
