"""Reference DMS cache: generation == teacher-forced hard mask; the cache really drops evicted tokens."""
import pytest
import torch

import dms

# fp32 on CPU; the cached path and the teacher-forced path use different (but exact) attention code,
# so they agree to rounding: 1e-5 absolute on logits of magnitude ~1.
ATOL = 1e-5


def _model(make_tiny_model, randomize, window=3, kv=2, family="llama", **cfg):
    m = make_tiny_model(family, kv_heads=kv)
    dms.retrofit(m, dms.DMSConfig(window=window, **cfg))
    randomize(m, 0.3)
    return m


def _check_generate_equals_teacher_forced(model, ids, am, new=8, **gen):
    out = model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **gen)
    seq = out.sequences
    full_am = torch.cat([am, torch.ones(am.shape[0], seq.shape[1] - am.shape[1], dtype=am.dtype)], 1)
    with torch.no_grad():
        tf = model(seq, attention_mask=full_am).logits
    gen_logits = torch.stack(out.logits, 1)
    T = ids.shape[1]
    torch.testing.assert_close(gen_logits, tf[:, T - 1:-1], atol=ATOL, rtol=0)
    return seq


@pytest.mark.parametrize("kv,window,family,extra", [
    (1, 0, "llama", {}),                       # MQA, immediate eviction
    (2, 3, "qwen3", {}),                       # GQA 2
    (4, 2, "qwen2", {"granularity": "layer"}),  # MHA, one decision per layer
    (2, 2, "mistral", {"retention": "q_neuron"}),
])
def test_greedy_with_cache_equals_teacher_forced(make_tiny_model, randomize, kv, window, family, extra):
    model = _model(make_tiny_model, randomize, window, kv, family, **extra)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (3, 14))
    am = torch.ones(3, 14, dtype=torch.long)
    am[1, :4] = 0
    am[2, :9] = 0
    _check_generate_equals_teacher_forced(model, ids, am)


def test_cache_holds_only_window_plus_kept(make_tiny_model, randomize):
    W = 3
    model = _model(make_tiny_model, randomize, W)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 40))
    cache = dms.DMSCache(model)
    with torch.no_grad():
        model.eval()
        model(ids, past_key_values=cache)
        records = dms.dms_state(model).records
    # Teacher-forced decisions (records of a cache-less forward) predict exactly what the cache holds.
    with torch.no_grad():
        model(ids)
    records = dms.dms_state(model).records
    for li, layer in enumerate(cache.layers):
        ev = records[li]["evict_mask"]  # [B, T, Hkv]
        T = ids.shape[1]
        pos = torch.arange(T)
        expect = ((T - pos[None, :, None]) <= W) | ~ev
        assert torch.equal(layer.held_tokens(), expect.sum(1))
        assert layer.keys.shape[2] == int(layer.held_tokens().max())  # storage == largest head, nothing stale
    s = cache.stats()
    assert s["memory_cr"] > 1.0 and s["tokens_held"] < s["tokens_seen"] * 2 * 2
    assert s["bytes_held"] < s["bytes_dense"]


def test_multi_turn_continues_cache(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (1, 10))
    cache = dms.DMSCache(model)
    out1 = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5,
                          do_sample=False, pad_token_id=0)
    turn2 = torch.cat([out1, torch.randint(3, 97, (1, 6))], 1)
    out2 = model.generate(turn2, attention_mask=torch.ones_like(turn2), past_key_values=cache, max_new_tokens=5,
                          do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        tf = model(out2.sequences).logits
    torch.testing.assert_close(torch.stack(out2.logits, 1), tf[:, turn2.shape[1] - 1:-1], atol=ATOL, rtol=0)
    assert cache.get_seq_length() == out2.sequences.shape[1] - 1


def test_beam_search_and_num_return_sequences(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2)
    ids = torch.randint(3, 97, (2, 8))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=4, do_sample=False,
                         pad_token_id=0, num_return_sequences=2)
    assert out.shape == (4, 12)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=4,
                         pad_token_id=0, num_return_sequences=3)
    assert out.shape == (6, 12)


def test_beam_search_scores_match_reference(make_tiny_model, randomize):
    """Beam search reorders the cache: every returned beam's score equals its teacher-forced log-prob."""
    model = _model(make_tiny_model, randomize, 1)
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (1, 9))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=5, do_sample=False,
                         pad_token_id=0, eos_token_id=None, num_return_sequences=3, output_scores=True,
                         return_dict_in_generate=True, length_penalty=0.0)
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits.float(), -1)
    tgt = out.sequences[:, 9:]
    ref = logp[:, 8:-1].gather(-1, tgt[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, ref, atol=1e-4, rtol=0)


def test_generation_without_dms_cache_is_refused(make_tiny_model):
    from transformers import DynamicCache

    model = dms.retrofit(make_tiny_model(), dms.DMSConfig(window=2))
    ids = torch.randint(3, 97, (1, 5))
    with pytest.raises(ValueError, match="needs a DMSCache"):
        model.generate(ids, max_new_tokens=2, past_key_values=DynamicCache(config=model.config), pad_token_id=0)
