"""Pure-PyTorch references for the paged DMS decode ops (the ground truth for the Triton kernels).

Paged store of one layer (shared by all streams; a *stream* is one (sequence, KV head) pair,
``n = b * Hkv + h``):

- ``k_pool, v_pool [P, PS, D]``: pages of ``PS`` slots;
- ``pos_pool [P, PS]`` int32: token position held by a slot (-1 = hole);
- ``block_table [N, MAXB]`` int32: page id of block ``j`` of stream ``n`` (slot ``s`` lives in block
  ``s // PS`` at offset ``s % PS``);
- ``seq_len [N]`` int32: slots in use by the stream (holes included; ``0`` = empty head).

Decode step (one new token per row), :func:`paged_append_reference`, with window ``W`` and the
per-stream ring ``ring_slot/ring_ev [N, R]`` (``R = W + 2``, indexed by ``position % R``) that maps
the last ``R`` positions to their slot and eviction decision:

1. the new token's logit decides about key ``p - 1`` (evict iff ``logit > 0``);
2. key ``c = p - 1 - W`` is now invisible to every future query if it is flagged: its slot is freed
   and the new token takes it (slot recycling); otherwise the token goes to slot ``seq_len`` and a
   page is popped from the free stack when the slot opens a new block;
3. counters: ``held`` is the number of tokens a query after this step can still see (what the
   reference cache holds after its prune), ``now`` the number held while this step attends.
"""
from __future__ import annotations

import torch


def ring_size(window: int) -> int:
    """Ring length ``R = W + 2``: positions ``p - 1 - W .. p`` must be addressable at once."""
    return int(window) + 2


@torch.no_grad()
def paged_append_reference(k_new, v_new, logits, valid, seen, k_pool, v_pool, pos_pool, block_table, seq_len,
                           held, now, ring_slot, ring_ev, free_stack, free_top, window: int):
    """Append one token per row to the paged store, in place (see the module docstring).

    Args:
        k_new, v_new ``[B, Hkv, D]``; logits ``[B, Hkv]`` fp32 eviction logits of the new token;
        valid ``[B]`` bool (False: padding column, nothing changes); seen ``[N]`` int32 positions of
        the new tokens (incremented for valid rows); the store tensors as in the module docstring;
        held/now ``[N]`` int32; free_stack ``[P]`` int32 and free_top ``[1]`` int32 (free pages are
        ``free_stack[:free_top]``, popped from the top; the caller guarantees enough free pages).
    """
    B, Hkv, D = k_new.shape
    N = B * Hkv
    PS = k_pool.shape[1]
    W = int(window)
    R = ring_slot.shape[1]
    dev = k_new.device
    n = torch.arange(N, device=dev)
    ok = valid.to(dev).bool().repeat_interleave(Hkv)
    p = seen.long()
    lg = logits.reshape(N).float()
    ev_prev = lg > 0
    has_prev = ok & (p > 0)
    prev_i = (p - 1) % R
    ring_ev[n[has_prev], prev_i[has_prev]] = ev_prev[has_prev]
    c = p - 1 - W
    ci = c % R
    rs = ring_slot[n, ci]
    drop = ok & (c >= 0) & (rs >= 0) & ring_ev[n, ci]
    ring_slot[n[drop], ci[drop]] = -1
    slot = torch.where(drop, rs, seq_len.long())
    append = ok & ~drop
    need = append & (slot % PS == 0)
    rank = torch.cumsum(need.long(), 0) - 1
    top = int(free_top[0])
    if int(need.sum()) > top:
        raise RuntimeError(f"page pool exhausted: need {int(need.sum())} pages, {top} free")
    new_pages = free_stack[(top - 1 - rank).clamp(min=0)]
    blk = slot // PS
    block_table[n[need], blk[need]] = new_pages[need].to(block_table.dtype)
    free_top[0] = top - int(need.sum())
    seq_len[append] += 1
    page = block_table[n, blk.clamp(max=block_table.shape[1] - 1)].long()
    off = slot % PS
    kf = k_new.reshape(N, D)
    vf = v_new.reshape(N, -1)
    k_pool[page[ok], off[ok]] = kf[ok].to(k_pool.dtype)
    v_pool[page[ok], off[ok]] = vf[ok].to(v_pool.dtype)
    pos_pool[page[ok], off[ok]] = p[ok].to(pos_pool.dtype)
    pi = p % R
    ring_slot[n[ok], pi[ok]] = slot[ok].to(ring_slot.dtype)
    ring_ev[n[ok], pi[ok]] = False
    # Counters. W == 0: the dropped key p-1 was only decided now, so it leaves ``held`` now;
    # W >= 1: key p-W (decided by token p-W+1 <= p) stops being visible after this step.
    now[ok] = (held[ok] + 1 - (drop[ok].int() if W == 0 else 0)).to(now.dtype)
    if W == 0:
        held[ok] = now[ok]
    else:
        c2 = p - W
        c2i = c2 % R
        ev2 = torch.where(c2 == p - 1, ev_prev, ring_ev[n, c2i])
        dying = ok & (c2 >= 0) & (ring_slot[n, c2i] >= 0) & ev2
        held[ok] = (now[ok] - dying[ok].int()).to(held.dtype)
    seen[ok] += 1


def gather_stream(k_pool, v_pool, pos_pool, block_table, seq_len, S: int | None = None):
    """Dense view of the paged store: ``keys/values [N, S, D]``, ``pos [N, S]`` (-1 = hole or past end)."""
    N = block_table.shape[0]
    PS = k_pool.shape[1]
    if S is None:
        S = int(seq_len.max()) if N else 0
    dev = k_pool.device
    s = torch.arange(S, device=dev)
    in_use = s[None, :] < seq_len[:, None].long()
    blk = (s // PS).clamp(max=max(block_table.shape[1] - 1, 0))
    page = torch.where(in_use, block_table[:, blk].long(), 0) if S else torch.zeros(N, 0, dtype=torch.long, device=dev)
    off = (s % PS)[None, :].expand(N, S)
    keys = k_pool[page, off]
    values = v_pool[page, off]
    pos = torch.where(in_use, pos_pool[page, off].long(), -1)
    return keys, values, pos


def paged_decode_attention_reference(q, k_pool, v_pool, pos_pool, block_table, seq_len, scale: float, valid=None):
    """fp32 attention of one query per head over every held slot of its stream.

    Args:
        q ``[B, H, D]`` (query head ``h`` reads stream ``b * Hkv + h // (H // Hkv)``); the store as in
        the module docstring with ``N = B * Hkv`` streams; valid ``[B]`` bool or None.
    Returns:
        ``[B, H, D]`` in q.dtype; zeros for a head with no held slot and for invalid rows.
    """
    B, H, D = q.shape
    N = block_table.shape[0]
    Hkv = N // B
    G = H // Hkv
    keys, values, pos = gather_stream(k_pool, v_pool, pos_pool, block_table, seq_len)
    S = keys.shape[1]
    kf = keys.float().view(B, Hkv, 1, S, D)
    # holes and slots past the end may hold stale bytes (even NaN): they must not reach 0 * value
    vf = values.float().masked_fill((pos < 0)[..., None], 0.0).view(B, Hkv, 1, S, v_pool.shape[-1])
    qf = q.float().view(B, Hkv, G, 1, D)
    scores = (qf @ kf.transpose(-1, -2)).squeeze(-2) * scale  # [B, Hkv, G, S]
    scores = scores.masked_fill((pos < 0).view(B, Hkv, 1, S), float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    out = (p.unsqueeze(-2) @ vf).squeeze(-2).reshape(B, H, v_pool.shape[-1])
    if valid is not None:
        out = out * valid.to(out.device).view(B, 1, 1).float()
    return out.to(q.dtype)


def masked_attention_lse(query, keys, values, q_pos, k_pos, k_evict, window: int, scaling: float, q_chunk: int = 256):
    """fp32 DMS hard-mask attention over explicitly positioned keys, with its log-sum-exp.

    query ``[B, H, Tq, D]``; keys/values ``[B, Hkv, S, D]``; q_pos ``[B, Tq]``; k_pos ``[B, Hkv, S]``
    (-1 = empty); k_evict ``[B, Hkv, S]``. Key visible iff ``0 <= k_pos <= q_pos`` and not
    (``k_evict`` and ``q_pos - k_pos > window``). Returns ``o [B, H, Tq, D]`` fp32 (zeros where nothing
    is visible) and ``lse [B, H, Tq]`` fp32 (-inf there). Query chunks bound memory to O(q_chunk * S).
    """
    B, H, Tq, D = query.shape
    Hkv = keys.shape[1]
    g = H // Hkv
    kf = keys.float().repeat_interleave(g, dim=1)
    vf = values.float().repeat_interleave(g, dim=1)
    kp = k_pos.repeat_interleave(g, dim=1)[:, :, None, :]
    ke = k_evict.repeat_interleave(g, dim=1)[:, :, None, :]
    outs, lses = [], []
    for s in range(0, Tq, q_chunk):
        q = query[:, :, s:s + q_chunk].float()
        qp = q_pos[:, None, s:s + q_chunk, None]
        vis = (kp >= 0) & (kp <= qp) & ~(ke & ((qp - kp) > window))
        scores = torch.matmul(q, kf.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        p = torch.exp(scores - lse.nan_to_num(0.0, neginf=0.0)[..., None]).nan_to_num(0.0)
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def pack_survivors_reference(keys, values, pos, ev, keep, counts, starts, seen, R: int, k_pool, v_pool, pos_pool,
                             total: int | None = None, max_count: int | None = None):
    """Write each stream's surviving keys into its pages, in position order (the paged cache's repack).

    Args:
        keys/values ``[B, Hkv, S, D]`` (any strides, e.g. transposed ``[B, S, Hkv, D]`` projections), pos
        ``[B, Hkv, S]`` positions (-1 empty), ev ``[B, Hkv, S]`` bool evict flags, keep ``[B, Hkv, S]`` bool
        survivors, counts ``[N]`` survivors per stream (``N = B * Hkv``, stream ``n = b * Hkv + h``), starts
        ``[N]`` first page of each stream (pages of a stream are consecutive), seen ``[N]`` tokens seen, R ring
        size; k_pool/v_pool ``[pages, PS, D]``, pos_pool ``[pages, PS]`` int32, written in place; total / max_count:
        the pages in use and the largest count when the caller knows them on the host (else read here: syncs).
    Returns:
        ``(ring_slot [N, R] int32, ring_ev [N, R] bool)``: for kept keys whose position ``p >= seen - R`` the
        slot (rank in its stream) and evict flag at column ``p % R``; -1 / False elsewhere.

    Slot ``r`` of a stream (page ``starts + r // PS``, offset ``r % PS``) holds its ``r``-th survivor; slots past
    the last survivor in its last page get position -1 (their key bytes are left unspecified but finite).
    """
    B, Hkv, S = pos.shape
    N, PS, dev = B * Hkv, k_pool.shape[1], pos.device
    counts, starts = counts.long(), starts.long()
    nblk = (counts + PS - 1) // PS
    total = int(nblk.sum()) if total is None else int(total)
    if total == 0:
        return torch.full((N, R), -1, dtype=torch.int32, device=dev), torch.zeros(N, R, dtype=torch.bool, device=dev)
    S2 = int(counts.max()) if max_count is None else int(max_count)
    # order[n, r] = index (in S) of stream n's r-th survivor (a scatter by running count; dropped keys go to a dump
    # column S2)
    kf = keep.reshape(N, S)
    rank_s = kf.cumsum(-1) - 1
    order = torch.zeros(N, S2 + 1, dtype=torch.long, device=dev)
    order.scatter_(1, torch.where(kf, rank_s, S2), torch.arange(S, device=dev).expand(N, S))
    owner = torch.repeat_interleave(torch.arange(N, device=dev), nblk, output_size=total)  # page -> stream
    local = torch.arange(total, device=dev) - (torch.cumsum(nblk, 0) - nblk)[owner]  # page index within its stream
    page = starts[owner] + local  # the pool rows [starts[n], starts[n] + nblk[n]) of each stream
    rank = local[:, None] * PS + torch.arange(PS, device=dev)
    ok = rank < counts[owner][:, None]  # [total, PS] slot holds a survivor
    s_src = order[owner[:, None], rank.clamp(max=S2 - 1)].view(-1)  # source position of every slot
    o_src = owner.repeat_interleave(PS)
    b_src, h_src = o_src // Hkv, o_src % Hkv
    k_pool[page] = keys[b_src, h_src, s_src].view(total, PS, -1).to(k_pool.dtype)
    v_pool[page] = values[b_src, h_src, s_src].view(total, PS, -1).to(v_pool.dtype)
    src = o_src * S + s_src  # flat index into [N * S]
    p = torch.where(ok.view(-1), pos.reshape(N * S).index_select(0, src), -1)  # [total * PS]
    e = ev.reshape(N * S).index_select(0, src) & ok.view(-1)
    pos_pool[page] = p.view(total, PS).to(torch.int32)
    # ring entries (decisions still pending or recyclable) of the kept keys; others go to a dump column
    sn = seen.long().index_select(0, o_src)
    ring = (p >= 0) & (p >= sn - R)
    col = torch.where(ring, p % R, R)
    flat = o_src * (R + 1) + col
    rs = torch.full((N * (R + 1),), -1, dtype=torch.int32, device=dev)
    re = torch.zeros(N * (R + 1), dtype=torch.bool, device=dev)
    rs.scatter_(0, flat, rank.view(-1).to(torch.int32))
    re.scatter_(0, flat, e)
    return rs.view(N, R + 1)[:, :R].contiguous(), re.view(N, R + 1)[:, :R].contiguous()
