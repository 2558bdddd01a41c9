"""The ``dms`` attention implementation registered through transformers' attention interface.

One function, :func:`dms_attention_forward`, decides per call:

- DMS off (teacher, or ``enabled=False``): plain causal attention (SDPA), identical to the original model;
- training (module in train mode, no cache): Gumbel-sigmoid soft mask, kernel from the registry;
- prefill / teacher-forced evaluation (eval mode, no cache): hard inference mask (evict iff ``l > 0``);
- with a DMS cache (``model.generate``): the cache appends, prunes and attends (dms/cache.py).

Kernels are looked up in :data:`TRAIN_KERNELS` by name (``eager`` reference, ``flex``, ``triton``).

Work that does not depend on the layer (document ids, which keys have a decision, the DMS-off mask,
every layer's Gumbel noise, the resolved kernel) is done once per forward pass in a
:class:`ForwardPlan`; the per-layer training path is the retention head, one fused decision op
(:class:`dms.heads.TrainDecisions`) and the kernel: 62 extra top-level ops per layer over plain
distillation at equal kernel, down from 124 (CPU count, ``python -m dms.training.bench profile-ops``).
At retrofit sizes (Qwen3-0.6B shapes, 4K tokens per micro-batch) every op is a kernel launch of a few
microseconds of work, so the host's per-op cost, not the GPU, is what they add to a step
(``bench step-time --profile`` reports GPU busy time next to step time).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .heads import eviction_logits, logistic_noise_offsets, shift_decisions, train_decisions

# name -> "module:function"; resolved lazily so that a missing optional backend (triton, flex)
# only fails when asked for. Signature: fn(q, k, v, log_keep, window, doc_ids=None, scale=None) -> (o, lse).
TRAIN_KERNELS: dict[str, str] = {
    "eager": "dms_kernels.train_attention.reference:dms_attention_reference",
    "flex": "dms_kernels.train_attention.flex:dms_attention_flex",
    "triton": "dms_kernels.train_attention:dms_attention",
}


def register_train_kernel(name: str, target: str | Callable) -> None:
    """Add or replace a training-attention kernel (a callable or a ``"module:function"`` string)."""
    TRAIN_KERNELS[name] = target


_RESOLVED: dict[str, Callable] = {}


def _resolve(target):
    if callable(target):
        return target
    fn = _RESOLVED.get(target)
    if fn is None:  # resolved once: this runs for every layer of every forward
        mod, name = target.split(":")
        fn = _RESOLVED[target] = getattr(importlib.import_module(mod), name)
    return fn


def triton_available() -> bool:
    try:
        return torch.cuda.is_available() and callable(_resolve(TRAIN_KERNELS["triton"]))
    except (ImportError, AttributeError):
        return False


_FALLBACK_WARNED: set = set()


def get_train_kernel(name: str, device: torch.device, query=None, key=None) -> Callable:
    """The training-attention kernel registered as ``name``; ``auto`` picks ``triton`` on CUDA where it is installed,
    else ``eager``. Given the layer's ``query`` / ``key``, ``auto`` also falls back to ``eager`` (with a warning,
    once per reason) when the Triton kernel does not support them (its ``unsupported_reason(q, k)`` attribute: head
    dims above 256, dtypes other than fp16/bf16/fp32), instead of failing."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "eager"
        if name == "triton" and query is not None:
            fn = _resolve(TRAIN_KERNELS["triton"])
            why = getattr(fn, "unsupported_reason", lambda q, k: None)(query, key)
            if why is not None:
                if why not in _FALLBACK_WARNED:
                    _FALLBACK_WARNED.add(why)
                    warnings.warn(f"DMS attention 'auto': the Triton kernel does not support {why}; using the eager "
                                  "reference (O(T^2) memory; attention_impl='flex' is the faster choice there)",
                                  stacklevel=3)
                name = "eager"
    if name not in TRAIN_KERNELS:
        raise ValueError(f"unknown DMS attention kernel {name!r}; registered: {sorted(TRAIN_KERNELS)}")
    try:
        return _resolve(TRAIN_KERNELS[name])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"DMS attention kernel {name!r} is not available here ({e}); use attention_impl='eager'") from e


class DMSState:
    """Runtime state shared by all patched layers of one model (``model._dms_state``).

    Filled by a forward pre-hook on the top-level model (2D padding mask, cache) and by the
    training loop (packed document ids). Layers leave per-layer decision statistics in ``records``.
    """

    def __init__(self, config, num_layers: int, num_kv_heads: int):
        self.config = config
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.attention_mask: torch.Tensor | None = None  # [B, S_total] 1 = real token
        self.doc_ids: torch.Tensor | None = None  # [B, T] packed documents (-1 = padding)
        self.cache = None
        self.records: dict[int, dict] = {}
        self.collect_stats = True
        self.plan: ForwardPlan | None = None  # per-forward shared masks and noise (reset by the model pre-hook)
        self.valid_memo: tuple | None = None  # (T, [B, T] padding mask or None if unpadded), once per forward

    def valid_columns(self, T: int, device) -> torch.Tensor | None:
        """``[B, T]`` bool real-token mask of this forward's last ``T`` columns, or None when no row is padded.

        Checked once per forward (one host read at the first layer), not once per layer.
        """
        if self.attention_mask is None:
            return None
        memo = self.valid_memo
        if memo is None or memo[0] != T:
            v = self.attention_mask[:, -T:].to(device).bool()
            memo = self.valid_memo = (T, None if bool(v.all()) else v)
        return memo[1]

    @property
    def enabled(self) -> bool:
        return self.config.enabled


def doc_ids_for(state: DMSState, T: int, device) -> torch.Tensor | None:
    """Document ids ``[B, T]`` for a cache-less forward: packed ids, else padding as its own document."""
    if state.doc_ids is not None:
        if state.doc_ids.shape[-1] != T:
            raise ValueError(f"doc_ids length {state.doc_ids.shape[-1]} != sequence length {T}")
        return state.doc_ids.to(device)
    m = state.attention_mask
    if m is not None and not bool(m.all()):
        m = m[:, -T:].to(device)
        return torch.where(m.bool(), 0, -1).to(torch.int32)
    return None


def dense_mask(Tq: int, S: int, device, doc_ids=None, key_valid=None) -> torch.Tensor | None:
    """Boolean mask ``[B or 1, 1, Tq, S]`` for :func:`dense_attention` (None: plain causal, no mask needed).

    Queries sit at the last Tq of the S key positions; ``doc_ids [B, Tq]`` (only without a cache) and
    ``key_valid [B, S]`` (padding) as in :func:`dense_attention`.
    """
    if doc_ids is None and key_valid is None:
        return None
    qpos = torch.arange(S - Tq, S, device=device)[:, None]
    mask = (torch.arange(S, device=device)[None, :] <= qpos)[None, None]  # [1, 1, Tq, S]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    # A padding query with no visible key would produce NaN; let it see itself (its output is unused).
    diag = torch.zeros(Tq, S, dtype=torch.bool, device=device)
    diag[torch.arange(Tq), torch.arange(S - Tq, S)] = True
    return mask | diag[None, None]


def dense_attention(query, key, value, scaling, doc_ids=None, key_valid=None, mask=None):
    """Plain causal attention, DMS off. query ``[B, H, Tq, D]``, key/value ``[B, Hkv, S, D]``, S >= Tq.

    Queries sit at the last Tq positions of the S keys (a standard cache). ``doc_ids [B, Tq]`` masks
    packed documents (only without a cache); ``key_valid [B, S]`` masks padding. ``mask``: the result of
    :func:`dense_mask` for these arguments, when the caller already built it (once per forward pass).
    """
    B, H, Tq, D = query.shape
    S = key.shape[2]
    g = H // key.shape[1]
    if g > 1:
        key = key.repeat_interleave(g, dim=1)
        value = value.repeat_interleave(g, dim=1)
    if mask is None:
        mask = dense_mask(Tq, S, query.device, doc_ids, key_valid)
    if mask is None:
        if Tq == S:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        else:
            qpos = torch.arange(S - Tq, S, device=query.device)[:, None]
            causal = torch.arange(S, device=query.device)[None, :] <= qpos
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
        return out.transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


class ForwardPlan:
    """What all layers of one forward pass share, built once instead of once per layer.

    Per-layer work in a 28-layer model is multiplied 28 times (and again by the backward pass), and at
    the sizes of a retrofit step each op is a launch of a few microseconds of GPU work: the document ids and decision
    validity, the dense mask of the DMS-off (teacher) path, the resolved kernel, and the Gumbel noise
    of every layer (one draw, :func:`dms.heads.logistic_noise_offsets`) live here. The model pre-hook
    (dms.patching) replaces the plan at every forward of the decoder stack; a layer called some other
    way builds one when the state's inputs (documents, padding mask, length) no longer match.
    """

    def __init__(self, state: DMSState, B: int, T: int, device):
        self.state = state
        self.B, self.T, self.device = B, T, torch.device(device)
        self.doc_src, self.mask_src = state.doc_ids, state.attention_mask  # identity: the plan's key
        self._docs = self._valid = self._count = self._noise = self._kernel = self._bounds = None
        self._docs_done = False
        self._dense: dict = {}

    def matches(self, state: DMSState, B: int, T: int, device) -> bool:
        return (self.B == B and self.T == T and self.device == device and self.doc_src is state.doc_ids
                and self.mask_src is state.attention_mask)

    @property
    def doc_ids(self) -> torch.Tensor | None:
        """``[B, T]`` document ids for DMS attention (packed ids, else padding as document -1)."""
        if not self._docs_done:
            self._docs = doc_ids_for(self.state, self.T, self.device)
            self._docs_done = True
        return self._docs

    @property
    def valid(self) -> torch.Tensor:
        """``[B, T]`` bool: key ``t`` has a decision (see :func:`decision_valid`)."""
        if self._valid is None:
            self._valid = decision_valid(self.doc_ids, self.B, self.T, self.device)
        return self._valid

    @property
    def count(self) -> torch.Tensor:
        """Number of keys with a decision (fp32 scalar tensor, shared by every layer's record)."""
        if self._count is None:
            self._count = self.valid.sum(dtype=torch.float32)
        return self._count

    def noise(self, layer_idx: int, n_out: int) -> torch.Tensor:
        """``[B, n_out, T]`` noise offsets of one layer (all layers drawn on first use, one RNG call)."""
        L = self.state.num_layers
        if self._noise is None or self._noise.shape[2] != n_out:
            cfg = self.state.config
            self._noise = logistic_noise_offsets((L, self.B, n_out, self.T), self.valid, cfg.alpha_offset,
                                                 cfg.tau, self.device)
        if not 0 <= layer_idx < L:
            raise ValueError(f"layer_idx {layer_idx} outside the {L} layers this DMS state was built for")
        return self._noise[layer_idx]

    def kernel(self, query=None, key=None) -> Callable:
        if self._kernel is None:
            self._kernel = get_train_kernel(self.state.config.attention_impl, self.device, query, key)
        return self._kernel

    def attend(self, query, key, value, log_keep, window: int, scale: float):
        """Call the training kernel for one layer: ``(o [B, H, T, D], lse)``.

        A kernel that publishes ``precompute_doc_bounds(doc_ids)`` (a function attribute) gets the result
        once per forward as ``doc_bounds=`` for every layer, instead of deriving it from ``doc_ids`` per
        layer (for the Triton kernel that derivation reads device values on the host, twice).
        """
        fn = self.kernel(query, key)
        pre = getattr(fn, "precompute_doc_bounds", None)
        if pre is None or self.doc_ids is None:
            return fn(query, key, value, log_keep, window, self.doc_ids, scale)
        if self._bounds is None or self._bounds[0] is not pre:
            self._bounds = (pre, pre(self.doc_ids))
        return fn(query, key, value, log_keep, window, self.doc_ids, scale, doc_bounds=self._bounds[1])

    def dense_mask(self, Tq: int, S: int) -> torch.Tensor | None:
        """The DMS-off mask (:func:`dense_mask`) for this forward's padding and documents, built once."""
        key = (Tq, S)
        if key not in self._dense:
            key_valid = self.mask_src
            if key_valid is not None:
                key_valid = key_valid[:, -S:].to(self.device)
            docs = self.doc_src.to(self.device) if (self.doc_src is not None and S == Tq) else None
            self._dense[key] = dense_mask(Tq, S, self.device, docs, key_valid)
        return self._dense[key]


def forward_plan(state: DMSState, B: int, T: int, device) -> ForwardPlan:
    """The state's plan for this forward pass (built if missing or made for other inputs)."""
    plan = state.plan
    if plan is None or not plan.matches(state, B, T, device):
        plan = state.plan = ForwardPlan(state, B, T, device)
    return plan


def _take_z(module) -> torch.Tensor:
    """The retention output ``z [B, T, Hkv or 1]`` the layer's hook left for this call (consumed)."""
    z = getattr(module, "_dms_z", None)
    if z is None:
        raise RuntimeError("DMS retention logits missing for this layer: the retrofit hooks did not run")
    module._dms_z = None
    return z


def decision_logits(module, state: DMSState) -> torch.Tensor:
    """Eviction logits ``[B, T, Hkv]`` for the current layer call (expanded for layer granularity)."""
    z = _take_z(module)
    cfg = state.config
    logits = eviction_logits(z, cfg.alpha_scale, cfg.alpha_offset)
    if logits.shape[-1] == 1 and state.num_kv_heads > 1:
        logits = logits.expand(-1, -1, state.num_kv_heads)
    return logits


def _record(state: DMSState, layer_idx: int, hard: torch.Tensor, valid: torch.Tensor, keep_mask: bool = False):
    """Keep per-layer sums of hard decisions ``[B, T, Hkv]`` over positions that have a decision.

    With ``keep_mask`` (inference semantics) the boolean decisions are kept too, for the memory CR.
    """
    if not state.collect_stats:
        return
    w = valid.to(hard.dtype)[..., None]
    rec = {
        "evicted": (hard * w).sum(dim=(0, 1)),  # [Hkv], differentiable (straight-through)
        "count": w.sum(),
    }
    if keep_mask:
        rec["evict_mask"] = (hard > 0.5) & valid[..., None]
    state.records[layer_idx] = rec


def decision_valid(doc_ids: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """``[B, T]`` True where key ``t`` has a decision: next token exists, same document, not padding."""
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    valid[:, -1] = False
    if doc_ids is not None:
        valid[:, :-1] &= (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, :-1] >= 0)
    return valid


def dms_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query ``[B, H, T, D]``, key/value ``[B, Hkv, S, D]`` -> ``([B, T, H, D], None)``."""
    state: DMSState = module._dms_state
    cfg = state.config
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    B, H, T, D = query.shape
    cache = state.cache
    if not cfg.enabled:
        plan = forward_plan(state, B, T, query.device)
        return dense_attention(query, key, value, scaling, mask=plan.dense_mask(T, key.shape[2])), None

    if cache is not None and hasattr(cache, "dms_attend"):
        logits = decision_logits(module, state)  # [B, T, Hkv]
        valid = state.valid_columns(T, query.device)
        out = cache.dms_attend(module.layer_idx, query, key, value, logits, valid, cfg.window, scaling)
        return out.transpose(1, 2), None
    if key.shape[2] != T:
        raise ValueError(
            f"DMS attention got {key.shape[2]} keys for {T} queries through a {type(cache).__name__}: "
            "generation with DMS needs a DMSCache (dms.load(...) or dms.DMSCache(model))"
        )
    plan = forward_plan(state, B, T, query.device)
    doc_ids = plan.doc_ids
    Hkv = state.num_kv_heads
    if module.training:
        z = _take_z(module)  # [B, T, Hkv or 1]
        # shift to "key t <- logit at t+1", Gumbel-sigmoid, masking, eviction sums: one fused op
        log_keep, evicted = train_decisions(z, plan.noise(module.layer_idx, z.shape[-1]), cfg.alpha_scale, cfg.tau)
        if log_keep.shape[1] != Hkv:  # layer granularity: one decision (and one noise draw) for all heads
            log_keep, evicted = log_keep.expand(B, Hkv, T), evicted.expand(Hkv)
        if state.collect_stats:
            state.records[module.layer_idx] = {"evicted": evicted, "count": plan.count}
    else:
        logits = decision_logits(module, state)
        shifted = shift_decisions(logits, float("-inf"), doc_ids)  # key k <- logit at k+1; last: keep
        valid = plan.valid
        evict = (shifted > 0) & valid[..., None]
        log_keep = torch.zeros_like(shifted).masked_fill(evict, float("-inf"))
        _record(state, module.layer_idx, evict.float(), valid, keep_mask=True)
        log_keep = log_keep.transpose(1, 2).contiguous()  # [B, Hkv, T]
    o, _ = plan.attend(query, key, value, log_keep, cfg.window, scaling)
    return o.transpose(1, 2), None
