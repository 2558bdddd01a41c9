"""Paged DMS cache (dms/paged_cache.py) == teacher-forced hard mask == reference cache; allocator invariants.

CPU runs the PyTorch references of the kernels (backend "torch"); on CUDA the same tests run the Triton
kernels (backend "auto" -> "triton"). fp32 everywhere; tolerance on logits of magnitude ~1:
  CPU 1e-5 absolute (the cached and teacher-forced paths are exact fp32 but sum in different orders),
  CUDA 2e-4 (the Triton kernels accumulate in a different order, TF32 is off for fp32 inputs).
"""
import pytest
import torch

import dms
from dms.paged_cache import PagedDMSCache, PagedDMSCacheLayer, make_cache

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
ATOL = 2e-4 if CUDA else 1e-5
# head_dim 64 on CUDA (the Triton kernels take 16..256 powers of two); 16 keeps CPU fast
HD = 64 if CUDA else 16


def _model(make_tiny_model, randomize, window=3, kv=2, heads=4, family="llama", **cfg):
    m = make_tiny_model(family, kv_heads=kv, heads=heads, hidden=heads * HD, head_dim=HD)
    dms.retrofit(m, dms.DMSConfig(window=window, attention_impl="eager", **cfg))
    randomize(m, 0.3)
    return m.to(DEV)


def _cache(m, **kw):
    kw.setdefault("page_size", 16)
    return PagedDMSCache(m, **kw)


def _generate(model, ids, am, cache, new=8, **gen):
    return model.generate(ids, attention_mask=am, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0, past_key_values=cache, **gen)


def _teacher_forced(model, seq, am):
    full_am = torch.cat([am, torch.ones(am.shape[0], seq.shape[1] - am.shape[1], dtype=am.dtype, device=am.device)], 1)
    with torch.no_grad():
        return model(seq, attention_mask=full_am).logits


@pytest.mark.parametrize("kv,heads,window,family,chunk", [
    (1, 8, 0, "llama", 8192),   # GQA 8 (MQA), immediate eviction
    (2, 8, 3, "qwen3", 5),      # GQA 4, chunked prefill (chunks of 5 columns)
    (8, 8, 2, "qwen2", 8192),   # GQA 1 (MHA)
    (2, 4, 1, "mistral", 4),    # window 1, chunked
])
def test_generate_equals_teacher_forced_and_reference(make_tiny_model, randomize, kv, heads, window, family, chunk):
    model = _model(make_tiny_model, randomize, window, kv, heads, family)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (3, 14), device=DEV)
    am = torch.ones(3, 14, dtype=torch.long, device=DEV)
    am[1, :4] = 0  # left padding: never cached
    am[2, :9] = 0
    paged = _cache(model, prefill_chunk=chunk)
    out = _generate(model, ids, am, paged, new=10)
    tf = _teacher_forced(model, out.sequences, am)
    torch.testing.assert_close(torch.stack(out.logits, 1), tf[:, ids.shape[1] - 1:-1], atol=ATOL, rtol=0)
    ref_cache = dms.DMSCache(model)
    ref = _generate(model, ids, am, ref_cache, new=10)
    assert torch.equal(ref.sequences, out.sequences)
    s, r = paged.stats(), ref_cache.stats()
    for k in ("tokens_seen", "tokens_held", "memory_cr", "memory_cr_per_layer", "memory_cr_per_head", "bytes_held",
              "bytes_dense", "held_per_call"):
        assert s[k] == r[k], k
    if chunk >= 14:  # one chunk per prefill: the peak is the reference's; chunked prefill peaks lower
        assert s["peak_tokens_held"] == r["peak_tokens_held"]
    else:
        assert s["peak_tokens_held"] <= r["peak_tokens_held"]


def test_cache_holds_exactly_window_plus_kept(make_tiny_model, randomize):
    W = 3
    model = _model(make_tiny_model, randomize, W)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 40), device=DEV)
    cache = _cache(model, prefill_chunk=7)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids)
    records = dms.dms_state(model).records
    T = ids.shape[1]
    pos = torch.arange(T, device=DEV)
    for li, layer in enumerate(cache.layers):
        ev = records[li]["evict_mask"]
        expect = ((T - pos[None, :, None]) <= W) | ~ev
        assert torch.equal(layer.held_tokens(), expect.sum(1))
        assert torch.equal(layer.seq_len.view(2, -1).long(), expect.sum(1))  # no stale slot after a prefill
        layer.check_allocator()
    s = cache.stats()
    assert s["memory_cr"] > 1.0 and s["bytes_live"] < s["bytes_dense"]
    assert len(s["tokens_held_per_layer_head"]) == 2


def test_slots_recycled_during_decode(make_tiny_model, randomize):
    """Long decode with eviction: a stream's slots never exceed what it holds at once (+ one hole)."""
    model = _model(make_tiny_model, randomize, 2, kv=2)
    ids = torch.randint(3, 97, (2, 5), device=DEV)
    cache = _cache(model)
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=40,
                   do_sample=False, pad_token_id=0, eos_token_id=None)
    for layer in cache.layers:
        layer.check_allocator()
        assert int(layer.seq_len.max()) <= int(layer.now.max()) + 1
    s = cache.stats()
    assert s["memory_cr"] > 1.5 and s["bytes_allocated"] >= s["bytes_live"]


def test_multi_turn_continues_cache(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (1, 10), device=DEV)
    cache = _cache(model, prefill_chunk=4)
    out1 = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5,
                          do_sample=False, pad_token_id=0)
    turn2 = torch.cat([out1, torch.randint(3, 97, (1, 6), device=DEV)], 1)
    out2 = _generate(model, turn2, torch.ones_like(turn2), cache, new=5)
    with torch.no_grad():
        tf = model(out2.sequences).logits
    torch.testing.assert_close(torch.stack(out2.logits, 1), tf[:, turn2.shape[1] - 1:-1], atol=ATOL, rtol=0)
    assert cache.get_seq_length() == out2.sequences.shape[1] - 1


def test_beam_search_sampling_and_num_return_sequences(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 1)
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (1, 9), device=DEV)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=5, do_sample=False,
                         pad_token_id=0, eos_token_id=None, num_return_sequences=3, output_scores=True,
                         return_dict_in_generate=True, length_penalty=0.0, past_key_values=_cache(model))
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits.float(), -1)
    ref = logp[:, 8:-1].gather(-1, out.sequences[:, 9:, None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, ref, atol=1e-4, rtol=0)
    ids2 = torch.randint(3, 97, (2, 8), device=DEV)
    out = model.generate(ids2, attention_mask=torch.ones_like(ids2), do_sample=True, max_new_tokens=4,
                         pad_token_id=0, num_return_sequences=3, past_key_values=_cache(model))
    assert out.shape == (6, 12)


def test_streamer_and_stop_strings(make_tiny_model, randomize):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = _model(make_tiny_model, randomize, 2)
    model._dms_cache_kind = "paged"  # what dms.load(..., cache="paged") sets; generate() builds the cache
    ids = torch.randint(3, 97, (1, 6), device=DEV)
    st = Collect()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0, eos_token_id=None, streamer=st)
    assert st.chunks[-1] is None and len(st.chunks) == 1 + 5 + 1
    # transformers hands the streamer CPU tensors
    assert torch.equal(torch.cat([c.view(-1).cpu() for c in st.chunks[1:-1]]), out[0, 6:].cpu())


def test_batch_select_frees_pages_and_shrinks(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2)
    ids = torch.randint(3, 97, (4, 30), device=DEV)
    cache = _cache(model)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    before = cache.stats()
    held_row0 = [l.held_tokens()[0].clone() for l in cache.layers]
    cache.batch_select_indices(torch.tensor([0], device=DEV))  # three sequences finished
    after = cache.stats()
    for l, h in zip(cache.layers, held_row0):
        l.check_allocator()
        assert torch.equal(l.held_tokens()[0], h)
    assert after["pages_in_use"] < before["pages_in_use"]
    assert after["bytes_allocated"] < before["bytes_allocated"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocator_randomised(seed):
    """Random decode steps, padding rows, prefills and batch ops on one layer with a tiny pool:
    no page used twice, none leaked, the pool grows under pressure and shrinks when rows finish."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv, H, D, W = 3, 2, 4, 16, 2
    layer = PagedDMSCacheLayer(page_size=16, backend="triton" if CUDA else "torch", initial_pages_per_stream=1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEV)

    def step(Tn, B, p_evict):
        lg = torch.where(torch.rand(B, Tn, Hkv, generator=g) < p_evict, 1.0, -1.0).to(DEV)
        valid = (torch.rand(B, Tn, generator=g) > 0.1).to(DEV)
        out = layer.attend(rnd(B, H, Tn, D), rnd(B, Hkv, Tn, D), rnd(B, Hkv, Tn, D), lg, valid, W, 0.25)
        assert not torch.isnan(out).any()
        layer.check_allocator()

    step(20, B, 0.5)
    cap0 = layer.capacity
    for _ in range(120):
        step(1, B, 0.2)  # mostly kept: streams grow past the initial pool
    assert layer.grow_events > 0 and layer.capacity > cap0
    step(9, B, 0.5)  # a multi-turn chunk after decoding
    for _ in range(10):
        step(1, B, 0.9)
    used, _ = layer.check_allocator()
    held = layer.held_tokens().clone()
    layer.batch_repeat_interleave(2)  # repacks: dead slots and holes are compacted away
    assert torch.equal(layer.held_tokens(), held.repeat_interleave(2, 0))
    assert layer.check_allocator()[0] <= 2 * used
    layer.batch_select_indices(torch.tensor([0], device=DEV))
    used1, free1 = layer.check_allocator()
    assert used1 < used and layer.capacity <= 2 * (used1 + 2 * Hkv)
    for _ in range(5):
        step(1, 1, 0.5)


def test_factory_and_errors(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize, 2)
    assert isinstance(make_cache(model, "paged"), PagedDMSCache)
    assert isinstance(make_cache(model, "reference"), dms.DMSCache)
    assert isinstance(make_cache(model, "auto"), PagedDMSCache if CUDA else dms.DMSCache)
    with pytest.raises(ValueError, match="cache must be one of"):
        make_cache(model, "dense")
    with pytest.raises(ValueError, match="page_size"):
        PagedDMSCache(model, page_size=24)
    with pytest.raises(ValueError, match="backend"):
        PagedDMSCache(model, backend="cuda")


def test_prompt_repack_deferred_by_one_layer(make_tiny_model, randomize):
    """A prompt's repack of layer i runs when layer i + 1 has queued its attention; the last layer's stays
    pending until something reads it. Outputs, generations and stats equal those of immediate repacks."""
    model = _model(make_tiny_model, randomize, 2, kv=2)
    assert len(model.model.layers) >= 2
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 23), device=DEV)
    lazy, eager = _cache(model), _cache(model)
    for layer in eager.layers:
        layer.defer_pack = False
    with torch.no_grad():
        a = model(ids, past_key_values=lazy).logits
        b = model(ids, past_key_values=eager).logits
    assert torch.equal(a, b)
    last = len(lazy.layers) - 1
    assert [l._pending is not None for l in lazy.layers] == [i == last for i in range(last + 1)]
    assert lazy._deferred == [last]
    assert all(l._pending is None for l in eager.layers) and eager._deferred == []
    # the pending layer answers readers as if it had repacked at once
    assert torch.equal(lazy.layers[last].held_tokens(), eager.layers[last].held_tokens())
    assert lazy.layers[last]._pending is None
    for x, y in zip(lazy.layers, eager.layers):
        for name in ("seq_len", "held", "now", "block_table", "ring_slot", "ring_ev", "pos_pool"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
    # a second prompt (multi-turn) and decoding continue identically; stats flush every layer
    more = torch.randint(3, 97, (2, 6), device=DEV)
    ga = _generate(model, torch.cat([ids, more], 1), torch.ones(2, 29, dtype=torch.long, device=DEV), lazy, new=6)
    gb = _generate(model, torch.cat([ids, more], 1), torch.ones(2, 29, dtype=torch.long, device=DEV), eager, new=6)
    assert torch.equal(ga.sequences, gb.sequences)
    torch.testing.assert_close(torch.stack(ga.logits, 1), torch.stack(gb.logits, 1), atol=0, rtol=0)
    sa, sb = lazy.stats(), eager.stats()
    assert lazy._deferred == [] and all(l._pending is None for l in lazy.layers)
    for k in ("tokens_held", "memory_cr_per_head", "held_per_call", "peak_tokens_held", "bytes_allocated"):
        assert sa[k] == sb[k], k
    for layer in lazy.layers:
        layer.check_allocator()


def test_auto_backend_uses_torch_for_head_dims_triton_cannot_take(make_tiny_model, monkeypatch):
    """backend='auto' picks Triton for a CUDA model, but not when the model's head dim is outside the kernels'
    set: then the PyTorch backend, with a warning (a GPU run of the test suite met this with head dim 8)."""
    from dms import paged_cache as pc
    from dms_kernels.decode_attention import triton_decode
    from dms_kernels.train_attention import _SUPPORTED_D

    assert pc.TRITON_HEAD_DIMS == triton_decode._SUPPORTED_D == _SUPPORTED_D
    model = make_tiny_model(head_dim=8)
    assert pc._triton_unsupported(model) == f"head dim 8 (supported: {pc.TRITON_HEAD_DIMS})"
    assert pc._triton_unsupported(make_tiny_model(head_dim=16)) is None

    class _Cuda:  # a parameter that reports a CUDA device (the cache only reads its .device)
        device = torch.device("cuda")

    monkeypatch.setattr(type(model), "parameters", lambda self, recurse=True: iter([_Cuda()]))
    with pytest.warns(UserWarning, match="head dim 8"):
        cache = PagedDMSCache(model, num_layers=2)
    assert cache.backend == "torch"
