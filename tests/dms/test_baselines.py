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
    reads = {}
    for mode in ("ignore", "count"):
        cache = make_cache(model, "quest", 16, page_size=4, quest_metadata=mode)
        with torch.no_grad():
            out = _chunked_logits(model, ids, cache, 4)
            for _ in range(3):
                model(input_ids=out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
        assert cache.stats()["tokens_held"] == 2 * 2 * 2 * (T + 3)
        assert not torch.allclose(out, ref, atol=1e-3)
        reads[mode] = cache.stats()["decode_kv_reads"]
    # Decode steps hold S = 41, 42, 43 keys: 11 pages of 4, the last (own) one partial with 1, 2, 3 keys.
    # ignore (the older accounting): budget // page_size = 4 pages, 3 full ones + the own page, no metadata.
    assert reads["ignore"] == 2 * 2 * 2 * ((12 + 1) + (12 + 2) + (12 + 3))  # layers x rows x heads x reads
    # count: 11 metadata token-equivalents leave (16 - 11) // 4 = 1 page: the own one.
    assert reads["count"] == 2 * 2 * 2 * ((11 + 1) + (11 + 2) + (11 + 3))


def _quest_layer(budget, page_size, n_prefill, n_decode, mode="count", dense_prefill=False, B=2, H=4, Hkv=2, D=8):
    """A one-layer Quest cache fed random tensors: one prefill call, then decode steps; per-step decode reads."""
    g = torch.Generator().manual_seed(budget * 131 + page_size)
    cache = PolicyCache(1, "quest", budget, page_size=page_size, quest_metadata=mode)
    cache.dense_prefill = dense_prefill

    def step(n):
        q, k, v = (torch.randn(B, h, n, D, generator=g) for h in (H, Hkv, Hkv))
        cache.policy_attend(0, q, k, v, D ** -0.5)

    step(n_prefill)
    per_step = []
    for _ in range(n_decode):
        before = cache.layers[0].decode_reads
        step(1)
        delta = cache.layers[0].decode_reads - before
        assert delta % (B * Hkv) == 0  # every (row, KV head) reads the same number of tokens
        per_step.append(delta // (B * Hkv))
    return cache, per_step


def test_quest_counts_page_metadata_by_hand():
    B, Hkv = 2, 2
    # Prefill 63 keys, then a decode step holding S = 64 keys: 4 pages of 16, metadata 4 token-equivalents,
    # (32 - 4) // 16 = 1 page selected (the query's own one, full): 16 + 4 = 20 reads.
    cache, per_step = _quest_layer(32, 16, 63, 1)
    assert per_step == [20]
    st = cache.stats()
    assert st["decode_kv_reads"] == B * Hkv * 20
    # Non-dense prefill: queries 0..31 read everything they see (no scoring); 32..47 score 3 pages and read their
    # own page (1..16 keys), 48..62 score 4 pages and read their own page (1..15 keys).
    prefill_meta = 16 * 3 + 15 * 4
    assert st["prefill_kv_reads"] == B * Hkv * (sum(range(1, 33)) + sum(range(1, 17)) + sum(range(1, 16)) + prefill_meta)
    assert st["quest_metadata"] == "count"
    assert st["quest_metadata_reads"] == B * Hkv * (prefill_meta + 4)
    assert st["quest_over_budget_queries"] == 0
    # Dense prefill (generation) reads every visible key and no metadata.
    cache, per_step = _quest_layer(32, 16, 63, 1, dense_prefill=True)
    st = cache.stats()
    assert per_step == [20] and st["prefill_kv_reads"] == B * Hkv * sum(range(1, 64))
    assert st["quest_metadata_reads"] == B * Hkv * 4
    # The older accounting: budget // page_size = 2 pages, no metadata.
    cache, per_step = _quest_layer(32, 16, 63, 1, mode="ignore")
    assert per_step == [32] and cache.stats()["quest_metadata_reads"] == 0
    assert "quest_metadata_reads" not in PolicyCache(1, "h2o", 8).stats()


@pytest.mark.parametrize("budget,page_size", [(32, 16), (48, 16), (20, 4), (64, 8), (27, 5)])
def test_quest_decode_reads_within_budget(budget, page_size):
    n_prefill, n_decode = budget - 3, 2 * budget + 40
    cache, per_step = _quest_layer(budget, page_size, n_prefill, n_decode)
    over = 0
    for i, reads in enumerate(per_step):
        S = n_prefill + i + 1
        n_pages = -(-S // page_size)
        own = (S - 1) % page_size + 1
        if S <= budget:
            expected = S  # everything fits: read it all, no metadata
        else:
            k_sel = max(1, (budget - n_pages) // page_size)
            expected = n_pages + (k_sel - 1) * page_size + own  # metadata + full selected pages + own page
        assert reads == expected, (S, reads, expected)
        if budget >= n_pages + page_size:
            assert reads <= budget
        over += reads > budget
    assert over > 0 or budget >= -(-(n_prefill + n_decode) // page_size) + page_size
    assert cache.stats()["quest_over_budget_queries"] == over * 2 * 2  # x rows x KV heads
    assert cache.stats()["quest_metadata_reads"] == 2 * 2 * sum(
        -(-(n_prefill + i + 1) // page_size) for i in range(n_decode) if n_prefill + i + 1 > budget)


def test_quest_ignore_reproduces_the_older_counts():
    budget, P = 20, 4
    cache, per_step = _quest_layer(budget, P, 10, 40, mode="ignore")
    for i, reads in enumerate(per_step):
        S = 10 + i + 1
        n_pages = -(-S // P)
        if n_pages <= budget // P or S <= budget + 1:
            assert reads == S
        else:
            assert reads == (budget // P - 1) * P + (S - 1) % P + 1
    st = cache.stats()
    assert st["quest_metadata"] == "ignore" and st["quest_metadata_reads"] == 0
    assert st["quest_over_budget_queries"] == 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown KV policy"):
        PolicyCache(2, "lru", 8)
    with pytest.raises(ValueError, match="budget"):
        PolicyCache(2, "h2o", 0)
    with pytest.raises(ValueError, match="sink_tokens"):
        PolicyCache(2, "streaming_llm", 4, sink_tokens=4)
    with pytest.raises(ValueError, match=r"quest_metadata 'pages'.*'count', 'ignore'"):
        PolicyCache(2, "quest", 32, quest_metadata="pages")


def test_policy_system_checks_and_records_quest_options(model_and_ids):
    from dms.eval import PolicySystem

    model = model_and_ids[0]
    assert PolicySystem(model, "quest", 8).quest_settings == {"page_size": 16, "quest_metadata": "count"}
    s = PolicySystem(model, "quest", 8, page_size=32, quest_metadata="ignore")
    assert s.quest_settings == {"page_size": 32, "quest_metadata": "ignore"}
    assert s.new_cache(1024).quest_metadata == "ignore" and PolicySystem(model, "h2o", 8).quest_settings is None
    with pytest.raises(ValueError, match="quest_metadata"):
        PolicySystem(model, "quest", 8, quest_metadata="none")
