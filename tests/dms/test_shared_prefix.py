"""Shared-prefix parallel sampling: equals independent per-sample DMS caches; prefix memory constant in W."""
import pytest
import torch

import dms
from dms.shared_prefix import SharedPrefixDMSCache, merge_partials

# fp32 on CPU; shared and independent paths differ only in summation order: 1e-5 on logits.
ATOL = 1e-5


def _model(make_tiny_model, randomize, window, kv):
    m = make_tiny_model("llama", kv_heads=kv)
    dms.retrofit(m, dms.DMSConfig(window=window))
    randomize(m, 0.4)
    return m


@pytest.mark.parametrize("kv,window", [(2, 3), (1, 0), (4, 2)])
def test_sampling_matches_teacher_forced_and_independent(make_tiny_model, randomize, kv, window):
    model = _model(make_tiny_model, randomize, window, kv)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0  # prompts of different lengths
    W, new = 3, 8
    torch.manual_seed(5)
    out = model.generate(ids, attention_mask=am, do_sample=True, max_new_tokens=new, num_return_sequences=W,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    assert seq.shape == (2 * W, 12 + new)
    full_am = torch.cat([am.repeat_interleave(W, 0), torch.ones(2 * W, new, dtype=torch.long)], 1)
    with torch.no_grad():
        tf = model(seq, attention_mask=full_am).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), tf[:, 11:-1], atol=ATOL, rtol=0)
    # the same sampled tokens through independent per-sample caches give the same logits
    ind = model.generate(seq[:, :12], attention_mask=full_am[:, :12], do_sample=False, max_new_tokens=1,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True, dms_shared_prefix=False)
    torch.testing.assert_close(ind.logits[0], out.logits[0], atol=ATOL, rtol=0)


def test_long_generation_grows_and_compacts_suffix(make_tiny_model, randomize, monkeypatch):
    import dms.shared_prefix as sp

    monkeypatch.setattr(sp, "SUFFIX_CAPACITY", 4)
    monkeypatch.setattr(sp, "SUFFIX_COMPACT_EVERY", 5)
    model = _model(make_tiny_model, randomize, 2, 2)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (1, 9))
    W, new = 2, 23
    out = model.generate(ids, do_sample=True, max_new_tokens=new, min_new_tokens=new, num_return_sequences=W,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        tf = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), tf[:, 8:-1], atol=ATOL, rtol=0)


def test_prefix_stored_once(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2, 2)
    ids = torch.randint(3, 97, (1, 30))
    sizes = {}
    for W in (2, 8):
        cache = SharedPrefixDMSCache.from_prompts(model, ids, None, W)
        model.generate(ids.repeat_interleave(W, 0), past_key_values=cache, do_sample=True, max_new_tokens=4,
                       pad_token_id=0)
        st = cache.stats()
        sizes[W] = st["prefix_bytes"]
        assert st["prefix_entries_held"] < 30 * 2 * 2  # pruned: fewer than every (layer, head, token)
        assert st["per_sample_entries_held"] > st["tokens_held"]  # samples share what they see
    assert sizes[2] == sizes[8]


def test_beam_search_and_chunks_refused(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2, 2)
    ids = torch.randint(3, 97, (1, 10))
    cache = SharedPrefixDMSCache.from_prompts(model, ids, None, 2)
    with pytest.raises(ValueError, match="one token per step"):
        model(torch.randint(3, 97, (2, 3)), past_key_values=cache)
    # beam search falls back to independent caches automatically (not an error)
    out = model.generate(ids, num_beams=2, num_return_sequences=2, max_new_tokens=3, pad_token_id=0)
    assert out.shape == (2, 13)


def test_merge_partials_exact():
    torch.manual_seed(0)
    s = torch.randn(3, 10)
    v = torch.randn(10, 4)
    full = torch.softmax(s, -1) @ v
    a, b = s[:, :6], s[:, 6:]
    oa, ob = torch.softmax(a, -1) @ v[:6], torch.softmax(b, -1) @ v[6:]
    out = merge_partials(oa, torch.logsumexp(a, -1), ob, torch.logsumexp(b, -1))
    torch.testing.assert_close(out, full)
    empty = merge_partials(torch.zeros(3, 4), torch.full((3,), float("-inf")), ob, torch.logsumexp(b, -1))
    torch.testing.assert_close(empty, ob)


def test_prefix_prefilled_through_paged_cache_equals_reference(make_tiny_model, randomize):
    """The prompt prefilled through the paged cache (the CUDA default) shares the same prefix as through the
    reference cache: identical held keys and identical shared-prefix decode logits."""
    model = _model(make_tiny_model, randomize, 2, 2)
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 15))
    am = torch.ones(2, 15, dtype=torch.long)
    am[0, :5] = 0
    W = 2
    caches = {k: SharedPrefixDMSCache.from_prompts(model, ids, am, W, prefill_cache=k) for k in ("paged", "reference")}
    for a, b in zip(caches["paged"].layers, caches["reference"].layers):
        for t in ("ppos", "pevict", "pseen"):
            x, y = getattr(a, t), getattr(b, t)
            assert x.shape == y.shape and torch.equal(x, y), t
        held = a.ppos >= 0
        torch.testing.assert_close(a.pk[held], b.pk[held], atol=ATOL, rtol=0)  # later layers: summation order
    tok = ids[:, -1:].repeat_interleave(W, 0)
    pos = (am.sum(-1, keepdim=True) - 1).repeat_interleave(W, 0)
    outs = []
    for k in ("paged", "reference"):
        with torch.no_grad():
            outs.append(model(tok, position_ids=pos, past_key_values=caches[k], use_cache=True).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
