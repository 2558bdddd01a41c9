"""Reference DMS KV cache: pure PyTorch, really drops evicted entries (the ground truth for the paged engine).

Semantics (DESIGN.md): when token ``p`` of a row arrives, its retention logit decides about key
``p - 1``. A key ``k`` is visible to query ``q`` iff ``q - k <= window`` or its decision is *keep*.
After each forward the cache drops every key that no future query can see (decision *evict* and
``next_position - k > window``), so between calls it holds the last ``window`` tokens plus the kept
older ones. Padding columns (attention_mask == 0) are never cached.

Storage per layer: ``keys/values [B, Hkv, S, D]``, ``pos [B, Hkv, S]`` (-1 = empty slot) and
``evict [B, Hkv, S]``; slots are compacted after every prune, so ``S`` is the largest number of
tokens held by any (row, head). The paged Triton engine stores the same set without the padding.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def chunk_decisions(logits: torch.Tensor, valid: torch.Tensor | None):
    """Eviction decisions of a chunk's new keys: each real token decides about the previous real token of its row.

    Args: logits ``[B, Tn, Hkv]`` (evict iff > 0), valid ``[B, Tn]`` bool or None (no padding).
    Returns: ``evict [B, Tn, Hkv]`` for the chunk's keys (False for the last real key of a row, whose decision
    comes with the next token, and for padding) and ``first [B]``, the first real column of each row (``Tn``
    if none): its logit decides about the last key cached before the chunk.
    """
    B, Tn, _ = logits.shape
    dev = logits.device
    if valid is None:  # the next real token is the next column
        evict = torch.cat([logits[:, 1:] > 0, torch.zeros_like(logits[:, :1], dtype=torch.bool)], 1)
        return evict, torch.zeros(B, dtype=torch.long, device=dev)
    idx = torch.arange(Tn, device=dev).expand(B, Tn)
    big = torch.full_like(idx, Tn)
    vidx = torch.where(valid, idx, big)
    # next_valid[j] = smallest valid index > j (Tn if none)
    nxt = torch.cat([vidx[:, 1:], big[:, :1]], dim=1).flip(-1).cummin(-1).values.flip(-1)
    gathered = torch.gather(logits, 1, nxt.clamp(max=Tn - 1)[..., None].expand(-1, -1, logits.shape[-1]))
    evict = (gathered > 0) & (nxt < Tn)[..., None] & valid[..., None]
    return evict, vidx.min(-1).values


class DMSLayerProtocol(CacheLayerMixin):
    """The transformers cache-layer protocol shared by every DMS layer (reference, paged, shared prefix).

    The DMS attention function appends, prunes and attends in one place (``dms_attend``), because it needs
    the retention logits that arrive with the same call; HF's ``update`` only passes through. The sequence
    length HF sees is ``columns``: every column processed, padding included.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    columns = 0

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1


class DMSCacheLayer(DMSLayerProtocol):
    def __init__(self):
        super().__init__()
        self.pos = None
        self.evict = None
        self.seen = None  # [B] real tokens per row
        self.columns = 0  # all columns processed, padding included (what HF calls the sequence length)
        self.peak_tokens = 0  # largest number of (row, head, token) entries held at once
        self.held_history: list[int] = []  # tokens held after each call, for the CR averaged over decoding
        self.seen_history: list[int] = []  # (row, head) tokens seen after each call

    # --- transformers Cache protocol -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        B, Hkv, _, D = key_states.shape
        dev = key_states.device
        self.keys = key_states.new_zeros(B, Hkv, 0, D)
        self.values = value_states.new_zeros(B, Hkv, 0, value_states.shape[-1])
        self.pos = torch.zeros(B, Hkv, 0, dtype=torch.long, device=dev)
        self.evict = torch.zeros(B, Hkv, 0, dtype=torch.bool, device=dev)
        self.seen = torch.zeros(B, dtype=torch.long, device=dev)
        self.is_initialized = True

    def reset(self):
        self.keys = self.values = self.pos = self.evict = self.seen = None
        self.columns = 0
        self.is_initialized = False

    def _index_batch(self, idx):
        if self.is_initialized:
            idx = idx.to(self.keys.device)
            for name in ("keys", "values", "pos", "evict", "seen"):
                setattr(self, name, getattr(self, name).index_select(0, idx))

    def reorder_cache(self, beam_idx):
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices):
        self._index_batch(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            idx = torch.arange(self.seen.shape[0], device=self.seen.device).repeat_interleave(repeats)
            self._index_batch(idx)

    # --- DMS ---------------------------------------------------------------------------------------
    def held_tokens(self) -> torch.Tensor:
        """``[B, Hkv]`` tokens currently held."""
        return (self.pos >= 0).sum(-1)

    def _prune(self, next_pos: torch.Tensor, window: int):
        """Drop keys no query at or after ``next_pos [B]`` can see, then compact the slots."""
        dead = self.evict & ((next_pos[:, None, None] - self.pos) > window)
        keep = (self.pos >= 0) & ~dead
        n = keep.sum(-1)
        S = int(n.max()) if n.numel() else 0
        # Stable sort puts held slots first in their original order; the tail beyond S is dropped.
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :S]
        self.keys = torch.gather(self.keys, 2, order[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = torch.gather(self.values, 2, order[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        keep_s = torch.gather(keep, 2, order)
        self.pos = torch.gather(self.pos, 2, order).masked_fill(~keep_s, -1)
        self.evict = torch.gather(self.evict, 2, order) & keep_s

    def attend(self, query, key, value, logits, valid, window: int, scaling: float, return_lse: bool = False):
        """Append a chunk, apply decisions, attend with the hard mask, prune.

        Args:
            query ``[B, H, Tn, D]``, key/value ``[B, Hkv, Tn, D]`` for the new columns;
            logits ``[B, Tn, Hkv]`` eviction logits of the new columns (evict iff > 0);
            valid ``[B, Tn]`` bool, False for padding columns (never cached), or None.
        Returns:
            ``[B, H, Tn, D]`` attention output (zeros for padding queries); with ``return_lse`` also
            the log-sum-exp ``[B, H, Tn]`` of the scores.
        """
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        B, H, Tn, D = query.shape
        Hkv = key.shape[1]
        dev = query.device
        if valid is None:
            valid = torch.ones(B, Tn, dtype=torch.bool, device=dev)
        self.columns += Tn
        n_valid = valid.sum(-1)
        new_pos = torch.where(valid, self.seen[:, None] + valid.long().cumsum(-1) - 1, -1)  # [B, Tn]

        new_evict, first = chunk_decisions(logits, valid)
        has_first = first < Tn
        if self.pos.shape[-1] > 0:
            first_logit = torch.gather(logits, 1, first.clamp(max=Tn - 1)[:, None, None].expand(-1, 1, Hkv))[:, 0]
            pending = (self.pos == (self.seen - 1)[:, None, None]) & has_first[:, None, None] & (self.seen > 0)[:, None, None]
            self.evict = self.evict | (pending & (first_logit > 0)[..., None])
            self._prune(self.seen, window)  # only matters for window == 0: key p-1 is hidden from query p

        # Append the real new keys.
        self.keys = torch.cat([self.keys, key], dim=2)
        self.values = torch.cat([self.values, value], dim=2)
        self.pos = torch.cat([self.pos, new_pos[:, None, :].expand(B, Hkv, Tn)], dim=2)
        self.evict = torch.cat([self.evict, new_evict.transpose(1, 2)], dim=2)
        held_now = int((self.pos >= 0).sum())
        self.peak_tokens = max(self.peak_tokens, held_now)

        out = masked_attention(query, self.keys, self.values, new_pos, self.pos, self.evict, window, scaling,
                               return_lse=return_lse)
        self.seen = self.seen + n_valid
        self._prune(self.seen, window)
        self.held_history.append(int((self.pos >= 0).sum()))
        self.seen_history.append(int(self.seen.sum()) * Hkv)
        return out


def masked_attention(query, keys, values, q_pos, k_pos, k_evict, window: int, scaling: float, q_chunk: int = 256,
                     return_lse: bool = False):
    """Eager fp32 attention with the DMS hard mask over explicitly positioned keys.

    query ``[B, H, Tq, D]``; keys/values ``[B, Hkv, S, D]``; q_pos ``[B, Tq]`` (-1 = padding query);
    k_pos ``[B, Hkv, S]`` (-1 = empty); k_evict ``[B, Hkv, S]``. Key ``s`` is visible to query ``i`` iff
    ``0 <= k_pos <= q_pos`` and not (``k_evict`` and ``q_pos - k_pos > window``). Queries with no
    visible key (padding) return zeros (and lse = -inf). Processed in query chunks to bound memory.
    With ``return_lse`` also returns the fp32 log-sum-exp ``[B, H, Tq]`` (to merge partial attentions).
    """
    B, H, Tq, D = query.shape
    Hkv = keys.shape[1]
    g = H // Hkv
    kf = keys.float().repeat_interleave(g, dim=1)
    vf = values.float().repeat_interleave(g, dim=1)
    kp = k_pos.repeat_interleave(g, dim=1)[:, :, None, :]  # [B, H, 1, S]
    ke = k_evict.repeat_interleave(g, dim=1)[:, :, None, :]
    outs, lses = [], []
    for s in range(0, Tq, q_chunk):
        q = query[:, :, s:s + q_chunk].float()
        qp = q_pos[:, None, s:s + q_chunk, None]  # [B, 1, tq, 1]
        vis = (kp >= 0) & (kp <= qp) & ~(ke & ((qp - kp) > window))
        scores = torch.matmul(q, kf.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~vis, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        outs.append(torch.matmul(p, vf))
        if return_lse:
            lses.append(torch.logsumexp(scores, dim=-1))
    out = torch.cat(outs, dim=2).to(query.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=2)
    return out


class DMSCache(Cache):
    """A transformers ``Cache`` that prunes itself with the model's DMS decisions.

    ``model.generate()`` of a retrofitted model creates one automatically; pass your own
    (``past_key_values=DMSCache(model)``) to keep it across turns or to read its statistics.
    """

    def __init__(self, model=None, num_layers: int | None = None):
        if num_layers is None:
            from .patching import dms_state

            num_layers = dms_state(model).num_layers
        super().__init__(layers=[DMSCacheLayer() for _ in range(num_layers)])

    def dms_attend(self, layer_idx, query, key, value, logits, valid, window, scaling):
        return self.layers[layer_idx].attend(query, key, value, logits, valid, window, scaling)

    # --- statistics --------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Tokens seen/held, memory CR (overall, per layer, per head), bytes held and peak.

        ``tokens_seen`` counts sequence tokens (summed over rows); ``tokens_held`` and
        ``kv_entries_seen`` count (layer, KV head, token) entries, so ``memory_cr`` is their ratio.
        """
        layers = [l for l in self.layers if l.is_initialized]
        if not layers:
            return {"tokens_seen": 0, "tokens_held": 0, "memory_cr": 1.0}
        seen = layers[0].seen  # [B]
        Hkv = layers[0].keys.shape[1]
        held = torch.stack([l.held_tokens() for l in layers])  # [L, B, Hkv]
        seen_total = int(seen.sum()) * Hkv * len(layers)
        held_total = int(held.sum())
        per_layer = (seen.sum() * Hkv / held.sum(dim=(1, 2)).clamp(min=1)).tolist()
        per_head = (seen.sum() / held.sum(dim=1).clamp(min=1)).tolist()  # [L][Hkv]
        bytes_per_token = layers[0].keys.element_size() * (layers[0].keys.shape[-1] + layers[0].values.shape[-1])
        hist = [sum(x) for x in zip(*[l.held_history for l in layers])]
        seen_hist = [sum(x) for x in zip(*[l.seen_history for l in layers])]
        per_call_cr = [s / max(h, 1) for s, h in zip(seen_hist, hist)]
        return {
            "tokens_seen": int(seen.sum()),
            "tokens_held": held_total,
            "kv_entries_seen": seen_total,
            "memory_cr": seen_total / max(held_total, 1),
            "memory_cr_per_layer": per_layer,
            "memory_cr_per_head": per_head,
            "bytes_held": held_total * bytes_per_token,
            "bytes_dense": seen_total * bytes_per_token,
            "peak_tokens_held": sum(l.peak_tokens for l in layers),
            "held_per_call": hist,
            # memory CR after each forward call (prefill, then every decode step), and its mean over decoding
            "memory_cr_per_call": per_call_cr,
            "memory_cr_mean_decoding": sum(per_call_cr[1:]) / max(len(per_call_cr) - 1, 1) if len(per_call_cr) > 1
            else (per_call_cr[0] if per_call_cr else 1.0),
        }
