"""Training-free KV-cache baselines applied to a plain (not retrofitted) model, at a fixed KV budget.

Each policy is a transformers ``Cache`` (:class:`PolicyCache`) plus one registered attention function
(``kv_policy``, :func:`policy_attention_forward`) that hands every layer call to the cache, so the policy
sees the attention probabilities it needs. The cache appends the new keys, attends (eager fp32, GQA-aware)
and then evicts down to the budget, like :class:`dms.DMSCache` does.

Budget semantics (shared with DMS's "tokens held"): ``budget`` is the number of tokens each
``(row, KV head)`` holds between calls, so a decode step reads ``budget + 1`` keys (the new one included).
For a context of ``T`` tokens and compression ratio ``CR`` use ``budget = T // CR``. A prompt is processed
in chunks (``prefill_chunk``) with eviction after each chunk, so queries inside a chunk additionally see the
rest of the chunk; sliding window and StreamingLLM apply their masks per query, so they are exact for any
chunking. Quest keeps everything and limits what is *read*: it is compared on the KV-reads axis.

Policies (``POLICIES``):

- ``full``: keeps every token (the uncompressed reference through the same code path).
- ``sliding_window``: keeps the ``budget`` most recent tokens.
- ``streaming_llm``: keeps the first ``sink_tokens`` tokens (attention sinks) and the ``budget - sink_tokens``
  most recent ones (Xiao et al., 2023).
- ``h2o``: keeps the ``recent_fraction * budget`` most recent tokens and, of the others, the heavy hitters with
  the largest attention accumulated over all queries so far (summed over the query heads of a GQA group)
  (Zhang et al., 2023).
- ``tova``: keeps the ``budget`` tokens with the largest attention from the *current* (last) query, averaged
  over the query heads of a GQA group; i.e. drops the lowest-scored token each step (Oren et al., 2024).
- ``quest``: keeps all tokens in pages of ``page_size`` and limits what each query *reads* to ``budget`` KV
  tokens (Tang et al., 2024). A query first reads the metadata of every page that starts at or before its position
  (``n_scored = pos // page_size + 1`` pages; for a decode step all ``ceil(S / page_size)`` pages of the ``S``
  held keys): the elementwise key max and min vectors, two D-vectors per page, i.e. one KV-token-equivalent per
  page. It then reads the ``max(1, (budget - n_scored) // page_size)`` pages with the largest upper-bound score
  ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` (its own page always included), so metadata plus pages stay within
  ``budget``; when even the metadata and one page do not fit, it reads its own page only and goes over (counted
  in ``quest_over_budget_queries``). A query whose visible keys fit in the budget reads them all, without metadata.
  ``quest_metadata="ignore"`` restores the older accounting (``budget // page_size`` pages, metadata not counted;
  comparison only). With ``dense_prefill`` (generation) prompt chunks read everything, as in the paper.
"""
from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

POLICIES = ("full", "sliding_window", "streaming_llm", "h2o", "tova", "quest")
QUEST_METADATA = ("count", "ignore")  # Quest page-metadata reads: counted in the reads budget, or not (older runs)
ATTN_NAME = "kv_policy"


class PolicyCacheLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "PolicyCache"):
        super().__init__()
        self.cache = cache
        self.pos = None  # [B, Hkv, S] absolute positions (all rows share one length: no padding)
        self.score = None  # [B, Hkv, S] policy score (H2O accumulated, TOVA current attention)
        self.seen = 0
        self.columns = 0
        self.peak_tokens = 0
        self.decode_reads = 0  # KV tokens read by decode queries (Quest: page-metadata token-equivalents included)
        self.prefill_reads = 0
        self.quest_metadata_reads = 0  # Quest page-metadata token-equivalents read (decode + prefill)
        self.quest_over_budget = 0  # Quest queries (x rows x KV heads) that read more than the budget
        self.held_history: list[int] = []

    # --- transformers Cache protocol -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        B, Hkv, _, D = key_states.shape
        self.keys = key_states.new_zeros(B, Hkv, 0, D)
        self.values = value_states.new_zeros(B, Hkv, 0, value_states.shape[-1])
        self.pos = torch.zeros(B, Hkv, 0, dtype=torch.long, device=key_states.device)
        self.score = torch.zeros(B, Hkv, 0, dtype=torch.float32, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states  # policy_attend appends, attends and evicts in one place

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.keys = self.values = self.pos = self.score = None
        self.seen = self.columns = 0
        self.is_initialized = False

    # --- policy ----------------------------------------------------------------------------------
    def held(self) -> int:
        return 0 if self.pos is None else self.pos.numel()

    def _visible(self, q_pos: torch.Tensor, query: torch.Tensor, dense: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B|1, Hkv|1, Tn, S]`` bool: which held keys each new query reads; and, for Quest, ``[Tn]`` long: the
        page-metadata token-equivalents each query reads besides (None for the other policies)."""
        c = self.cache
        kp = self.pos[:, :, None, :]  # [B, Hkv, 1, S]
        qp = q_pos[None, None, :, None]
        vis = kp <= qp
        meta = None
        if c.policy == "sliding_window":
            vis = vis & ((qp - kp) <= c.budget)
        elif c.policy == "streaming_llm":
            vis = vis & ((kp < c.sink_tokens) | ((qp - kp) <= c.budget - c.sink_tokens))
        elif c.policy == "quest" and not dense:
            pages, meta = self._quest_pages(query, q_pos)
            vis = vis & pages
        return vis, meta

    def _quest_pages(self, query: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B|1, Hkv|1, Tn, S]`` bool: the keys of the pages each query reads; ``[Tn]`` long: the metadata
        token-equivalents (one per scored page) it reads to choose them (zeros with ``quest_metadata="ignore"``)."""
        c = self.cache
        P = c.page_size
        B, Hkv, S, D = self.keys.shape
        dev = query.device
        n_pages = math.ceil(S / P)
        every = torch.ones(1, 1, 1, S, dtype=torch.bool, device=dev)
        no_meta = torch.zeros_like(q_pos)
        if c.quest_metadata == "ignore":  # the older accounting: budget // P pages, metadata reads not counted
            k_sel = torch.full_like(q_pos, max(1, c.budget // P))
            if n_pages <= c.budget // P or S <= c.budget + 1:
                return every, no_meta
            fits, meta = torch.zeros_like(q_pos, dtype=torch.bool), no_meta
        else:
            # Positions == slots (Quest keeps all): the query at q reads the metadata of the pages starting <= q.
            n_scored = q_pos // P + 1
            fits = q_pos + 1 <= c.budget  # all its visible keys cost no more than the budget: read them, no scoring
            if bool(fits.all()):
                return every, no_meta
            k_sel = ((c.budget - n_scored) // P).clamp(min=1)
            meta = torch.where(fits, no_meta, n_scored)
        pad = n_pages * P - S
        kf = self.keys.float()
        kmax = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(B, Hkv, n_pages, P, D).amax(3)
        kmin = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(B, Hkv, n_pages, P, D).amin(3)
        g = query.shape[1] // Hkv
        q = query.float().view(B, Hkv, g, -1, D)  # [B, Hkv, g, Tn, D]
        ub = torch.maximum(q[..., None, :] * kmax[:, :, None, None], q[..., None, :] * kmin[:, :, None, None])
        ub = ub.sum(-1).sum(2)  # [B, Hkv, Tn, n_pages]
        page_start = torch.arange(n_pages, device=dev) * P
        own = (q_pos[:, None] // P) == torch.arange(n_pages, device=dev)[None, :]  # [Tn, n_pages]
        future = page_start[None, :] > q_pos[:, None]
        ub = ub.masked_fill(future, float("-inf")).masked_fill(own, float("inf"))
        k = min(int(k_sel.max()), n_pages)
        top = ub.topk(k, dim=-1).indices  # [B, Hkv, Tn, k], best first (own page first)
        take = (torch.arange(k, device=dev)[None, :] < k_sel[:, None]).expand_as(top)  # each query's k_sel best
        pages = torch.zeros_like(ub, dtype=torch.bool).scatter_(-1, top, take)
        return pages.repeat_interleave(P, dim=-1)[..., :S] | fits[:, None], meta

    def attend(self, query, key, value, scaling: float, dense: bool = False) -> torch.Tensor:
        """query ``[B, H, Tn, D]``, key/value ``[B, Hkv, Tn, D]`` -> ``[B, H, Tn, D]``; then evict to the budget."""
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        B, H, Tn, D = query.shape
        Hkv = key.shape[1]
        g = H // Hkv
        dev = query.device
        q_pos = torch.arange(self.seen, self.seen + Tn, device=dev)
        self.keys = torch.cat([self.keys, key], dim=2)
        self.values = torch.cat([self.values, value], dim=2)
        self.pos = torch.cat([self.pos, q_pos.expand(B, Hkv, Tn)], dim=2)
        self.score = torch.cat([self.score, self.score.new_zeros(B, Hkv, Tn)], dim=2)
        self.columns += Tn
        self.seen += Tn
        self.peak_tokens = max(self.peak_tokens, self.held())

        vis, meta = self._visible(q_pos, query, dense)  # [B|1, Hkv|1, Tn, S], [Tn] or None
        reads = vis.expand(B, Hkv, Tn, -1).sum(-1)  # [B, Hkv, Tn] KV tokens each query reads
        if meta is not None:  # Quest: plus the page metadata it scores (one token-equivalent per page)
            reads = reads + meta
            self.quest_metadata_reads += int(meta.sum()) * B * Hkv
            if self.cache.quest_metadata == "count":
                self.quest_over_budget += int((reads > self.cache.budget).sum())
        if Tn == 1:
            self.decode_reads += int(reads.sum())
        else:
            self.prefill_reads += int(reads.sum())
        q = query.float().view(B, Hkv, g, Tn, D)
        s = torch.matmul(q, self.keys.float()[:, :, None].transpose(-1, -2)) * scaling  # [B, Hkv, g, Tn, S]
        s = s.masked_fill(~vis[:, :, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out = torch.matmul(p, self.values.float()[:, :, None]).view(B, H, Tn, -1)
        pol = self.cache.policy
        if pol == "h2o":
            self.score = self.score + p.sum(dim=(2, 3))
        elif pol == "tova":
            self.score = p[:, :, :, -1].mean(2)
        self._evict()
        self.held_history.append(self.held())
        return out.to(query.dtype)

    def _evict(self):
        c = self.cache
        S = self.pos.shape[-1]
        if c.policy in ("full", "quest") or S <= c.budget:
            return
        pos = self.pos.float()
        if c.policy == "sliding_window":
            prio = pos
        elif c.policy == "streaming_llm":
            prio = pos.masked_fill(self.pos < c.sink_tokens, float("inf"))
        elif c.policy == "h2o":
            n_recent = int(round(c.recent_fraction * c.budget))
            recent = self.pos > (self.seen - 1 - n_recent)
            prio = self.score.masked_fill(recent, float("inf"))
        else:  # tova
            prio = self.score.clone()
            prio[..., -1] = float("inf")  # the newest token has no score from a later query yet
        idx = prio.topk(c.budget, dim=-1).indices.sort(dim=-1).values  # keep slots in position order
        D, Dv = self.keys.shape[-1], self.values.shape[-1]
        self.keys = torch.gather(self.keys, 2, idx[..., None].expand(-1, -1, -1, D))
        self.values = torch.gather(self.values, 2, idx[..., None].expand(-1, -1, -1, Dv))
        self.pos = torch.gather(self.pos, 2, idx)
        self.score = torch.gather(self.score, 2, idx)


class PolicyCache(Cache):
    """A transformers ``Cache`` that applies one training-free eviction policy at a fixed budget.

    Args:
        num_layers: decoder layers of the model.
        policy: one of :data:`POLICIES`.
        budget: tokens held per (row, KV head) between calls (ignored by ``full``); ``T // CR``.
        sink_tokens: StreamingLLM attention sinks (default 4).
        recent_fraction: H2O share of the budget kept for the most recent tokens (default 0.5).
        page_size: Quest page size (default 16).
        quest_metadata: ``"count"`` (default): Quest's reads include its page metadata (one token-equivalent per
            scored page) and its page selection is sized so that metadata plus pages fit in ``budget``;
            ``"ignore"``: the older accounting (``budget // page_size`` pages, metadata not counted).
    """

    def __init__(self, num_layers: int, policy: str, budget: int | None = None, sink_tokens: int = 4,
                 recent_fraction: float = 0.5, page_size: int = 16, quest_metadata: str = "count"):
        if policy not in POLICIES:
            raise ValueError(f"unknown KV policy {policy!r}; choose one of {POLICIES}")
        if quest_metadata not in QUEST_METADATA:
            raise ValueError(f"unknown quest_metadata {quest_metadata!r}; choose one of {QUEST_METADATA}")
        if policy == "full":
            budget = budget or 1 << 62
        if budget is None or isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1 (tokens held per row and KV head = context // CR); "
                             f"got {budget!r}")
        if policy == "streaming_llm" and budget <= sink_tokens:
            raise ValueError(f"streaming_llm needs budget > sink_tokens; got budget {budget}, sink_tokens {sink_tokens}")
        if not 0 <= recent_fraction <= 1:
            raise ValueError(f"recent_fraction must be in [0, 1]; got {recent_fraction}")
        if policy == "quest" and budget < page_size:
            raise ValueError(f"quest needs budget >= page_size; got budget {budget}, page_size {page_size}")
        self.policy, self.budget = policy, budget
        self.sink_tokens, self.recent_fraction, self.page_size = sink_tokens, recent_fraction, page_size
        self.quest_metadata = quest_metadata
        self.dense_prefill = False
        super().__init__(layers=[PolicyCacheLayer(self) for _ in range(num_layers)])

    def policy_attend(self, layer_idx: int, query, key, value, scaling: float) -> torch.Tensor:
        dense = self.dense_prefill and query.shape[2] > 1
        return self.layers[layer_idx].attend(query, key, value, scaling, dense=dense)

    def stats(self) -> dict:
        """Tokens seen/held, memory CR, peak tokens held and KV reads (per KV head, summed over rows and layers).

        Quest also reports ``quest_metadata`` (the accounting), ``quest_metadata_reads`` (page-metadata
        token-equivalents read, decode + prefill, included in the KV reads with ``"count"``; 0 with ``"ignore"``)
        and ``quest_over_budget_queries`` (queries x rows x KV heads whose reads exceeded the budget).
        """
        layers = [l for l in self.layers if l.is_initialized]
        if not layers:
            return {"tokens_seen": 0, "tokens_held": 0, "memory_cr": 1.0}
        B, Hkv = layers[0].pos.shape[:2]
        seen = layers[0].seen * B
        held = sum(l.held() for l in layers)
        per_layer = [seen * Hkv / max(l.held(), 1) for l in layers]
        st = {"tokens_seen": seen, "tokens_held": held, "memory_cr": seen * Hkv * len(layers) / max(held, 1),
              "memory_cr_per_layer": per_layer,
              "peak_tokens_held": sum(l.peak_tokens for l in layers),
              "decode_kv_reads": sum(l.decode_reads for l in layers),
              "prefill_kv_reads": sum(l.prefill_reads for l in layers)}
        if self.policy == "quest":
            st.update({"quest_metadata": self.quest_metadata,
                       "quest_metadata_reads": sum(l.quest_metadata_reads for l in layers),
                       "quest_over_budget_queries": sum(l.quest_over_budget for l in layers)})
        return st


def policy_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: with a :class:`PolicyCache` the cache attends, else plain causal attention."""
    from ..attention import dense_attention

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache = getattr(module, "_kvp_cache", None)
    if isinstance(cache, PolicyCache):
        return cache.policy_attend(module.layer_idx, query, key, value, scaling).transpose(1, 2), None
    if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
        raise ValueError("kv_policy attention supports unpadded batches only; build prompts of equal length")
    return dense_attention(query, key, value, scaling), None


def _stack_prehook(stack, args, kwargs):
    cache = kwargs.get("past_key_values")
    for attn in stack._kvp_attn:
        attn._kvp_cache = cache
    return None


def prepare_policy_model(model):
    """Switch a plain causal LM to the ``kv_policy`` attention (idempotent); returns the model.

    Without a :class:`PolicyCache` the model computes exactly the original causal attention.
    """
    from ..patching import _check_family, decoder_stack

    _check_family(model.config)
    AttentionInterface.register(ATTN_NAME, policy_attention_forward)
    stack = decoder_stack(model)
    if not getattr(stack, "_kvp_attn", None):
        stack._kvp_attn = [layer.self_attn for layer in stack.layers]
        stack.register_forward_pre_hook(_stack_prehook, with_kwargs=True)
    model.config._attn_implementation = ATTN_NAME
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_NAME
    return model


def make_cache(model, policy: str, budget: int | None = None, **opts) -> PolicyCache:
    """A :class:`PolicyCache` for ``model`` (prepared with :func:`prepare_policy_model`)."""
    prepare_policy_model(model)
    return PolicyCache(model.config.num_hidden_layers, policy, budget, **opts)
