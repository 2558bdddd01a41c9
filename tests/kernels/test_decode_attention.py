"""Paged DMS decode kernels (append + split-K decode attention) vs their PyTorch references.

CPU (CI): the Triton kernels run under ``TRITON_INTERPRET=1`` at small sizes; on CUDA the same tests
run compiled. Outputs are poisoned with NaN (``triton_decode.POISON_OUTPUTS``) so an unwritten element fails.

Tolerances, max-abs error against the fp32 reference on the same (upcast) inputs, outputs ~N(0, 1/S):
  fp32: 2e-5 (exact fp32 products; measured ~5e-7 on CPU)
  fp16: 4e-3, bf16: 2e-2 (one rounding of the output, plus P rounded before the P.V product on CUDA)
"""
from __future__ import annotations


import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 on CPU first
from dms_kernels.decode_attention import triton_decode as td  # noqa: E402
from dms_kernels.decode_attention.reference import (  # noqa: E402
    gather_stream,
    paged_append_reference,
    paged_decode_attention_reference,
    ring_size,
)

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(td, "POISON_OUTPUTS", True)


def _store(lens, PS, D, dtype, holes=True, seed=0):
    """A random paged store with the given per-stream slot counts; pages shuffled over the pool."""
    g = torch.Generator().manual_seed(seed)
    N = len(lens)
    nblk = [(l + PS - 1) // PS for l in lens]
    P = sum(nblk) + 3
    perm = torch.randperm(P, generator=g)
    maxb = max(max(nblk), 1)
    bt = torch.zeros(N, maxb, dtype=torch.int32)
    i = 0
    for n, b in enumerate(nblk):
        bt[n, :b] = perm[i:i + b].int()
        i += b
    k = torch.randn(P, PS, D, generator=g).to(dtype)
    v = torch.randn(P, PS, D, generator=g).to(dtype)
    pos = torch.randint(0, 10_000, (P, PS), generator=g, dtype=torch.int32)
    if holes:
        pos[torch.rand(P, PS, generator=g) < 0.15] = -1  # freed slots awaiting reuse
    # stale bytes past each stream's end must never leak in: make them NaN
    for n, l in enumerate(lens):
        for s in range(l, nblk[n] * PS):
            v[bt[n, s // PS], s % PS] = float("nan")
            k[bt[n, s // PS], s % PS] = float("nan")
    t = lambda x: x.to(DEV)  # noqa: E731
    return t(k), t(v), t(pos), t(bt), t(torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,G,Hkv,lens,splits", [
    (64, 4, 2, [1, 63, 0, 17, 40, 5], None),   # odd lengths, an empty head, GQA 4
    (128, 8, 1, [200, 3], 3),                   # skewed heads, GQA 8, forced splits
    (64, 1, 4, [16, 16, 31, 1, 0, 0, 2, 90], 2),  # MHA (G = 1), two empty heads
    (64, 4, 2, [97, 2, 0, 33], "pps1"),        # one page per split (most splits empty for short heads)
])
def test_decode_attention_matches_reference(dtype, D, G, Hkv, lens, splits):
    PS = 16
    B = len(lens) // Hkv
    k, v, pos, bt, sl = _store(lens, PS, D, dtype)
    q = torch.randn(B, Hkv * G, D, device=DEV).to(dtype)
    ref = paged_decode_attention_reference(q, k, v, pos, bt, sl, D ** -0.5)
    kw = dict(pages_per_split=1) if splits == "pps1" else dict(num_splits=splits)
    out = td.paged_decode_attention(q, k, v, pos, bt, sl, D ** -0.5, **kw)
    assert out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=0)
    empty = (sl == 0).view(B, Hkv).repeat_interleave(G, 1)
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("D,G,Hkv,lens,programs", [
    (64, 4, 2, [1, 63, 0, 17, 40, 5], None),      # default grid (more programs than pages here)
    (64, 4, 2, [1, 63, 0, 17, 40, 5], 3),         # few programs: each spans several streams, streams span programs
    (128, 8, 1, [200, 3], 5),                     # skewed heads, GQA 8
    (64, 1, 4, [16, 16, 31, 1, 0, 0, 2, 90], 7),  # MHA, empty heads between full ones
    (64, 4, 2, [0, 0, 0, 0], 4),                  # nothing held at all
    (64, 4, 2, [97, 2, 0, 33], 1),                # one program walks everything
])
def test_flat_decode_attention_matches_reference(dtype, D, G, Hkv, lens, programs):
    """kernel="flat": equal page shares of all streams per program (module docstring), same result."""
    PS = 16
    B = len(lens) // Hkv
    k, v, pos, bt, sl = _store(lens, PS, D, dtype, seed=len(lens) + (programs or 0))
    q = torch.randn(B, Hkv * G, D, device=DEV).to(dtype)
    ref = paged_decode_attention_reference(q, k, v, pos, bt, sl, D ** -0.5)
    out = td.paged_decode_attention(q, k, v, pos, bt, sl, D ** -0.5, kernel="flat", flat_programs=programs)
    assert out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=0)
    empty = (sl == 0).view(B, Hkv).repeat_interleave(G, 1)
    assert (out[empty] == 0).all()
    split = td.paged_decode_attention(q, k, v, pos, bt, sl, D ** -0.5, kernel="split")
    torch.testing.assert_close(out.float(), split.float(), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v_mask_pos", [False, True])
def test_split_kernel_v_mask(dtype, v_mask_pos, monkeypatch):
    """V tiles masked by the stream length only (default) or by slot position too: holes (pos < 0, finite
    bytes) get probability 0 either way and NaN bytes past the end never enter."""
    monkeypatch.setattr(td, "V_MASK_POS", v_mask_pos)
    lens = [1, 63, 0, 17, 40, 5]
    k, v, pos, bt, sl = _store(lens, 16, 64, dtype, seed=5)
    q = torch.randn(3, 8, 64, device=DEV).to(dtype)
    ref = paged_decode_attention_reference(q, k, v, pos, bt, sl, 0.125)
    out = td.paged_decode_attention(q, k, v, pos, bt, sl, 0.125, kernel="split", num_splits=2)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v_mask_pos", [False, True])
@pytest.mark.parametrize("D,G,Hkv,lens,splits", [
    (64, 4, 2, [1, 63, 0, 17, 40, 5], 2),
    (128, 8, 1, [200, 3], None),
])
def test_split_kernel_tensor_descriptor_pages(dtype, v_mask_pos, D, G, Hkv, lens, splits, monkeypatch):
    """use_tma=True: pages read by bulk copies through host tensor descriptors (rows cannot be masked in the
    copy, so NaN bytes past a stream's end are zeroed after it). Same result as the reference and as pointer loads."""
    monkeypatch.setattr(td, "V_MASK_POS", v_mask_pos)
    B = len(lens) // Hkv
    k, v, pos, bt, sl = _store(lens, 16, D, dtype, seed=9)
    q = torch.randn(B, Hkv * G, D, device=DEV).to(dtype)
    ref = paged_decode_attention_reference(q, k, v, pos, bt, sl, D ** -0.5)
    out = td.paged_decode_attention(q, k, v, pos, bt, sl, D ** -0.5, num_splits=splits, use_tma=True)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=0)
    plain = td.paged_decode_attention(q, k, v, pos, bt, sl, D ** -0.5, num_splits=splits, use_tma=False)
    torch.testing.assert_close(out.float(), plain.float(), atol=TOL[dtype], rtol=0)
    # a pool whose pages are not contiguous rows cannot be described: use_tma=True says so, None falls back
    k2 = torch.zeros(k.shape[1], k.shape[0], D, device=DEV, dtype=dtype).transpose(0, 1)  # [P, PS, D], slot-major
    k2.copy_(k)
    with pytest.raises(ValueError, match="use_tma"):
        td.paged_decode_attention(q, k2, v, pos, bt, sl, D ** -0.5, use_tma=True)
    monkeypatch.setenv("DMS_DECODE_TMA", "1")
    torch.testing.assert_close(td.paged_decode_attention(q, k2, v, pos, bt, sl, D ** -0.5, num_splits=splits).float(),
                               plain.float(), atol=TOL[dtype], rtol=0)


def test_decode_attention_invalid_rows_and_errors():
    k, v, pos, bt, sl = _store([5, 9], 16, 64, torch.float32)
    q = torch.randn(2, 2, 64, device=DEV)
    valid = torch.tensor([True, False], device=DEV)
    out = td.paged_decode_attention(q, k, v, pos, bt, sl, 0.125, valid=valid)
    assert (out[1] == 0).all() and not torch.isnan(out).any()
    with pytest.raises(ValueError, match="head dim"):
        td.paged_decode_attention(q[..., :48].contiguous(), k[..., :48], v[..., :48], pos, bt, sl, 0.1)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        td.paged_decode_attention(torch.randn(1, 3, 64, device=DEV), k, v, pos, bt, sl, 0.1)
    out = td.paged_decode_attention(q, k, v, pos, bt, sl, 0.125, valid=valid, kernel="flat", flat_programs=2)
    assert (out[1] == 0).all() and not torch.isnan(out).any()
    with pytest.raises(ValueError, match="kernel must be one of"):
        td.paged_decode_attention(q, k, v, pos, bt, sl, 0.1, kernel="fast")
    with pytest.raises(ValueError, match="flat_programs"):
        td.paged_decode_attention(q, k, v, pos, bt, sl, 0.1, kernel="flat", flat_programs=0)


def _fresh_state(B, Hkv, D, PS, P, W, dtype):
    N = B * Hkv
    R = ring_size(W)
    i32 = dict(dtype=torch.int32, device=DEV)
    return dict(
        seen=torch.zeros(N, **i32), k_pool=torch.zeros(P, PS, D, dtype=dtype, device=DEV),
        v_pool=torch.zeros(P, PS, D, dtype=dtype, device=DEV), pos_pool=torch.full((P, PS), -1, **i32),
        block_table=torch.zeros(N, P, **i32), seq_len=torch.zeros(N, **i32), held=torch.zeros(N, **i32),
        now=torch.zeros(N, **i32), ring_slot=torch.full((N, R), -1, **i32),
        ring_ev=torch.zeros(N, R, dtype=torch.bool, device=DEV),
        free_stack=torch.arange(P - 1, -1, -1, **i32), free_top=torch.full((1,), P, **i32))


def _held_set(st):
    """{stream: sorted [(pos, key bytes)]} of the slots that hold a token."""
    keys, _, pos = gather_stream(st["k_pool"], st["v_pool"], st["pos_pool"], st["block_table"], st["seq_len"])
    out = []
    for n in range(pos.shape[0]):
        m = pos[n] >= 0
        out.append(sorted(zip(pos[n][m].tolist(), keys[n][m][:, 0].tolist())))
    return out


@pytest.mark.parametrize("W", [0, 1, 3])
def test_append_kernel_matches_reference(W):
    """Random decode steps: the kernel's store holds the same tokens as the reference's (page ids may differ)."""
    B, Hkv, D, PS, P, steps = 2, 2, 16, 16, 24, 40
    torch.manual_seed(W)
    ref, tri = _fresh_state(B, Hkv, D, PS, P, W, torch.float32), _fresh_state(B, Hkv, D, PS, P, W, torch.float32)
    order = ("seen", "k_pool", "v_pool", "pos_pool", "block_table", "seq_len", "held", "now", "ring_slot",
             "ring_ev", "free_stack", "free_top")
    for t in range(steps):
        kn = torch.randn(B, Hkv, D, device=DEV)
        vn = torch.randn(B, Hkv, D, device=DEV)
        lg = torch.randn(B, Hkv, device=DEV)
        valid = torch.rand(B, device=DEV) > 0.1
        paged_append_reference(kn, vn, lg, valid, *[ref[k] for k in order], window=W)
        td.paged_append(kn, vn, lg, valid, *[tri[k] for k in order], window=W)
        for name in ("seen", "seq_len", "held", "now", "free_top"):
            assert torch.equal(ref[name], tri[name]), (t, name)
        assert _held_set(ref) == _held_set(tri)
    # slots recycled: a stream never uses more slots than tokens it held at once + 1
    assert int(tri["seq_len"].max()) <= int(tri["now"].max()) + 1 + W


@pytest.mark.parametrize("chunk", [8192, 4])
def test_paged_cache_triton_backend_equals_reference_cache(make_tiny_model, randomize, chunk):
    """The whole decode loop through the Triton kernels (interpreter on CPU) == the reference DMSCache;
    with ``chunk=4`` the prompt and a second turn go through the chunk-vs-cache kernel too."""
    import dms
    from dms.paged_cache import PagedDMSCache

    m = make_tiny_model("qwen3", kv_heads=2, hidden=64, heads=4).to(DEV)
    dms.retrofit(m, dms.DMSConfig(window=2, attention_impl="eager"))
    randomize(m, 0.3)
    m.to(DEV)
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 9), device=DEV)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    ref = m.generate(ids, past_key_values=dms.DMSCache(m), **kw)
    cache = PagedDMSCache(m, page_size=16, backend="triton", prefill_chunk=chunk)
    out = m.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), atol=1e-4, rtol=0)
    if chunk < 8192:  # multi-turn: a new prompt continues both caches
        ref_cache = dms.DMSCache(m)
        ref = m.generate(ids, past_key_values=ref_cache, **kw)
        turn = torch.cat([ref.sequences, torch.randint(3, 97, (2, 5), device=DEV)], 1)
        am2 = torch.cat([am, torch.ones(2, turn.shape[1] - am.shape[1], dtype=am.dtype, device=DEV)], 1)
        kw2 = dict(kw, attention_mask=am2)
        r2 = m.generate(turn, past_key_values=ref_cache, **kw2)
        o2 = m.generate(turn, past_key_values=cache, **kw2)
        assert torch.equal(r2.sequences, o2.sequences)
        torch.testing.assert_close(torch.stack(o2.logits, 1), torch.stack(r2.logits, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("B,Hkv,S,PS,D,W", [(1, 1, 1, 16, 16, 0), (2, 3, 37, 16, 32, 4), (1, 2, 150, 32, 16, 64),
                                            (3, 1, 70, 16, 64, 200)])
def test_pack_survivors_matches_reference(B, Hkv, S, PS, D, W, transposed):
    """The Triton repack writes the same pages, positions and ring entries as the PyTorch one, into a reused
    pool full of stale entries (random keep masks, some streams empty, keys as transposed projections too)."""
    from dms_kernels.decode_attention import pack_survivors
    from dms_kernels.decode_attention.reference import pack_survivors_reference

    g = torch.Generator().manual_seed(B * 1000 + S + D)
    N = B * Hkv
    if transposed:  # [B, S, Hkv, D] storage viewed as [B, Hkv, S, D], as transformers' k/v projections
        keys = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
        values = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    else:
        keys, values = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    keys, values = keys.to(DEV), values.to(DEV)
    seen = torch.randint(S, S + 5, (N,), generator=g)
    pos = (seen[:, None] - S + torch.arange(S)).view(B, Hkv, S)
    pos = pos.masked_fill(torch.rand(B, Hkv, S, generator=g) < 0.1, -1)  # empty columns
    ev = torch.rand(B, Hkv, S, generator=g) < 0.4
    keep = (pos >= 0) & (torch.rand(B, Hkv, S, generator=g) < 0.7)
    keep[0, 0] = False  # an empty stream
    counts = keep.view(N, S).sum(-1)
    nblk = (counts + PS - 1) // PS
    starts = torch.cumsum(nblk, 0) - nblk
    total = int(nblk.sum())
    R = ring_size(W)
    pools = []
    for _ in range(2):
        kp = torch.full((total + 3, PS, D), 7.0)
        vp = torch.full((total + 3, PS, D), -7.0)
        pp = torch.full((total + 3, PS), 12345, dtype=torch.int32)  # stale positions the repack must overwrite
        pools.append([kp.to(DEV), vp.to(DEV), pp.to(DEV)])
    args = [t.to(DEV) for t in (pos, ev, keep, counts, starts, seen)]
    rs_r, re_r = pack_survivors_reference(keys, values, *args, R, *pools[0])
    rs_t, re_t = pack_survivors(keys, values, *args, R, *pools[1])
    assert torch.equal(rs_t, rs_r) and torch.equal(re_t, re_r)
    (kr, vr, pr), (kt, vt, pt) = pools
    live = pr[:total] >= 0
    assert int(live.sum()) == int(counts.sum())
    assert torch.equal(pt[:total], pr[:total])  # survivors' positions and -1 tails
    assert torch.equal(kt[:total][live], kr[:total][live]) and torch.equal(vt[:total][live], vr[:total][live])
    assert torch.equal(pt[total:], pr[total:]) and bool((pt[total:] == 12345).all())  # pages beyond untouched
    # position order within each stream, keys where they came from
    for n in range(N):
        b, h = divmod(n, Hkv)
        c = int(counts[n])
        if c:
            sl = pr[int(starts[n]):int(starts[n]) + int(nblk[n])].reshape(-1)[:c]
            src = keep[b, h].nonzero().squeeze(-1)
            assert torch.equal(sl.cpu().long(), pos[b, h, src])
            ks = kr[int(starts[n]):int(starts[n]) + int(nblk[n])].reshape(-1, D)[:c]
            assert torch.equal(ks, keys[b, h, src.to(DEV)])


def test_split_kernel_stages_default():
    """The split kernel pipelines 3 deep from MANY_STREAMS streams on, 2 below; an explicit num_stages wins."""
    assert td.split_stages(td.MANY_STREAMS - 1) == td.DEFAULT_STAGES == 2
    assert td.split_stages(td.MANY_STREAMS) == td.MANY_STREAMS_STAGES == 3
    lens = [5, 40, 0, 17] * 16  # 64 streams
    k, v, pos, bt, sl = _store(lens, 16, 64, torch.float32)
    q = torch.randn(16, 4 * 2, 64, device=DEV)
    ref = paged_decode_attention_reference(q, k, v, pos, bt, sl, 0.125)
    for st in (None, 2):
        out = td.paged_decode_attention(q, k, v, pos, bt, sl, 0.125, num_stages=st)
        torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=0)


def test_pdl_choice_and_errors(monkeypatch):
    """Programmatic dependent launch: on by default only where it can work (CUDA, compute capability >= 9, not the
    interpreter); pdl=True / DMS_DECODE_PDL=1 elsewhere are errors that say what is needed; bad values are errors."""
    dev = torch.device(DEV)
    possible = td._pdl_possible(dev)
    assert possible == (CUDA and torch.cuda.get_device_capability()[0] >= 9 and not td._INTERPRET)
    assert td.pdl_default(dev) == (possible and td.PDL_DEFAULT)
    monkeypatch.setenv("DMS_DECODE_PDL", "0")
    assert td.pdl_default(dev) is False
    monkeypatch.setenv("DMS_DECODE_PDL", "yes")
    with pytest.raises(ValueError, match="DMS_DECODE_PDL='yes'"):
        td.pdl_default(dev)
    monkeypatch.delenv("DMS_DECODE_PDL")
    k, v, pos, bt, sl = _store([5, 9], 16, 64, torch.float32)
    q = torch.randn(2, 2, 64, device=DEV)
    if not possible:
        monkeypatch.setenv("DMS_DECODE_PDL", "1")
        with pytest.raises(ValueError, match="compute capability >= 9"):
            td.pdl_default(dev)
        monkeypatch.delenv("DMS_DECODE_PDL")
        with pytest.raises(ValueError, match="pdl=True needs"):
            td.paged_decode_attention(q, k, v, pos, bt, sl, 0.125, pdl=True)
    ref = paged_decode_attention_reference(q, k, v, pos, bt, sl, 0.125)
    torch.testing.assert_close(td.paged_decode_attention(q, k, v, pos, bt, sl, 0.125, pdl=False), ref,
                               atol=TOL[torch.float32], rtol=0)


@pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability()[0] >= 9), reason="PDL needs a Hopper GPU")
def test_pdl_waits_for_the_previous_kernel_in_a_graph():
    """With PDL the split kernel starts while the kernel before it drains: in a CUDA graph whose every step first
    overwrites q and a page of the pool (copy kernels) and then attends, each step's output must equal the same step
    launched without PDL, bitwise (the same kernels; only the launch differs), on every replay."""
    lens = [700, 64, 1, 300] * 4
    k, v, pos, bt, sl = _store(lens, 64, 128, torch.bfloat16, holes=False)
    steps = 12
    qs = torch.randn(steps, 4, 16, 128, device=DEV).to(torch.bfloat16)
    ks = torch.randn(steps, *k.shape[1:], device=DEV).to(torch.bfloat16)
    page = int(bt[0, 0])
    q = torch.empty_like(qs[0])

    def run(pdl):
        outs = []
        for i in range(steps):
            q.copy_(qs[i])
            k[page].copy_(ks[i])
            outs.append(td.paged_decode_attention(q, k, v, pos, bt, sl, 0.088, max_len=max(lens), pdl=pdl))
        return torch.stack(outs)

    want = run(False)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = run(True)
    for _ in range(5):
        got.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
