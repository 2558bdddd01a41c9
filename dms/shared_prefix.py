"""Shared-prefix parallel sampling on the DMS cache (Hydragen-style prefix/suffix attention).

``W`` samples of one prompt share one copy of the prompt's (already DMS-compressed) KV; each sample
keeps only its own pruned suffix. A decode step splits attention exactly in two:

- prefix: the queries of all ``W`` samples (and all query heads of a KV group) attend to the shared
  prefix at once, ``[W * G, D] x [D, S_prefix]`` per KV head, reading the prefix KV a single time;
- suffix: each sample attends to its own tokens (reference DMS cache layer);

and the two partial results are merged exactly through their log-sum-exps.

Eviction keeps working in both parts. The prompt's decisions are the same for every sample (the
same tokens decide), so a prefix token evicted by them is gone for all samples once it leaves the
window. The last prompt token is the one exception: its decision is made by each sample's first
generated token, so it is not part of the shared prefix but of every sample's suffix.

Hierarchical sharing (``system_len=P0``): when the ``G`` prompts start with the same system prompt of
``P0`` real tokens, a third level holds ONE copy of the system part shared by all ``G * W`` rows. Only
system tokens whose visibility is the same for every row at every decode step go there: position
``p < min(P0 - 1, S - 1, S - window)`` (``S`` = the shortest prompt's length minus one = the first decode
position of that prompt). Their decisions are made by system tokens (identical across prompts) during
the prefill, and every decode query ``q >= S`` is more than ``window`` past them, so an evicted one is
already gone for every row and a kept one is visible to every row: the level is read-only. The rest
of the system prompt (the last system token's decision depends on each prompt's first user token,
and tokens within ``window`` of a decode query are visible or not depending on the prompt's length)
stays in each prompt's own level. A decode step then merges three exact partial attentions: system
level (one group of all ``G * W`` queries), prompt level (``W`` queries per prompt), suffix.

``model.generate(..., num_return_sequences=W)`` of a retrofitted model uses this automatically for
sampling (not beam search); ``dms_shared_prefix=False`` turns it off; ``dms_system_len=P0`` adds the
system level.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .cache import DMSCacheLayer, DMSLayerProtocol
from .paged_cache import TRITON_HEAD_DIMS


PREFIX_IMPL: str | None = None  # None: Triton on CUDA, the reference elsewhere; tests set "triton" on CPU too


def _impl(t) -> str:
    """``PREFIX_IMPL``, else Triton for CUDA tensors of a head dim the kernels take, else the PyTorch reference."""
    return PREFIX_IMPL or ("triton" if t.is_cuda and t.shape[-1] in TRITON_HEAD_DIMS else "reference")


def _prefix_attention(query, keys, values, visible, scaling, samples, length=None):
    """Prefix part: Triton on CUDA, the fp32 reference elsewhere (``dms_kernels.prefix_attention``)."""
    from dms_kernels.prefix_attention import prefix_attention

    return prefix_attention(query, keys, values, visible, scaling, samples, impl=_impl(query), length=length)


SUFFIX_CAPACITY = 64  # initial slots per (sample, KV head); doubles when full
SUFFIX_COMPACT_EVERY = 64  # steps between physical drops of evicted suffix entries


class SuffixStore:
    """Each sample's own tokens, one decode token per step for every row at once.

    Buffers ``[B, Hkv, capacity, D]`` grow by doubling; slot ``n`` is written by all rows in the same
    step, so a step costs a handful of tensor ops and no host synchronisation. Evicted entries are
    masked immediately and dropped physically every ``compact_every`` steps (a sort-based compaction
    that keeps rows aligned by padding with empty slots), so at most that many dead entries linger.
    Attention over the store uses the same Triton kernel as the prefix (one sample per group).
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, seen: torch.Tensor, capacity: int | None = None,
                 compact_every: int | None = None):
        capacity = capacity or SUFFIX_CAPACITY
        compact_every = compact_every or SUFFIX_COMPACT_EVERY
        B, Hkv, _, D = key.shape
        self.keys = key.new_zeros(B, Hkv, capacity, D)
        self.values = value.new_zeros(B, Hkv, capacity, value.shape[-1])
        self.pos = torch.full((B, Hkv, capacity), -1, dtype=torch.long, device=key.device)
        self.evict = torch.zeros(B, Hkv, capacity, dtype=torch.bool, device=key.device)
        self.seen = seen.clone()  # [B] position of the next token of each row
        self.n = 0
        self.compact_every = compact_every
        self.steps = 0
        self.is_initialized = True
        self._static_len = None  # begin_static .. end_static: fixed buffers, device-side slot counter

    def _grow(self):
        cap = self.keys.shape[2]
        pad = lambda t, fill: torch.cat([t, torch.full_like(t, fill)], dim=2)  # noqa: E731
        self.keys, self.values = pad(self.keys, 0), pad(self.values, 0)
        self.pos, self.evict = pad(self.pos, -1), pad(self.evict, False)
        assert self.keys.shape[2] == 2 * cap

    def held_tokens(self) -> torch.Tensor:
        n = self.n if self._static_len is None else self._static_len
        return (self.pos[..., :n] >= 0).sum(-1)

    # --- static mode (CUDA graphs, dms/graphs.py) ------------------------------------------------------
    def begin_static(self, steps: int):
        """Room for ``steps`` more tokens, then a fixed layout: writes go through a device slot counter."""
        while self.keys.shape[2] < self.n + steps:
            self._grow()
        self._n_dev = torch.full((1,), self.n, dtype=torch.long, device=self.keys.device)
        self._static_len = self.n + steps

    def end_static(self, window: int):
        if self._static_len is None:
            return
        self.n = int(self._n_dev[0])
        self._static_len = None
        self._compact(window)  # what the skipped periodic compactions would have dropped

    def _attend_static(self, query, key, value, logits, window: int, scaling: float):
        L = self._static_len
        B, Hkv = key.shape[:2]
        pos = self.pos[:, :, :L]
        prev = pos == (self.seen - 1)[:, None, None]  # unused slots hold -1
        self.evict[:, :, :L] |= prev & (logits[:, 0, :, None] > 0)
        slot = self._n_dev
        self.keys.index_copy_(2, slot, key)
        self.values.index_copy_(2, slot, value)
        self.pos.index_copy_(2, slot, self.seen[:, None, None].expand(B, Hkv, 1))
        qpos = self.seen[:, None, None]
        visible = (pos >= 0) & ~(self.evict[:, :, :L] & ((qpos - pos) > window))
        o, lse = _prefix_attention(query, self.keys, self.values, visible, scaling, 1, length=L)
        self.seen.add_(1)  # in place: a captured graph keeps advancing the same tensors
        self._n_dev.add_(1)
        self.steps += 1
        return o, lse

    def attend(self, query, key, value, logits, window: int, scaling: float, return_lse: bool = True):
        """query ``[B, H, 1, D]``, key/value ``[B, Hkv, 1, D]``, logits ``[B, 1, Hkv]`` -> (o, lse)."""
        if self._static_len is not None:
            return self._attend_static(query, key, value, logits, window, scaling)
        if self.n > 0:  # this token decides about each row's previous token (wherever compaction put it)
            prev = self.pos[:, :, : self.n] == (self.seen - 1)[:, None, None]
            self.evict[:, :, : self.n] |= prev & (logits[:, 0, :, None] > 0)
        if self.n == self.keys.shape[2]:
            self._grow()
        self.keys[:, :, self.n] = key[:, :, 0]
        self.values[:, :, self.n] = value[:, :, 0]
        self.pos[:, :, self.n] = self.seen[:, None]
        self.n += 1
        qpos = self.seen[:, None, None]
        pos = self.pos
        visible = (pos >= 0) & ~(self.evict & ((qpos - pos) > window))
        o, lse = _prefix_attention(query, self.keys, self.values, visible, scaling, 1, length=self.n)
        self.seen.add_(1)
        self.steps += 1
        if self.steps % self.compact_every == 0:
            self._compact(window)
        return o, lse

    def _compact(self, window: int):
        tmp = DMSCacheLayer()
        n = self.n
        tmp.keys, tmp.values = self.keys[:, :, :n], self.values[:, :, :n]
        tmp.pos, tmp.evict = self.pos[:, :, :n], self.evict[:, :, :n]
        tmp._prune(self.seen, window)
        m = tmp.keys.shape[2]
        self.keys[:, :, :m], self.values[:, :, :m] = tmp.keys, tmp.values
        self.pos[:, :, :m], self.evict[:, :, :m] = tmp.pos, tmp.evict
        self.pos[:, :, m:n] = -1
        self.evict[:, :, m:n] = False
        self.n = m


def _dense_prefix(layer) -> DMSCacheLayer:
    """A paged cache layer's held tokens in the reference layout ``[G, Hkv, S, D]`` (-1 = empty slot)."""
    keys, values, pos, ev = layer._dense()
    out = DMSCacheLayer()
    out.keys, out.values, out.pos, out.evict = keys, values, pos.long(), ev
    out.seen = layer.seen.clone()
    out.columns = layer.columns
    out.is_initialized = True
    return out


def _merge(o1, lse1, o2, lse2, out_dtype=None):
    """Exact merge in fp32: ``(o, lse)`` of the union of two disjoint key sets (lse -inf: no key); ``o`` in
    ``out_dtype`` (default fp32). One Triton launch where the prefix kernel is Triton (on CUDA), else PyTorch."""
    D = o1.shape[-1]
    if _impl(o1) == "triton" and D & (D - 1) == 0:
        from dms_kernels.prefix_attention.triton_kernel import merge_two

        return merge_two(o1, lse1, o2, lse2, out_dtype)
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    tot = w1 + w2
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / tot.clamp(min=1e-30)[..., None]
    return out.to(out_dtype or torch.float32), m + torch.log(tot)


def merge_partials(o1, lse1, o2, lse2):
    """Exact merge of two attention results over disjoint key sets: ``o [..., D]``, ``lse [...]``."""
    return _merge(o1, lse1, o2, lse2, o1.dtype)[0]


def _select(keys, values, pos, evict, keep):
    """The entries ``keep [B, Hkv, S]`` of a reference-layout cache, compacted to the front (order kept)."""
    n = keep.sum(-1)
    S = int(n.max()) if n.numel() else 0
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :S]
    keys = torch.gather(keys, 2, order[..., None].expand(-1, -1, -1, keys.shape[-1]))
    values = torch.gather(values, 2, order[..., None].expand(-1, -1, -1, values.shape[-1]))
    keep_s = torch.gather(keep, 2, order)
    pos = torch.gather(pos, 2, order).masked_fill(~keep_s, -1)
    evict = torch.gather(evict, 2, order) & keep_s
    return keys, values, pos, evict


def split_system(prefix: DMSCacheLayer, cutoff: int):
    """Move the entries at positions ``< cutoff`` (the same in every row) out of ``prefix`` into one copy.

    Returns ``(system, agree)``: ``system = (keys, values, pos)`` of shape ``[1, Hkv, S0, ...]`` (row 0's
    entries; pos -1 = empty slot) or None when empty, and ``agree [Hkv]``: heads whose rows all hold the
    same positions below ``cutoff``. On a head where rows disagree (a decision that flipped between rows
    by rounding: the rows' prefills ran in different batch columns) nothing moves, each row keeps its own.
    ``prefix`` keeps the rest, compacted.
    """
    pos = prefix.pos
    below = (pos >= 0) & (pos < cutoff)
    dead = below & prefix.evict  # evicted and more than `window` behind every decode query: gone for all rows
    low = below & ~prefix.evict  # kept: visible to every decode query of every row
    low_pos = torch.where(low, pos, torch.full_like(pos, -1)).sort(-1).values  # [G, Hkv, S]
    agree = (low_pos == low_pos[:1]).all(-1).all(0)  # [Hkv]
    move = low & agree[None, :, None]
    sk, sv, spos, _ = _select(prefix.keys[:1], prefix.values[:1], pos[:1], prefix.evict[:1], move[:1])
    prefix.keys, prefix.values, prefix.pos, prefix.evict = _select(
        prefix.keys, prefix.values, pos, prefix.evict, (pos >= 0) & ~move & ~dead)
    system = (sk, sv, spos) if spos.shape[-1] > 0 else None
    return system, agree


class SharedPrefixLayer(DMSLayerProtocol):
    def __init__(self, prefix: DMSCacheLayer, samples: int, compact_every: int = 32, system=None):
        super().__init__()
        self.samples = samples
        # system level (hierarchical sharing): [1, Hkv, S0, D] read-only, visible to every row; None: none
        self.sk = self.sv = self.spos = self.svisible = None
        if system is not None:
            self.sk, self.sv, self.spos = system
            self.svisible = self.spos >= 0
        self.pk, self.pv = prefix.keys, prefix.values  # [G, Hkv, S, D], one copy per prompt
        self.ppos, self.pevict = prefix.pos, prefix.evict
        self.pseen = prefix.seen  # [G]
        self.suffix: SuffixStore | None = None
        self.columns = prefix.columns
        self.compact_every = compact_every
        self.steps = 0
        self.is_initialized = True
        self.keys = self.pk  # what HF's generic helpers look at (device/dtype)
        self.values = self.pv
        self._static_left = None  # steps reserved by begin_static (None: ordinary decoding)
        self._window = None

    def lazy_initialization(self, key_states, value_states):
        pass

    def reorder_cache(self, beam_idx):
        raise ValueError("the shared-prefix cache does not support beam search; pass dms_shared_prefix=False")

    def batch_select_indices(self, indices):
        raise ValueError("the shared-prefix cache cannot drop samples; pass dms_shared_prefix=False")

    def batch_repeat_interleave(self, repeats: int):
        raise ValueError("the shared-prefix cache already holds every sample; pass dms_shared_prefix=False")

    # --- static mode (CUDA graphs, dms/graphs.py) ------------------------------------------------------
    def begin_static(self, steps: int):
        """Reserve ``steps`` decode steps: suffix room, no compaction, no host reads until end_static."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        self._static_left = int(steps)
        if self.suffix is not None:
            self.suffix.begin_static(steps)

    def advance_static(self, steps: int = 1):
        if self._static_left is None or steps > self._static_left:
            raise RuntimeError(f"{steps} static steps requested, {self._static_left} reserved; call begin_static again")
        self._static_left -= steps
        self.columns += steps
        self.steps += steps
        self.suffix.steps += steps

    def end_static(self):
        if self._static_left is None:
            return
        self._static_left = None
        if self.suffix is not None:
            self.suffix.end_static(self._window)
        if self._window is not None:
            self._compact_prefix(self.suffix.seen[:: self.samples], self._window)

    def static_host_state(self):
        return (self.columns, self.steps, self._static_left, None if self.suffix is None else self.suffix.steps)

    def set_static_host_state(self, state):
        self.columns, self.steps, self._static_left, suffix_steps = state
        if self.suffix is not None:
            self.suffix.steps = suffix_steps

    def _compact_prefix(self, next_pos: torch.Tensor, window: int):
        dead = self.pevict & ((next_pos[:, None, None] - self.ppos) > window)
        if not bool(dead.any()):
            return
        tmp = DMSCacheLayer()
        tmp.keys, tmp.values, tmp.pos, tmp.evict = self.pk, self.pv, self.ppos, self.pevict
        tmp._prune(next_pos, window)
        self.pk, self.pv, self.ppos, self.pevict = tmp.keys, tmp.values, tmp.pos, tmp.evict
        self.keys, self.values = self.pk, self.pv

    def held_tokens(self) -> torch.Tensor:
        """``[G * W, Hkv]`` entries each sample can use (its group's shared prefix + its own suffix)."""
        pre = (self.ppos >= 0).sum(-1).repeat_interleave(self.samples, 0)
        if self.svisible is not None:
            pre = pre + self.svisible.sum(-1)
        return pre + (self.suffix.held_tokens() if self.suffix is not None else 0)

    def system_held(self) -> int:
        return 0 if self.svisible is None else int(self.svisible.sum())

    def attend(self, query, key, value, logits, valid, window: int, scaling: float) -> torch.Tensor:
        B, H, Tn, D = query.shape
        W = self.samples
        G = self.pk.shape[0]
        if Tn != 1 or B != G * W:
            raise ValueError(
                f"the shared-prefix cache decodes one token per step for {G} prompts x {W} samples; got a chunk "
                f"of {Tn} tokens for batch {B}. Continue a conversation with a plain DMSCache instead.")
        if self.suffix is None:
            # First decode step (the last prompt token). Padding inside a step cannot be expressed by a
            # shared prefix; checked once here rather than every step (a host synchronisation).
            if valid is not None and not bool(valid.all()):
                raise ValueError("the shared-prefix cache got padding in a decode step; pass dms_shared_prefix=False")
            cap = None if self._static_left is None else max(SUFFIX_CAPACITY, self._static_left + 1)
            self.suffix = SuffixStore(key, value, self.pseen.repeat_interleave(W, 0), capacity=cap)
            if self._static_left is not None:
                self.suffix.begin_static(self._static_left)
            # The last prompt token decides about the prefix's last key. Every sample of a group processes the
            # same token here, so sample 0's decision is the group's decision.
            first = logits[::W, 0]  # [G, Hkv]
            pending = (self.ppos == (self.pseen - 1)[:, None, None]) & (self.pseen > 0)[:, None, None]
            self.pevict = self.pevict | (pending & (first > 0)[..., None])
        qpos = self.suffix.seen[::W]  # [G] position of this step's query (same for all samples of a group)
        visible = (self.ppos >= 0) & (self.ppos <= qpos[:, None, None]) & ~(
            self.pevict & ((qpos[:, None, None] - self.ppos) > window))
        o_p, lse_p = _prefix_attention(query, self.pk, self.pv, visible, scaling, W)
        if self.sk is not None:  # one group: every row's queries against the single system copy
            o_0, lse_0 = _prefix_attention(query, self.sk, self.sv, self.svisible, scaling, B)
            o_p, lse_p = _merge(o_0, lse_0, o_p, lse_p)
        o_s, lse_s = self.suffix.attend(query, key, value, logits, window, scaling)
        self.columns += Tn
        self.steps += 1
        self._window = window
        if self._static_left is not None:
            self._static_left -= 1
        elif self.steps % self.compact_every == 0:  # prefix entries die only in the first `window` steps
            self._compact_prefix(self.suffix.seen[::W], window)  # seen has advanced: the next position
        return _merge(o_p, lse_p, o_s, lse_s, query.dtype)[0]


class SharedPrefixDMSCache(Cache):
    """DMS cache for ``W`` samples per prompt with one shared copy of each prompt's pruned KV.

    With ``system_len`` (a system prompt common to all prompts) a third level holds the part of the
    system prompt that every row sees alike once for all rows (``stats()["system_prefix_bytes"]``).

    Build it with :meth:`from_prompts`; ``model.generate(num_return_sequences=W)`` does so itself.
    """

    def __init__(self, layers: list[SharedPrefixLayer]):
        super().__init__(layers=layers)
        self.samples = layers[0].samples
        self.system_len = 0  # system prompt length given to from_prompts (0: no system level)
        self.system_cutoff = 0  # positions below this may be in the system level

    @classmethod
    @torch.no_grad()
    def from_prompts(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, samples: int,
                     prefill_cache: str = "auto", system_len: int | None = None):
        """Prefill ``input_ids [G, T]`` minus the last token once, and share it among ``samples`` samples.

        ``prefill_cache``: the cache the prompt is prefilled through, ``paged`` (Triton kernels on CUDA:
        O(T) memory for long prompts), ``reference`` (fp32 PyTorch) or ``auto`` (paged on CUDA).
        ``system_len``: the prompts start with the same ``system_len`` real tokens (after left padding);
        the part of it that every row sees alike is held once for all ``G * samples`` rows (module doc).
        """
        from .paged_cache import PagedDMSCache, make_cache

        if samples < 1:
            raise ValueError(f"samples must be >= 1; got {samples}")
        if input_ids.shape[1] < 2:
            raise ValueError("a shared prefix needs prompts of at least 2 tokens")
        if system_len is not None:
            _check_system(input_ids, attention_mask, system_len)
        prefix_cache = make_cache(model, prefill_cache)
        am = attention_mask[:, :-1] if attention_mask is not None else None
        was = model.training
        model.eval()
        # Positions as generate() computes them for left-padded rows, so the prefix's RoPE matches the decode steps.
        pos = None
        if am is not None:
            pos = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)
        model(input_ids=input_ids[:, :-1], attention_mask=am, position_ids=pos, past_key_values=prefix_cache,
              use_cache=True)
        model.train(was)
        layers = prefix_cache.layers
        if isinstance(prefix_cache, PagedDMSCache):
            layers = [_dense_prefix(l) for l in layers]
        systems = [None] * len(layers)
        cutoff = 0
        if system_len:
            from .patching import dms_state

            window = dms_state(model).config.window
            first_q = int(layers[0].seen.min())  # the earliest decode position of any row
            # decided inside the system prompt during the prefill, and > window behind every decode query
            cutoff = max(0, min(system_len - 1, first_q - 1, first_q - window))
            if cutoff > 0:
                systems = [split_system(layer, cutoff)[0] for layer in layers]
        cache = cls([SharedPrefixLayer(layer, samples, system=sy) for layer, sy in zip(layers, systems)])
        cache.system_len = system_len or 0
        cache.system_cutoff = cutoff
        return cache

    def dms_attend(self, layer_idx, query, key, value, logits, valid, window, scaling):
        return self.layers[layer_idx].attend(query, key, value, logits, valid, window, scaling)

    def stats(self) -> dict:
        """Entries held (shared prefix counted once), per-sample view, and prefix bytes (constant in W)."""
        shared = sum(int((l.ppos >= 0).sum()) for l in self.layers)
        system = sum(l.system_held() for l in self.layers)
        suffix = sum(int(l.suffix.held_tokens().sum()) for l in self.layers if l.suffix is not None)
        per_sample = sum(int(l.held_tokens().sum()) for l in self.layers)
        l0 = self.layers[0]
        bpe = l0.pk.element_size() * (l0.pk.shape[-1] + l0.pv.shape[-1])
        seen = l0.suffix.seen if l0.suffix is not None else l0.pseen.repeat_interleave(self.samples)
        kv_seen = int(seen.sum()) * l0.pk.shape[1] * len(self.layers)
        return {
            "samples_per_prompt": self.samples,
            "prefix_entries_held": shared,  # per-prompt level
            "system_prefix_entries_held": system,  # system level, one copy for all rows
            "suffix_entries_held": suffix,
            "tokens_held": shared + system + suffix,
            "per_sample_entries_held": per_sample,
            "kv_entries_seen": kv_seen,
            "memory_cr": kv_seen / max(per_sample, 1),  # what each sample sees vs a dense per-sample cache
            "prefix_bytes": sum(l.pk.numel() + l.pv.numel() for l in self.layers) * l0.pk.element_size(),
            "system_len": self.system_len,
            "system_prefix_bytes": sum(l.sk.numel() + l.sv.numel() for l in self.layers if l.sk is not None)
            * l0.pk.element_size(),
            "bytes_held": (shared + system + suffix) * bpe,
            "bytes_dense": kv_seen * bpe,
        }


def _check_system(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, system_len: int):
    """Every row's first ``system_len`` real tokens (left padding skipped) are the same; else ValueError."""
    if isinstance(system_len, bool) or not isinstance(system_len, int) or system_len < 0:
        raise ValueError(f"system_len must be an integer >= 0; got {system_len!r}")
    G, T = input_ids.shape
    am = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    real = am.sum(-1)
    first = torch.where(real > 0, am.int().argmax(-1), torch.full_like(real, T))
    if system_len > int(real.min()):
        raise ValueError(f"system_len={system_len} is longer than the shortest prompt ({int(real.min())} real tokens)")
    if system_len == 0:
        return
    idx = first[:, None] + torch.arange(system_len, device=input_ids.device)[None]
    if not bool(torch.gather(am, 1, idx).all()):
        raise ValueError(f"system_len={system_len}: the first {system_len} real tokens of each row must be "
                         "contiguous (left padding only)")
    sys_ids = torch.gather(input_ids, 1, idx)
    bad = (sys_ids != sys_ids[:1]).any(-1).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"system_len={system_len}: the first {system_len} real tokens of prompt {int(bad[0])} "
                         "differ from those of prompt 0 (the system prompt must be the same in every row)")


def maybe_generate_shared(model, original_generate, args, kwargs):
    """``generate`` through a shared-prefix cache when it applies; returns None to fall back.

    ``dms_system_len=P0`` (popped here): the prompts share a system prompt of ``P0`` tokens, held once.
    """
    system_len = kwargs.pop("dms_system_len", None)
    if not kwargs.pop("dms_shared_prefix", True):
        return None
    gc = kwargs.get("generation_config") or model.generation_config
    W = kwargs.get("num_return_sequences") or getattr(gc, "num_return_sequences", 1) or 1
    beams = kwargs.get("num_beams") or getattr(gc, "num_beams", 1) or 1
    ids = args[0] if args else kwargs.get("input_ids")
    if system_len is not None and (beams > 1 or kwargs.get("streamer")):
        raise ValueError(f"dms_system_len={system_len} needs the shared-prefix cache, which does not do beam search "
                         f"(num_beams={beams}) or streamers; drop dms_system_len")
    if (W <= 1 and not system_len) or beams > 1 or kwargs.get("streamer"):
        return None
    if ids is None or ids.dim() != 2 or ids.shape[1] < 2:
        return None
    am = kwargs.get("attention_mask")
    cache = SharedPrefixDMSCache.from_prompts(model, ids, am, W, prefill_cache=getattr(model, "_dms_cache_kind", "auto"),
                                              system_len=system_len)
    kwargs = dict(kwargs)
    kwargs.pop("input_ids", None)
    kwargs["num_return_sequences"] = 1
    kwargs["past_key_values"] = cache
    if am is not None:
        kwargs["attention_mask"] = am.repeat_interleave(W, 0)
    return original_generate(ids.repeat_interleave(W, 0), *args[1:], **kwargs)
