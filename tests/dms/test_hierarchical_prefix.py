"""Hierarchical sharing: one system prompt over several user prompts, W samples each.

Three levels (system part held once for all rows, each prompt's own part, each sample's suffix) must
give exactly what independent per-sample DMS caches give: the teacher-forced hard-mask logits (fp32).
"""
import pytest
import torch

import dms
from dms.cache import DMSCacheLayer
from dms.shared_prefix import SharedPrefixDMSCache, split_system

ATOL = 1e-5


def _model(make_tiny_model, randomize, window, kv, **kw):
    m = make_tiny_model("llama", kv_heads=kv, **kw)
    dms.retrofit(m, dms.DMSConfig(window=window, **({"attention_impl": "eager"} if kw else {})))
    randomize(m, 0.4)
    return m.eval()


def _prompts(P0=14, users=(5, 9, 2), seed=0):
    """Left-padded batch: the same system prompt of P0 tokens, then user prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 97, (P0,), generator=g)
    T = P0 + max(users)
    ids = torch.zeros(len(users), T, dtype=torch.long)
    am = torch.zeros(len(users), T, dtype=torch.long)
    for i, u in enumerate(users):
        row = torch.cat([system, torch.randint(3, 97, (u,), generator=g)])
        ids[i, T - len(row):] = row
        am[i, T - len(row):] = 1
    return ids, am


def _teacher_forced(model, seq, full_am):
    with torch.no_grad():
        return model(seq, attention_mask=full_am).logits


@pytest.mark.parametrize("kv,window,users", [(2, 3, (5, 9, 2)), (1, 0, (1, 4)), (4, 2, (3, 3, 7)), (2, 1, (6,))])
def test_generate_with_system_prompt_matches_teacher_forced(make_tiny_model, randomize, kv, window, users):
    model = _model(make_tiny_model, randomize, window, kv)
    P0 = 14
    ids, am = _prompts(P0, users)
    G, T = ids.shape
    W, new = 3, 8
    torch.manual_seed(5)
    out = model.generate(ids, attention_mask=am, do_sample=True, max_new_tokens=new, num_return_sequences=W,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True, dms_system_len=P0)
    seq = out.sequences
    assert seq.shape == (G * W, T + new)
    full_am = torch.cat([am.repeat_interleave(W, 0), torch.ones(G * W, new, dtype=torch.long)], 1)
    tf = _teacher_forced(model, seq, full_am)
    torch.testing.assert_close(torch.stack(out.logits, 1), tf[:, T - 1:-1], atol=ATOL, rtol=0)
    # the same tokens through the two-level shared cache and through independent caches
    torch.manual_seed(5)
    two = model.generate(ids, attention_mask=am, do_sample=True, max_new_tokens=new, num_return_sequences=W,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(two.logits, 1), torch.stack(out.logits, 1), atol=ATOL, rtol=0)


def test_system_level_held_once_and_split(make_tiny_model, randomize):
    window, P0 = 2, 20
    model = _model(make_tiny_model, randomize, window, 2)
    ids, am = _prompts(P0, (4, 7, 3))
    flat = SharedPrefixDMSCache.from_prompts(model, ids, am, 2)
    sizes = {}
    for W in (1, 4):
        cache = SharedPrefixDMSCache.from_prompts(model, ids, am, W, system_len=P0)
        first_q = int((am.sum(-1) - 1).min())
        assert cache.system_cutoff == min(P0 - 1, first_q - 1, first_q - window) == 19
        for lh, lf in zip(cache.layers, flat.layers):
            assert lh.sk.shape[0] == 1 and bool((lh.spos < cache.system_cutoff).all())
            assert bool((lh.ppos[lh.ppos >= 0] >= cache.system_cutoff).all())
            # every row sees the same set of entries as through the two-level cache: system + its own
            for g in range(ids.shape[0]):
                for h in range(lh.pk.shape[1]):
                    sys_pos = lh.spos[0, h][lh.spos[0, h] >= 0].tolist()
                    got = sorted(sys_pos + lh.ppos[g, h][lh.ppos[g, h] >= 0].tolist())
                    want = sorted(lf.ppos[g, h][lf.ppos[g, h] >= 0].tolist())
                    assert got == want
                    for p in lh.spos[0, h][lh.spos[0, h] >= 0].tolist():
                        i = (lf.ppos[g, h] == p).nonzero()[0, 0]
                        j = (lh.spos[0, h] == p).nonzero()[0, 0]
                        torch.testing.assert_close(lh.sk[0, h, j], lf.pk[g, h, i], atol=ATOL, rtol=0)
        model.generate(ids.repeat_interleave(W, 0), attention_mask=am.repeat_interleave(W, 0), past_key_values=cache,
                       do_sample=True, max_new_tokens=3, pad_token_id=0)
        st = cache.stats()
        assert st["system_prefix_entries_held"] > 0 and st["system_len"] == P0
        sizes[W] = st["system_prefix_bytes"]
        per_prompt = st["prefix_entries_held"]
        assert per_prompt + st["system_prefix_entries_held"] * ids.shape[0] == sum(
            int((l.ppos >= 0).sum()) for l in flat.layers)
        assert st["tokens_held"] == per_prompt + st["system_prefix_entries_held"] + st["suffix_entries_held"]
    assert sizes[1] == sizes[4] > 0


def test_system_len_validation(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2, 2)
    ids, am = _prompts(10, (3, 5))
    bad = ids.clone()
    bad[1, -1 - 5 - 2] += 1  # row 1's 8th system token (its user part is the last 5 columns)
    with pytest.raises(ValueError, match="system_len=10"):
        SharedPrefixDMSCache.from_prompts(model, bad, am, 2, system_len=10)
    SharedPrefixDMSCache.from_prompts(model, bad, am, 2, system_len=7)  # the first 7 still agree
    with pytest.raises(ValueError, match="system_len=14"):
        SharedPrefixDMSCache.from_prompts(model, ids, am, 2, system_len=14)  # longer than the shortest prompt
    with pytest.raises(ValueError, match="system_len"):
        model.generate(bad, attention_mask=am, do_sample=True, max_new_tokens=2, num_return_sequences=2,
                       pad_token_id=0, dms_system_len=10)
    # too short to share anything: no system level, still exact
    c = SharedPrefixDMSCache.from_prompts(model, ids, am, 2, system_len=2)
    assert c.system_cutoff == 1 and c.stats()["system_prefix_bytes"] >= 0


def test_split_system_disagreeing_head_stays_per_prompt():
    """A head whose rows hold different entries below the cutoff (a rounding flip) keeps them per prompt."""
    layer = DMSCacheLayer()
    G, Hkv, S, D = 2, 2, 6, 3
    layer.keys = torch.randn(G, Hkv, S, D)
    layer.values = torch.randn(G, Hkv, S, D)
    pos = torch.tensor([0, 1, 2, 3, 4, 5]).expand(G, Hkv, S).clone()
    pos[1, 1, 1] = -1  # row 1, head 1: token 1 evicted and dropped
    layer.pos = pos
    layer.evict = torch.zeros(G, Hkv, S, dtype=torch.bool)
    layer.evict[:, :, 0] = True  # evicted, below the cutoff: dead for every row
    k0, v0 = layer.keys[0, 0, 1:3].clone(), layer.values[0, 0, 1:3].clone()
    (sk, sv, spos), agree = split_system(layer, 3)
    assert agree.tolist() == [True, False]
    assert spos[0, 0].tolist() == [1, 2] and spos[0, 1].tolist() == [-1, -1]
    assert torch.equal(sk[0, 0], k0) and torch.equal(sv[0, 0], v0)  # row 0's copy
    assert layer.pos[0, 0].tolist()[:3] == [3, 4, 5]
    assert sorted(p for p in layer.pos[1, 1].tolist() if p >= 0) == [2, 3, 4, 5]
    assert sorted(p for p in layer.pos[0, 1].tolist() if p >= 0) == [1, 2, 3, 4, 5]


def test_hierarchical_cache_static_steps_equal_teacher_forced(make_tiny_model, randomize, monkeypatch,
                                                              shared_decode_check):
    """Static-mode steps (GraphedDecodeStep, cuda_graph=False on CPU) through the three-level cache."""
    import dms.shared_prefix as sp

    monkeypatch.setattr(sp, "SUFFIX_CAPACITY", 4)
    monkeypatch.setattr(sp, "SUFFIX_COMPACT_EVERY", 5)
    model = _model(make_tiny_model, randomize, 2, 2, heads=4, hidden=64, head_dim=16)
    P0 = 12
    ids, am = _prompts(P0, (2, 6), seed=3)
    W, new = 3, 20
    cache = sp.SharedPrefixDMSCache.from_prompts(model, ids, am, W, system_len=P0)
    assert cache.stats()["system_prefix_entries_held"] > 0
    logits, tf = shared_decode_check(model, cache, ids, am, W, new, horizon=6, cuda_graph=False)
    torch.testing.assert_close(logits, tf, atol=ATOL, rtol=0)
    st = cache.stats()
    assert st["samples_per_prompt"] == W and st["memory_cr"] > 1.0 and st["system_prefix_bytes"] > 0


def test_paged_prefill_and_triton_prefix_kernel(make_tiny_model, randomize, monkeypatch):
    """Prefill through the paged cache (the CUDA default) splits the same levels as the reference cache, and the
    decode through the Triton prefix kernel (interpreter on CPU: system level = one group of G * W rows) is exact."""
    import dms.shared_prefix as sp
    from dms_kernels.prefix_attention import prefix_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel: compiled on CUDA, interpreted on CPU
    model = _model(make_tiny_model, randomize, 1, 2).to(dev)
    P0 = 13
    ids, am = (t.to(dev) for t in _prompts(P0, (3, 1, 5), seed=7))
    G, T = ids.shape
    W = 2
    caches = {k: SharedPrefixDMSCache.from_prompts(model, ids, am, W, prefill_cache=k, system_len=P0)
              for k in ("paged", "reference")}
    for a, b in zip(caches["paged"].layers, caches["reference"].layers):
        for t in ("spos", "ppos", "pevict", "pseen"):
            x, y = getattr(a, t), getattr(b, t)
            assert x.shape == y.shape and torch.equal(x, y), t
        torch.testing.assert_close(a.sk, b.sk, atol=ATOL if dev == "cpu" else 1e-4, rtol=0)
    assert caches["reference"].stats()["system_prefix_entries_held"] > 0

    def triton_prefix(query, keys, values, visible, scaling, samples, length=None):
        return prefix_attention(query, keys, values, visible, scaling, samples, impl="triton", length=length)

    monkeypatch.setattr(sp, "_prefix_attention", triton_prefix)
    g = torch.Generator().manual_seed(1)
    chosen = torch.randint(3, 97, (G * W, 4), generator=g).to(ids.device)
    tok = ids[:, -1:].repeat_interleave(W, 0)
    pos = (am.sum(-1, keepdim=True) - 1).repeat_interleave(W, 0)
    cache = caches["paged"]
    logits = []
    for i in range(chosen.shape[1]):
        with torch.no_grad():
            logits.append(model(tok, position_ids=pos + i, past_key_values=cache, use_cache=True).logits[:, -1])
        tok = chosen[:, i:i + 1]
    seq = torch.cat([ids.repeat_interleave(W, 0), chosen], 1)
    full_am = torch.cat([am.repeat_interleave(W, 0), torch.ones_like(chosen)], 1)
    tf = _teacher_forced(model, seq, full_am)
    torch.testing.assert_close(torch.stack(logits, 1), tf[:, T - 1:-1], atol=1e-4, rtol=0)


def test_one_sample_per_prompt_greedy(make_tiny_model, randomize, monkeypatch):
    """num_return_sequences=1 with dms_system_len: G prompts share the system level (W = 1)."""
    built = []
    orig = SharedPrefixDMSCache.from_prompts.__func__

    def spy(cls, *a, **k):
        built.append(orig(cls, *a, **k))
        return built[-1]

    monkeypatch.setattr(SharedPrefixDMSCache, "from_prompts", classmethod(spy))
    model = _model(make_tiny_model, randomize, 2, 2)
    ids, am = _prompts(16, (2, 5))
    T = ids.shape[1]
    out = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=6, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, dms_system_len=16)
    ref = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=6, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    assert len(built) == 1 and built[0].system_len == 16 and built[0].stats()["system_prefix_bytes"] > 0
    assert torch.equal(out.sequences, ref.sequences)
    full_am = torch.cat([am, torch.ones(2, 6, dtype=torch.long)], 1)
    tf = _teacher_forced(model, out.sequences, full_am)
    torch.testing.assert_close(torch.stack(out.logits, 1), tf[:, T - 1:-1], atol=ATOL, rtol=0)


def test_generate_through_graph_decoding_with_system_prompt(make_tiny_model, randomize):
    from dms.graphs import disable_graph_decoding, enable_graph_decoding

    model = _model(make_tiny_model, randomize, 2, 2, heads=4, hidden=64, head_dim=16)
    ids, am = _prompts(12, (3, 6), seed=2)
    kw = dict(attention_mask=am, max_new_tokens=9, do_sample=True, num_return_sequences=2, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True, dms_system_len=12)
    torch.manual_seed(3)
    plain = model.generate(ids, **kw)
    enable_graph_decoding(model, horizon=4, cuda_graph=False)
    try:
        torch.manual_seed(3)
        graphed = model.generate(ids, **kw)
    finally:
        disable_graph_decoding(model)
    assert torch.equal(graphed.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(graphed.logits, 1), torch.stack(plain.logits, 1), atol=ATOL, rtol=0)


def test_system_len_refused_where_it_cannot_apply(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2, 2)
    ids, am = _prompts(14, (5, 9))
    kw = dict(attention_mask=am, max_new_tokens=2, pad_token_id=0, dms_system_len=14)
    with pytest.raises(ValueError, match="dms_system_len=14"):
        model.generate(ids, dms_shared_prefix=False, **kw)
    with pytest.raises(ValueError, match="dms_system_len=14"):
        model.generate(ids, past_key_values=dms.DMSCache(model), **kw)
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(ids, num_beams=2, **kw)
