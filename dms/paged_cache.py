"""Paged DMS KV cache: a per-head page store that frees evicted memory while it generates.

Same semantics and protocol as the reference :class:`dms.cache.DMSCache` (``dms_attend``, ``stats()``
keys), but each (sequence, KV head) *stream* holds exactly its live tokens (the last ``window`` plus the
kept older ones) in fixed-size pages drawn from one pool per layer; nothing is padded to the longest
head. Layout and decode-step rules: ``dms_kernels/decode_attention/reference.py``.

- Decode (one new column per row): one Triton kernel applies the pending decision, recycles the slot of
  the key that just left the window when it is flagged evict (the new token takes that slot), else takes
  the next slot and pops a page from the pool's free stack on the device; a split-K Triton kernel then
  attends over the ragged store (all query heads of a KV head in one program). No host sync per step:
  the host keeps an upper bound on pages that can be taken and reads the free count only when the bound
  says the pool might run dry, then grows the pool.
- Prefill / multi-turn chunks (several columns): processed in chunks of ``prefill_chunk`` columns (default:
  the whole call with the Triton kernels, 8192 with the references); each
  chunk attends to the cached keys (``dms_kernels.decode_attention.chunk_attention`` on CUDA, a flash-style
  Triton kernel; its fp32 reference elsewhere) and to itself with the hard-mask kernel
  (``dms_kernels.train_attention.dms_attention_hard`` on CUDA, its fp32 reference elsewhere), merged by
  log-sum-exp; then the streams are repacked into pages (survivors only). Memory with the Triton kernels:
  O(chunk + held) per layer; with the CPU references O(chunk^2 + 256 * held) (score tensors).
  The repack needs the survivor counts on the host (pool size): a prompt's repack of layer ``i`` is
  deferred until layer ``i + 1`` has queued its attention (or until anything reads layer ``i``), so that
  the host waits for counts the device produced a layer ago and the device queue never runs dry behind
  that one sync per layer.
- Batch ops (beam reorder, repeat_interleave, select) repack the pool, which also shrinks it after
  sequences finish. Padding columns (attention_mask == 0) are never cached.

On CPU the same state machine runs through the PyTorch references (``backend="torch"``).
"""
from __future__ import annotations

import os
import warnings

import torch
from transformers.cache_utils import Cache

from dms_kernels.decode_attention import (
    SUPPORTED_HEAD_DIMS,
    gather_stream,
    masked_attention_lse,
    pack_survivors,
    pack_survivors_reference,
    paged_append_reference,
    paged_decode_attention_reference,
    ring_size,
)

from .cache import DMSLayerProtocol, chunk_decisions

CACHE_KINDS = ("auto", "paged", "reference")
DEFAULT_TORCH_CHUNK = 8192  # prefill chunk of the PyTorch-reference backend (its score tensors are chunk^2)
BACKENDS = ("auto", "triton", "torch")


TRITON_HEAD_DIMS = SUPPORTED_HEAD_DIMS  # head dims of the Triton prefill / decode kernels


def _triton_unsupported(model) -> str | None:
    """Why the Triton backend cannot serve ``model`` (its head dim), or None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if D not in TRITON_HEAD_DIMS:
        return f"head dim {D} (supported: {TRITON_HEAD_DIMS})"
    return None


def _hard_chunk_attention(q, k, v, evict, window, doc_ids, scale, use_triton: bool):
    """Chunk-internal DMS hard-mask attention: q ``[B, H, T, D]``, k/v ``[B, Hkv, T, D]``, evict ``[B, Hkv, T]``.

    Returns ``o [B, H, T, D]`` and natural-log ``lse [B, H, T]``.
    """
    if use_triton:
        from dms_kernels.train_attention import dms_attention_hard

        return dms_attention_hard(q, k, v, evict, window, doc_ids, scale)
    from dms_kernels.train_attention.reference import dms_attention_reference, hard_log_keep

    return dms_attention_reference(q, k, v, hard_log_keep(evict), window, doc_ids, scale)


class _Ready:
    def __init__(self, t):
        self.t = t

    def result(self):
        return self.t


class _Pending:
    def __init__(self, host, event):
        self.host, self.event = host, event

    def result(self):
        self.event.synchronize()
        return self.host


class PagedDMSCacheLayer(DMSLayerProtocol):
    """One layer's page pool and per-stream bookkeeping (streams ``n = b * Hkv + h``)."""

    def __init__(self, page_size: int = 64, backend: str = "torch", prefill_chunk: int | None = None,
                 initial_pages_per_stream: int = 4):
        super().__init__()
        self.page_size = page_size
        self.backend = backend
        self.prefill_chunk = prefill_chunk
        self.initial_pages_per_stream = initial_pages_per_stream
        self.window = None
        self.columns = 0
        self.held_history: list = []  # device scalars: tokens held after each call
        self._peak = None
        self.grow_events = 0
        self._static_max_len = None  # set between begin_static / end_static (CUDA-graph decoding)
        self._ones = None  # [B] int8 all-valid flags of decode steps without padding (kept between steps)
        self._pending = None  # a chunk's repack (kwargs of _pack) not yet run: see flush()
        self.defer_pack = False  # set by PagedDMSCache: the last chunk of a call leaves its repack pending

    # --- transformers Cache protocol -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states, window: int = 0):
        B, Hkv, _, D = key_states.shape
        self.B, self.Hkv, self.N, self.D, self.DV = B, Hkv, B * Hkv, D, value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.window = int(window)
        self.R = ring_size(self.window)
        i32 = dict(dtype=torch.int32, device=self.device)
        self.seen_s = torch.zeros(self.N, **i32)
        self._alloc_pool(self.N * self.initial_pages_per_stream)
        self._reset_streams(self.N)
        self.is_initialized = True

    def _alloc_pool(self, capacity: int):
        PS, dev = self.page_size, self.device
        self.capacity = int(capacity)
        # zeros, not empty: slots past a stream's end are masked, but stale bytes must never be NaN
        self.k_pool = torch.zeros(self.capacity, PS, self.D, dtype=self.dtype, device=dev)
        self.v_pool = torch.zeros(self.capacity, PS, self.DV, dtype=self.dtype, device=dev)
        self.pos_pool = torch.full((self.capacity, PS), -1, dtype=torch.int32, device=dev)
        self.free_stack = torch.arange(self.capacity - 1, -1, -1, dtype=torch.int32, device=dev)
        self.free_top = torch.full((1,), self.capacity, dtype=torch.int32, device=dev)

    def _reset_streams(self, N: int):
        i32 = dict(dtype=torch.int32, device=self.device)
        self.block_table = torch.zeros(N, max(1, self.initial_pages_per_stream), **i32)
        self.seq_len = torch.zeros(N, **i32)
        self.held = torch.zeros(N, **i32)
        self.now = torch.zeros(N, **i32)
        self.ring_slot = torch.full((N, self.R), -1, **i32)
        self.ring_ev = torch.zeros(N, self.R, dtype=torch.bool, device=self.device)
        self._len_bound = 0
        self._free_known = self.capacity  # called right after _alloc_pool: every page is free
        self._steps = 0

    def flush(self):
        """Run the pending repack, if any (a prompt's last chunk leaves it pending when ``defer_pack`` is set).

        Every reader of the layer's state calls this first, so a pending repack is never observable.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._pack(**pending)

    def reset(self):
        self._pending = None
        for name in ("k_pool", "v_pool", "pos_pool", "block_table", "seq_len", "held", "now", "ring_slot",
                     "ring_ev", "free_stack", "free_top", "seen_s"):
            setattr(self, name, None)
        self.columns = 0
        self.held_history = []
        self._peak = None
        self.is_initialized = False

    @property
    def seen(self) -> torch.Tensor:
        """``[B]`` real tokens seen per row."""
        return self.seen_s.view(self.B, self.Hkv)[:, 0].long()

    def held_tokens(self) -> torch.Tensor:
        """``[B, Hkv]`` tokens held (visible to the next query), as the reference cache counts them."""
        self.flush()
        return self.held.view(self.B, self.Hkv).long()

    # --- dense view and repacking ----------------------------------------------------------------
    def _dense(self):
        """Held tokens as padded tensors ``keys/values [B, Hkv, S, D]``, ``pos [B, Hkv, S]`` (-1 empty), ``evict``."""
        self.flush()
        # S from the host's length bound (exact after a pack): no read of seq_len.max() on the host
        keys, values, pos = gather_stream(self.k_pool, self.v_pool, self.pos_pool, self.block_table, self.seq_len,
                                          S=self._len_bound)
        S = keys.shape[1]
        # Decisions of held keys: only keys inside the ring range can carry an evict flag (older held keys
        # are kept); the ring entry is valid when it still points at this slot.
        seen = self.seen_s.long()[:, None]
        ri = pos.clamp(min=0) % self.R
        in_ring = (pos >= 0) & (pos >= seen - self.R)
        slot_idx = torch.arange(S, device=self.device)[None, :]
        match = torch.gather(self.ring_slot, 1, ri).long() == slot_idx
        ev = in_ring & match & torch.gather(self.ring_ev, 1, ri)
        B, Hkv = self.B, self.Hkv
        return (keys.view(B, Hkv, S, self.D), values.view(B, Hkv, S, self.DV), pos.view(B, Hkv, S), ev.view(B, Hkv, S))

    def _keep(self, pos, ev):
        """Survivors of ``pos/ev [B, Hkv, S]`` at the current ``seen`` (dead keys dropped) and their count per stream."""
        B, Hkv, _ = pos.shape
        seen = self.seen_s.view(B, Hkv).long()[..., None]
        keep = (pos >= 0) & ~(ev & ((seen - pos) > self.window))
        return keep, keep.sum(-1).view(B * Hkv)

    @staticmethod
    def _counts_to_host(counts):
        """Start copying the survivor counts to the host; ``.result()`` of the returned object waits for them.

        On CUDA the copy goes to pinned memory behind an event, so that work queued after it (the chunk's
        attention) keeps the device busy while the host waits for the counts only.
        """
        if counts.device.type != "cuda":
            return _Ready(counts)
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return _Pending(host, ev)

    def _pack(self, keys, values, pos, ev, headroom_pages: int = 2, keep=None, counts=None, counts_host=None):
        """Rewrite the pool with the survivors of ``[B, Hkv, S, ...]`` (dead keys at the current ``seen`` dropped).

        One host sync: the survivor counts (the pool and block-table sizes depend on them), taken from
        ``counts_host`` (:meth:`_counts_to_host`) when the caller started that copy early. Every other step
        is a gather on the device: each destination slot looks up its source key, no boolean indexing.
        """
        B, Hkv, S = pos.shape
        N, PS, dev = B * Hkv, self.page_size, self.device
        if keep is None:
            keep, counts = self._keep(pos, ev)
        if counts_host is None:
            counts_host = self._counts_to_host(counts)
        counts_l = counts_host.result().tolist()
        S2 = max(counts_l, default=0)
        total = sum(-(-c // PS) for c in counts_l)
        need = total + N * headroom_pages
        if self.capacity < need or self.capacity > 2 * need:
            self._alloc_pool(need)  # grows, or shrinks after sequences finished
        nblk = (counts + PS - 1) // PS
        starts = torch.cumsum(nblk, 0) - nblk
        maxb = max(1, -(-S2 // PS) + headroom_pages)
        j = torch.arange(maxb, device=dev)
        self.block_table = torch.where(j[None, :] < nblk[:, None], starts[:, None] + j[None, :], 0).to(torch.int32)
        # survivors into their pages in position order, and their ring entries (one Triton launch, or the
        # PyTorch reference's gathers)
        pack = pack_survivors if (self.backend == "triton" and total) else pack_survivors_reference
        self.ring_slot, self.ring_ev = pack(keys, values, pos, ev, keep, counts, starts, self.seen_s, self.R,
                                            self.k_pool, self.v_pool, self.pos_pool, total=total, max_count=S2)
        cap = self.capacity
        free = cap - total
        self.free_stack = torch.cat([torch.arange(cap - 1, total - 1, -1, device=dev),
                                     torch.zeros(total, dtype=torch.long, device=dev)]).to(torch.int32)
        self.free_top = torch.full((1,), free, dtype=torch.int32, device=dev)
        self.seq_len = counts.to(torch.int32)
        self.held = counts.to(torch.int32)
        self.now = counts.to(torch.int32)
        self._len_bound = S2
        self._free_known = free
        self._steps = 0

    def _index_batch(self, idx):
        if not self.is_initialized:
            return
        if self._static_max_len is not None:
            raise RuntimeError("batch reorder/select during static (graph) decoding; call end_static first")
        idx = torch.as_tensor(idx, device=self.device).long()
        keys, values, pos, ev = self._dense()
        seen = self.seen_s.view(self.B, self.Hkv)
        self.B = int(idx.numel())
        self.N = self.B * self.Hkv
        self.seen_s = seen.index_select(0, idx).reshape(-1).contiguous()
        self._pack(keys.index_select(0, idx), values.index_select(0, idx), pos.index_select(0, idx),
                   ev.index_select(0, idx))

    def reorder_cache(self, beam_idx):
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices):
        self._index_batch(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            self._index_batch(torch.arange(self.B, device=self.device).repeat_interleave(repeats))

    # --- allocation during decode ------------------------------------------------------------------
    def _grow(self, extra: int):
        """Add ``extra`` pages to the pool (keeps every page id; free pages stay on the stack)."""
        dev, PS = self.device, self.page_size
        free = int(self.free_top[0])
        old = self.capacity
        self.k_pool = torch.cat([self.k_pool, torch.zeros(extra, PS, self.D, dtype=self.dtype, device=dev)])
        self.v_pool = torch.cat([self.v_pool, torch.zeros(extra, PS, self.DV, dtype=self.dtype, device=dev)])
        self.pos_pool = torch.cat([self.pos_pool, torch.full((extra, PS), -1, dtype=torch.int32, device=dev)])
        self.capacity = old + extra
        stack = torch.zeros(self.capacity, dtype=torch.int32, device=dev)
        stack[:free] = self.free_stack[:free]
        stack[free:free + extra] = torch.arange(old + extra - 1, old - 1, -1, dtype=torch.int32, device=dev)
        self.free_stack = stack
        self.free_top = torch.full((1,), free + extra, dtype=torch.int32, device=dev)
        self.grow_events += 1
        return free + extra

    def _reserve_decode(self):
        """Make sure the next decode append cannot run out of pages or block-table columns."""
        PS, N = self.page_size, self.N
        self._steps += 1
        # Over k appends a stream opens at most k // PS + 1 new pages (slots are consecutive or recycled).
        if N * (self._steps // PS + 1) > self._free_known:
            free = int(self.free_top[0])  # the only host sync, taken when the bound says the pool may run dry
            if free < 2 * N:
                free = self._grow(max(4 * N, self.capacity // 2))
            self._free_known = free
            self._steps = 1
        self._len_bound += 1
        self._ensure_columns(-(-self._len_bound // PS))

    def _ensure_columns(self, need_cols: int):
        """Widen the block table to at least ``need_cols`` page columns (at least doubling it)."""
        width = self.block_table.shape[1]
        if need_cols > width:
            extra = max(need_cols - width, width)
            self.block_table = torch.cat(
                [self.block_table, torch.zeros(self.N, extra, dtype=torch.int32, device=self.device)], 1)

    # --- static decoding (CUDA graphs: dms/graphs.py) -------------------------------------------------
    def begin_static(self, steps: int):
        """Reserve everything the next ``steps`` decode appends can need, then freeze the layout.

        Until :meth:`end_static`, decode steps allocate nothing and never read device values on the host
        (no pool growth, no block-table growth, a fixed kernel grid sized for ``steps`` more tokens), so
        the same step can be captured once as a CUDA graph and replayed. Host counters advance through
        :meth:`advance_static`.
        """
        if not self.is_initialized:
            raise ValueError("begin_static needs a cache that has seen a prompt (run the prefill first)")
        self.flush()
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        PS, N = self.page_size, self.N
        need_pages = N * (steps // PS + 2)
        free = int(self.free_top[0])
        if free < need_pages:
            free = self._grow(max(need_pages - free, self.capacity // 4))
        self._free_known = free
        self._ensure_columns(-(-(self._len_bound + steps) // PS) + 1)
        self._static_max_len = self._len_bound + steps
        self._static_left = steps

    def advance_static(self, steps: int = 1):
        """Host bookkeeping of ``steps`` decode steps that ran as a graph replay (no Python ran for them)."""
        if self._static_max_len is None:
            raise RuntimeError("advance_static outside begin_static/end_static")
        if steps > self._static_left:
            raise RuntimeError(f"{steps} static steps requested, {self._static_left} reserved; call begin_static again")
        self._static_left -= steps
        self.columns += steps
        self._len_bound += steps

    def static_host_state(self):
        """Host counters a captured step changes in Python (restored after capture: graphs.py)."""
        return (self.columns, self._len_bound, self._static_left)

    def set_static_host_state(self, state):
        self.columns, self._len_bound, self._static_left = state

    def end_static(self):
        """Back to ordinary decoding (the next step re-reads the free-page count)."""
        if self._static_max_len is None:
            return
        self._static_max_len = None
        self._free_known = -1
        self._steps = 0
        self._record(self.now.sum())  # one history entry for the static stretch (per-step entries are not kept)

    # --- DMS -----------------------------------------------------------------------------------------
    def attend(self, query, key, value, logits, valid, window: int, scaling: float) -> torch.Tensor:
        """Append a chunk, apply decisions, attend with the hard mask, prune (as the reference cache).

        Args:
            query ``[B, H, Tn, D]``, key/value ``[B, Hkv, Tn, D]``; logits ``[B, Tn, Hkv]`` (evict iff > 0);
            valid ``[B, Tn]`` bool (False = padding, never cached) or None.
        Returns:
            ``[B, H, Tn, D]`` (zeros for padding queries).
        """
        self.flush()
        if not self.is_initialized:
            self.lazy_initialization(key, value, window)
        elif int(window) != self.window:
            raise ValueError(f"window changed from {self.window} to {window} within one cache; use a new cache")
        B, H, Tn, D = query.shape
        if B != self.B:
            raise ValueError(f"batch size {B} != cached batch {self.B}; call batch_select_indices/"
                             "batch_repeat_interleave first or use a new cache")
        if Tn == 1:
            return self._decode(query, key, value, logits, valid, scaling)
        if self._static_max_len is not None:
            raise RuntimeError("a multi-token chunk reached a cache in static (graph) decoding; call end_static first")
        outs, peak, held = [], None, None
        # The Triton kernels need O(chunk) memory, so one chunk per call by default there (the model's own
        # activations for the call exist anyway); the fp32 references build chunk x (chunk + held) scores.
        chunk = self.prefill_chunk or (Tn if self.backend == "triton" else DEFAULT_TORCH_CHUNK)
        for s in range(0, Tn, chunk):
            e = s + chunk
            o, now_total, held = self._chunk(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], logits[:, s:e],
                                             None if valid is None else valid[:, s:e], scaling,
                                             defer=self.defer_pack and e >= Tn)
            outs.append(o)
            peak = now_total if peak is None else torch.maximum(peak, now_total)
        # One history entry per call (as the reference); the peak is the real one, per chunk.
        self._record(peak, held)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def _record(self, now_total, held_total=None):
        self.held_history.append(self.held.sum() if held_total is None else held_total)
        self._peak = now_total if self._peak is None else torch.maximum(self._peak, now_total)

    def _decode(self, query, key, value, logits, valid, scaling):
        B, H, _, D = query.shape
        self.columns += 1
        static = self._static_max_len is not None
        if static:
            if self._static_left < 1:
                raise RuntimeError("static decode steps exhausted: call begin_static again")
            max_len = self._static_max_len
            self._len_bound += 1
            self._static_left -= 1
        else:
            self._reserve_decode()
            max_len = self._len_bound
        if valid is None:
            if self._ones is None or self._ones.shape[0] != B:
                self._ones = torch.ones(B, dtype=torch.int8, device=self.device)  # kept: no fill kernel per step
            v1 = self._ones
        else:
            v1 = valid[:, 0].to(torch.int8)  # the kernels' flag type: converted once, not once per kernel
        args = (key[:, :, 0], value[:, :, 0], logits[:, 0].float(), v1, self.seen_s, self.k_pool, self.v_pool,
                self.pos_pool, self.block_table, self.seq_len, self.held, self.now, self.ring_slot, self.ring_ev,
                self.free_stack, self.free_top, self.window)
        q = query[:, :, 0]
        if self.backend == "triton":
            from dms_kernels.decode_attention import paged_append, paged_decode_attention

            paged_append(*args)
            out = paged_decode_attention(q, self.k_pool, self.v_pool, self.pos_pool, self.block_table,
                                         self.seq_len, scaling, valid=v1, max_len=max_len)
        else:
            paged_append_reference(*args)
            out = paged_decode_attention_reference(q, self.k_pool, self.v_pool, self.pos_pool, self.block_table,
                                                   self.seq_len, scaling, valid=v1)
        if not static:
            self._record(self.now.sum())
        return out[:, :, None]

    def _chunk(self, query, key, value, logits, valid, scaling, defer: bool = False):
        """One prefill / multi-turn chunk. ``valid`` None means no padding (dms_attention_forward passes None
        when the whole batch is unpadded, checked once per forward). ``defer``: leave the repack pending
        (:meth:`flush`). Returns the output, tokens present before pruning and tokens held after (device scalars).

        Order of work: the new stream state and its survivor counts come first, so that the counts travel to
        the host (for the pool size) while the chunk's attention kernels run; then attention; then the pack.
        """
        B, H, Tn, D = query.shape
        Hkv, W, dev = self.Hkv, self.window, self.device
        self.columns += Tn
        padded = valid is not None
        S = self._len_bound  # host bound on the held length: 0 for a first prompt (nothing to gather)
        seen = self.seen
        if padded:
            n_valid = valid.sum(-1)
            new_pos = torch.where(valid, seen[:, None] + valid.long().cumsum(-1) - 1, -1)  # [B, Tn]
        else:
            n_valid = Tn
            new_pos = seen[:, None] + torch.arange(Tn, device=dev)
        new_evict, first = chunk_decisions(logits, valid)  # as the reference cache
        if S > 0:
            keys_o, vals_o, pos_o, ev_o = self._dense()
            has_first = first < Tn
            first_logit = torch.gather(logits, 1, first.clamp(max=Tn - 1)[:, None, None].expand(-1, 1, Hkv))[:, 0]
            pending = (pos_o == (seen - 1)[:, None, None]) & (has_first & (seen > 0))[:, None, None]
            ev_o = ev_o | (pending & (first_logit > 0)[..., None])
            dead = ev_o & ((seen[:, None, None] - pos_o) > W)  # only for window 0: key p-1 hidden from query p
            pos_o = pos_o.masked_fill(dead, -1)
            keys_all = torch.cat([keys_o, key.to(self.dtype)], 2)
            vals_all = torch.cat([vals_o, value.to(self.dtype)], 2)
            pos_all = torch.cat([pos_o, new_pos[:, None, :].expand(B, Hkv, Tn)], 2)
            ev_all = torch.cat([ev_o, new_evict.transpose(1, 2)], 2)
        else:
            keys_all, vals_all = key.to(self.dtype), value.to(self.dtype)
            pos_all = new_pos[:, None, :].expand(B, Hkv, Tn)
            ev_all = new_evict.transpose(1, 2)
        now_total = (pos_all >= 0).sum().to(torch.int32)
        self.seen_s = (seen + n_valid).to(torch.int32).repeat_interleave(Hkv)
        keep, counts = self._keep(pos_all, ev_all)  # survivors after this chunk, at the new `seen`
        counts_host = self._counts_to_host(counts)
        triton = self.backend == "triton"
        if S > 0:
            if triton:
                from dms_kernels.decode_attention import chunk_attention

                o_a, lse_a = chunk_attention(query, keys_o, vals_o, new_pos, pos_o, ev_o, W, scaling)
            else:
                o_a, lse_a = masked_attention_lse(query, keys_o, vals_o, new_pos, pos_o, ev_o, W, scaling)
        # Chunk-internal attention: real columns moved to the front (stable), so that column distance is
        # position distance for any padding layout. Padding columns then come after every real one, so the
        # causal mask alone keeps them from real queries (no document ids: the hard kernel's gathered path,
        # no host syncs); what padding queries compute is zeroed below.
        if not padded:  # no padding (the common prompt): no reordering copies
            evc = new_evict.transpose(1, 2).contiguous()
            o_b, lse_b = _hard_chunk_attention(query, key, value, evc, W, None, scaling, triton)
        else:
            order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices  # [B, Tn]
            inv = torch.argsort(order, dim=-1)
            qc = torch.gather(query, 2, order[:, None, :, None].expand(B, H, Tn, D))
            kc = torch.gather(key, 2, order[:, None, :, None].expand(B, Hkv, Tn, key.shape[-1]))
            vc = torch.gather(value, 2, order[:, None, :, None].expand(B, Hkv, Tn, value.shape[-1]))
            evc = torch.gather(new_evict, 1, order[..., None].expand(B, Tn, Hkv)).transpose(1, 2).contiguous()
            o_b, lse_b = _hard_chunk_attention(qc, kc, vc, evc, W, None, scaling, triton)
            o_b = torch.gather(o_b, 2, inv[:, None, :, None].expand(B, H, Tn, o_b.shape[-1]))
            lse_b = torch.gather(lse_b, 2, inv[:, None, :].expand(B, H, Tn))
        if S > 0:
            o_b, lse_b = o_b.float(), lse_b.float()
            m = torch.maximum(lse_a, lse_b).nan_to_num(0.0, neginf=0.0)
            wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
            out = (o_a * wa[..., None] + o_b * wb[..., None]) / (wa + wb).clamp(min=1e-30)[..., None]
        else:
            out = o_b  # a first prompt: the chunk's own attention is the whole answer (no fp32 round trip)
        if padded:
            out = out.masked_fill(~valid[:, None, :, None], 0.0)
        out = out.to(query.dtype)
        # State: the real new keys appended, pruned at the next position, the pool repacked (now or at flush()).
        pending = dict(keys=keys_all, values=vals_all, pos=pos_all, ev=ev_all, keep=keep, counts=counts,
                       counts_host=counts_host)
        if defer:
            self._pending = pending
        else:
            self._pack(**pending)
        return out, now_total, counts.sum()

    # --- memory --------------------------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        return self.k_pool.element_size() * (self.D + self.DV)

    def pages_in_use(self) -> int:
        self.flush()
        return self.capacity - int(self.free_top[0])

    def check_allocator(self):
        """Internal invariants (tests): every page is either free exactly once or owned by exactly one block."""
        self.flush()
        PS = self.page_size
        free = self.free_stack[: int(self.free_top[0])].long().tolist()
        nblk = ((self.seq_len.long() + PS - 1) // PS).tolist()
        owned = [int(self.block_table[n, j]) for n in range(self.N) for j in range(nblk[n])]
        everything = free + owned
        assert len(everything) == len(set(everything)), "a page is used twice (or free and used)"
        assert sorted(everything) == list(range(self.capacity)), "a page leaked (neither free nor owned)"
        return len(owned), len(free)


class PagedDMSCache(Cache):
    """A transformers ``Cache`` holding each (sequence, KV head)'s live tokens in pages (see module doc).

    Args:
        model: a retrofitted model (for the layer count), or ``num_layers``.
        page_size: slots per page (power of two >= 16; 64 default: one 64 x 128 tile per load).
        backend: ``triton`` (CUDA kernels), ``torch`` (references) or ``auto`` (triton on CUDA).
        prefill_chunk: columns per prefill chunk; default: a whole call per chunk with the Triton kernels
            (O(chunk) memory), ``DEFAULT_TORCH_CHUNK`` with the PyTorch references (O(chunk^2) scores).
    """

    def __init__(self, model=None, num_layers: int | None = None, page_size: int = 64, backend: str = "auto",
                 prefill_chunk: int | None = None):
        if num_layers is None:
            from .patching import dms_state

            num_layers = dms_state(model).num_layers
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16 (tl.dot tiles); got {page_size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1; got {prefill_chunk}")
        if backend == "auto":
            dev = None
            if model is not None:
                p = next(model.parameters(), None)
                dev = p.device if p is not None else None
            backend = "triton" if (dev is not None and dev.type == "cuda") else "torch"
            why = _triton_unsupported(model) if backend == "triton" else None
            if why is not None:
                warnings.warn(f"PagedDMSCache(backend='auto'): the Triton kernels do not support {why}; using the "
                              "PyTorch backend", stacklevel=2)
                backend = "torch"
        self.backend = backend
        super().__init__(layers=[PagedDMSCacheLayer(page_size, backend, prefill_chunk) for _ in range(num_layers)])
        for layer in self.layers:
            layer.defer_pack = True
        self._deferred: list[int] = []  # layers whose prompt repack is pending (at most the previous one)

    # batch operations change the layout: leave static (graph) decoding first (dms/graphs.py)
    def reorder_cache(self, beam_idx):
        from .graphs import close_graph_step

        close_graph_step(self)
        return super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices):
        from .graphs import close_graph_step

        close_graph_step(self)
        return super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int):
        from .graphs import close_graph_step

        close_graph_step(self)
        return super().batch_repeat_interleave(repeats)

    def dms_attend(self, layer_idx, query, key, value, logits, valid, window, scaling):
        if self.backend == "triton" and query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"PagedDMSCache(backend='triton') needs CUDA tensors; got {query.device}. "
                             "Use backend='torch' (or 'auto') on CPU")
        layer = self.layers[layer_idx]
        out = layer.attend(query, key, value, logits, valid, window, scaling)
        # Earlier layers' repacks wait for their survivor counts on the host: run them now that this layer's
        # attention is queued behind them (module docstring); this layer's own repack waits for the next one.
        self.flush(keep=layer_idx)
        if layer._pending is not None:
            self._deferred.append(layer_idx)
        return out

    def flush(self, keep: int | None = None):
        """Run every pending repack (except layer ``keep``'s); readers of the whole cache call this."""
        left = []
        for i in self._deferred:
            if i == keep:
                left.append(i)
            else:
                self.layers[i].flush()
        self._deferred = left

    def shrink(self):
        """Repack every layer's pool to its live pages (plus headroom); returns bytes allocated after."""
        from .graphs import close_graph_step

        close_graph_step(self)
        for l in self.layers:
            if l.is_initialized:
                l._pack(*l._dense())
        return self.stats()["bytes_allocated"]

    def stats(self) -> dict:
        """Reference keys (tokens seen/held, memory CR overall/per layer/per head, bytes, peak, per call)
        plus ``bytes_allocated`` (pool capacity), ``bytes_live`` (held tokens), ``pages_in_use``,
        ``tokens_held_per_layer_head`` ([L][B][Hkv])."""
        from .graphs import close_graph_step

        close_graph_step(self)  # static decoding keeps no per-step history: end it so the peak is complete
        self.flush()
        layers = [l for l in self.layers if l.is_initialized]
        if not layers:
            return {"tokens_seen": 0, "tokens_held": 0, "memory_cr": 1.0}
        seen = layers[0].seen
        Hkv = layers[0].Hkv
        held = torch.stack([l.held_tokens() for l in layers])  # [L, B, Hkv]
        seen_total = int(seen.sum()) * Hkv * len(layers)
        held_total = int(held.sum())
        bpt = layers[0].bytes_per_token()
        hist = [sum(int(x) for x in xs) for xs in zip(*[l.held_history for l in layers])]
        return {
            "tokens_seen": int(seen.sum()),
            "tokens_held": held_total,
            "memory_cr": seen_total / max(held_total, 1),
            "memory_cr_per_layer": (seen.sum() * Hkv / held.sum(dim=(1, 2)).clamp(min=1)).tolist(),
            "memory_cr_per_head": (seen.sum() / held.sum(dim=1).clamp(min=1)).tolist(),
            "bytes_held": held_total * bpt,
            "bytes_dense": seen_total * bpt,
            "peak_tokens_held": sum(int(l._peak) for l in layers if l._peak is not None),
            "held_per_call": hist,
            "bytes_live": held_total * bpt,
            "bytes_allocated": sum(l.capacity * l.page_size * l.bytes_per_token() for l in layers),
            "pages_in_use": sum(l.pages_in_use() for l in layers),
            "tokens_held_per_layer_head": held.tolist(),
        }


def make_cache(model, kind: str = "auto", **kwargs) -> Cache:
    """The DMS cache for ``model``: ``paged`` (this module), ``reference`` (dms.cache.DMSCache), or
    ``auto``: paged when the model sits on CUDA, reference otherwise."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}; got {kind!r}")
    if kind == "auto":
        p = next(model.parameters(), None)
        kind = "paged" if (p is not None and p.device.type == "cuda") else "reference"
    if kind == "reference":
        from .cache import DMSCache

        return DMSCache(model)
    return PagedDMSCache(model, **kwargs)
