"""Static-mode decoding and CUDA-graph replay (dms/graphs.py) == ordinary paged decoding == model.generate.

CPU (CI): the static-mode step runs eagerly (``cuda_graph=False``) through the PyTorch references and,
in one test, through the Triton kernels under the interpreter; the horizon is short so that the cache
re-arms (reserves pages again) several times within one generation. On CUDA the same tests also
capture and replay real CUDA graphs. Greedy tokens must be identical; logits within 1e-5 (fp32 CPU)
or 2e-4 (CUDA, where replays and eager steps may pick different kernels' summation orders).
"""
import pytest
import torch

import dms
from dms.graphs import GraphedDecodeStep, fast_generate
from dms.paged_cache import PagedDMSCache

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
HD = 64 if CUDA else 16
ATOL = 2e-4 if CUDA else 1e-5


def _model(make_tiny_model, randomize, window=2, kv=2, heads=4, family="llama"):
    m = make_tiny_model(family, kv_heads=kv, heads=heads, hidden=heads * HD, head_dim=HD)
    dms.retrofit(m, dms.DMSConfig(window=window, attention_impl="eager"))
    randomize(m, 0.3)
    return m.to(DEV).eval()


def _prompts():
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (3, 13), device=DEV)
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding: never cached
    am[2, :8] = 0
    return ids, am


@pytest.mark.parametrize("graph", [False] + ([True] if CUDA else []))
@pytest.mark.parametrize("kv,heads,window,family", [(2, 4, 2, "llama"), (1, 8, 0, "qwen3"), (4, 4, 3, "qwen2")])
def test_fast_generate_equals_generate(make_tiny_model, randomize, graph, kv, heads, window, family):
    model = _model(make_tiny_model, randomize, window, kv, heads, family)
    ids, am = _prompts()
    ref = model.generate(ids, attention_mask=am, max_new_tokens=40, do_sample=False, pad_token_id=0,
                         past_key_values=PagedDMSCache(model, page_size=16), output_logits=True,
                         return_dict_in_generate=True)
    out = fast_generate(model, ids, am, max_new_tokens=40, cuda_graph=graph, horizon=7, page_size=16)
    assert torch.equal(out.sequences, ref.sequences)
    if graph:
        assert out.captures >= 5  # 39 decode steps with a horizon of 7: the cache re-armed repeatedly
    # the cache ends in the same state as the ordinary path's: same tokens held per head
    ref_cache = PagedDMSCache(model, page_size=16)
    model.generate(ids, attention_mask=am, max_new_tokens=40, do_sample=False, pad_token_id=0,
                   past_key_values=ref_cache)
    s, r = out.cache.stats(), ref_cache.stats()
    for k in ("tokens_seen", "tokens_held", "memory_cr_per_head"):
        assert s[k] == r[k], k
    for layer in out.cache.layers:
        layer.check_allocator()


def test_static_steps_match_eager_logits(make_tiny_model, randomize):
    """Step by step: static-mode (and, on CUDA, replayed) logits == ordinary decode logits."""
    model = _model(make_tiny_model, randomize)
    ids, am = _prompts()
    pos0 = am.sum(-1, keepdim=True)
    caches, logits = [], []
    for _ in range(2):
        c = PagedDMSCache(model, page_size=16)
        with torch.no_grad():
            lg = model(ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0), past_key_values=c,
                       use_cache=True).logits[:, -1]
        caches.append(c)
        logits.append(lg)
    torch.testing.assert_close(logits[0], logits[1])
    step = GraphedDecodeStep(model, caches[1], horizon=5, cuda_graph=CUDA)
    tok = logits[0].argmax(-1)[:, None]
    for i in range(23):
        with torch.no_grad():
            a = model(tok, position_ids=pos0 + i, past_key_values=caches[0], use_cache=True).logits[:, -1]
        b = step(tok, pos0 + i).clone()
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
        tok = a.argmax(-1)[:, None]
    step.close()
    # after close the cache is ordinary again: a multi-token chunk (multi-turn) works
    more = torch.randint(3, 97, (3, 4), device=DEV)
    with torch.no_grad():
        x = model(more, past_key_values=caches[0], use_cache=True).logits
        y = model(more, past_key_values=caches[1], use_cache=True).logits
    torch.testing.assert_close(y, x, atol=ATOL, rtol=0)


def test_static_mode_reserves_and_guards(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize)
    ids, am = _prompts()
    cache = PagedDMSCache(model, page_size=16)
    with torch.no_grad():
        model(ids, attention_mask=am, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    layer.begin_static(40)
    free_before, cap = int(layer.free_top[0]), layer.capacity
    assert free_before >= layer.N * (40 // 16 + 2)  # enough pages for 40 appends per stream
    assert layer.block_table.shape[1] * 16 >= layer._static_max_len
    with pytest.raises(RuntimeError, match="static"):
        layer.batch_select_indices(torch.tensor([0, 1]))
    q = torch.zeros(3, 4, 2, HD, device=DEV)
    kv = torch.zeros(3, 2, 2, HD, device=DEV)
    with pytest.raises(RuntimeError, match="end_static"):
        layer.attend(q, kv, kv, torch.zeros(3, 2, 2, device=DEV), None, 2, 1.0)
    with pytest.raises(RuntimeError, match="reserved"):
        layer.advance_static(41)
    layer.end_static()
    assert layer.capacity == cap
    with pytest.raises(ValueError, match="horizon"):
        GraphedDecodeStep(model, cache, horizon=0)
    with pytest.raises(ValueError, match="PagedDMSCache"):
        GraphedDecodeStep(model, dms.DMSCache(model))
    fresh = PagedDMSCache(model, page_size=16)
    with pytest.raises(ValueError, match="prompt"):
        GraphedDecodeStep(model, fresh)


def test_fast_generate_eos_sampling_and_triton_interpreter(make_tiny_model, randomize):
    model = _model(make_tiny_model, randomize)
    ids, am = _prompts()
    greedy = fast_generate(model, ids, am, max_new_tokens=12, eos_token_id=[], cuda_graph=False, page_size=16)
    # eos: the first token row 0 emits that it did not emit before (so row 0 stops exactly there; a fixed
    # position failed on the GPU, where the random model had already emitted that token earlier)
    new = greedy.sequences[0, ids.shape[1]:].tolist()
    k = next((i for i in range(1, len(new) - 1) if new[i] not in new[:i]), 0)
    eos = new[k]
    out = fast_generate(model, ids, am, max_new_tokens=12, eos_token_id=eos, pad_token_id=1, cuda_graph=False,
                        page_size=16)
    gen = out.sequences[:, ids.shape[1]:]
    assert gen[0, k] == eos and bool((gen[0, k + 1:] == 1).all())
    g1, g2 = torch.Generator(device=DEV).manual_seed(3), torch.Generator(device=DEV).manual_seed(3)
    s1 = fast_generate(model, ids, am, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, generator=g1,
                       cuda_graph=False, page_size=16)
    s2 = fast_generate(model, ids, am, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, generator=g2,
                       cuda_graph=False, page_size=16)
    assert torch.equal(s1.sequences, s2.sequences)
    if not CUDA:  # the static path through the Triton kernels (interpreter) == the torch backend
        tri = fast_generate(model, ids, am, max_new_tokens=9, eos_token_id=[], cuda_graph=False, horizon=4,
                            page_size=16, backend="triton")
        assert torch.equal(tri.sequences, greedy.sequences[:, : ids.shape[1] + 9])


@pytest.mark.parametrize("impl", [None, "triton"])
def test_shared_prefix_cache_static_steps_equal_teacher_forced(make_tiny_model, randomize, monkeypatch,
                                                               shared_decode_check, impl):
    """W samples over one shared pruned prompt, decoded through static-mode steps (graph replays on CUDA).
    ``impl="triton"`` runs the prefix/suffix kernel on CPU too (interpreter): the static path passes it a
    ``visible`` mask shorter than the in-place buffers (a GPU-only failure before)."""
    import dms.shared_prefix as sp

    monkeypatch.setattr(sp, "PREFIX_IMPL", impl)
    monkeypatch.setattr(sp, "SUFFIX_CAPACITY", 4)  # forces growth and compaction between horizons
    monkeypatch.setattr(sp, "SUFFIX_COMPACT_EVERY", 5)
    model = _model(make_tiny_model, randomize, window=2, kv=2, heads=4)
    ids, am = _prompts()
    ids, am = ids[1:], am[1:]  # 2 prompts of different lengths
    W, new = 3, 20
    cache = sp.SharedPrefixDMSCache.from_prompts(model, ids, am, W)
    logits, tf = shared_decode_check(model, cache, ids, am, W, new, horizon=6, cuda_graph=CUDA)
    torch.testing.assert_close(logits, tf, atol=ATOL, rtol=0)
    st = cache.stats()
    assert st["samples_per_prompt"] == W and st["memory_cr"] > 1.0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_through_graph_decoding_equals_plain(make_tiny_model, randomize, family):
    """model.generate() with enable_graph_decoding: greedy, sampling, beam search (reorders leave static mode),
    multi-turn (a new prompt chunk leaves static mode) and num_return_sequences (shared prefix) unchanged."""
    from dms.graphs import disable_graph_decoding, enable_graph_decoding

    model = _model(make_tiny_model, randomize, family=family)
    ids, am = _prompts()
    kw = dict(attention_mask=am, max_new_tokens=12, pad_token_id=0, output_logits=True, return_dict_in_generate=True)

    def run(**extra):
        torch.manual_seed(11)
        c = PagedDMSCache(model, page_size=16)
        out = model.generate(ids, past_key_values=c, **{**kw, **extra})
        return out, c

    cases = [dict(do_sample=False), dict(do_sample=True, top_k=10), dict(do_sample=False, num_beams=2)]
    plain = [run(**c) for c in cases]
    torch.manual_seed(3)
    shared_plain = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=True, num_return_sequences=3,
                                  pad_token_id=0)
    enable_graph_decoding(model, horizon=5, cuda_graph=CUDA)
    try:
        for (ref, ref_cache), c in zip(plain, cases):
            out, cache = run(**c)
            assert torch.equal(out.sequences, ref.sequences), c
            torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), atol=ATOL, rtol=0)
            assert cache.stats()["tokens_held"] == ref_cache.stats()["tokens_held"]
        # multi-turn on the cache that just decoded in static mode
        out, cache = run(do_sample=False)
        turn = torch.cat([out.sequences, torch.randint(3, 97, (3, 4), device=DEV)], 1)
        am2 = torch.cat([am, torch.ones(3, turn.shape[1] - am.shape[1], dtype=am.dtype, device=DEV)], 1)
        o2 = model.generate(turn, attention_mask=am2, past_key_values=cache, max_new_tokens=6, do_sample=False,
                            pad_token_id=0)
        torch.manual_seed(3)
        shared = model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=True, num_return_sequences=3,
                                pad_token_id=0)
    finally:
        disable_graph_decoding(model)
    ref_cache = PagedDMSCache(model, page_size=16)
    r1 = model.generate(ids, attention_mask=am, past_key_values=ref_cache, max_new_tokens=12, do_sample=False,
                        pad_token_id=0)
    r2 = model.generate(turn, attention_mask=am2, past_key_values=ref_cache, max_new_tokens=6, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(r1, out.sequences) and torch.equal(r2, o2)
    assert torch.equal(shared, shared_plain)
