"""The ``dms`` attention implementation registered through transformers' attention interface.

One function, :func:`dms_attention_forward`, decides per call:

- DMS off (teacher, or ``enabled=False``): plain causal attention (SDPA), identical to the original model;
- training (module in train mode, no cache): Gumbel-sigmoid soft mask, kernel from the registry;
- prefill / teacher-forced evaluation (eval mode, no cache): hard inference mask (evict iff ``l > 0``);
- with a DMS cache (``model.generate``): the cache appends, prunes and attends (dms/cache.py).

Kernels are looked up in :data:`TRAIN_KERNELS` by name (``eager`` reference, ``flex``, ``triton``).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from .heads import eviction_logits, gumbel_sigmoid_log_keep, shift_decisions

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


def _resolve(target):
    if callable(target):
        return target
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def triton_available() -> bool:
    try:
        return torch.cuda.is_available() and callable(_resolve(TRAIN_KERNELS["triton"]))
    except (ImportError, AttributeError):
        return False


def get_train_kernel(name: str, device: torch.device) -> Callable:
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "eager"
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


def dense_attention(query, key, value, scaling, doc_ids=None, key_valid=None):
    """Plain causal attention, DMS off. query ``[B, H, Tq, D]``, key/value ``[B, Hkv, S, D]``, S >= Tq.

    Queries sit at the last Tq positions of the S keys (a standard cache). ``doc_ids [B, Tq]`` masks
    packed documents (only without a cache); ``key_valid [B, S]`` masks padding.
    """
    B, H, Tq, D = query.shape
    S = key.shape[2]
    g = H // key.shape[1]
    if g > 1:
        key = key.repeat_interleave(g, dim=1)
        value = value.repeat_interleave(g, dim=1)
    if doc_ids is None and key_valid is None:
        if Tq == S:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        else:
            qpos = torch.arange(S - Tq, S, device=query.device)[:, None]
            mask = torch.arange(S, device=query.device)[None, :] <= qpos
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2)
    qpos = torch.arange(S - Tq, S, device=query.device)[:, None]
    mask = (torch.arange(S, device=query.device)[None, :] <= qpos)[None, None]  # [1, 1, Tq, S]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    # A padding query with no visible key would produce NaN; let it see itself (its output is unused).
    diag = torch.zeros(Tq, S, dtype=torch.bool, device=query.device)
    diag[torch.arange(Tq), torch.arange(S - Tq, S)] = True
    mask = mask | diag[None, None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def decision_logits(module, state: DMSState) -> torch.Tensor:
    """Eviction logits ``[B, T, Hkv]`` for the current layer call (expanded for layer granularity)."""
    z = getattr(module, "_dms_z", None)
    if z is None:
        raise RuntimeError("DMS retention logits missing for this layer: the retrofit hooks did not run")
    module._dms_z = None
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
        key_valid = state.attention_mask
        if key_valid is not None:
            key_valid = key_valid[:, -key.shape[2]:].to(query.device)
        docs = state.doc_ids.to(query.device) if (state.doc_ids is not None and key.shape[2] == T) else None
        return dense_attention(query, key, value, scaling, doc_ids=docs, key_valid=key_valid), None

    logits = decision_logits(module, state)  # [B, T, Hkv]
    if cache is not None and hasattr(cache, "dms_attend"):
        valid = None
        if state.attention_mask is not None:
            valid = state.attention_mask[:, -T:].to(query.device).bool()
        out = cache.dms_attend(module.layer_idx, query, key, value, logits, valid, cfg.window, scaling)
        return out.transpose(1, 2), None
    if key.shape[2] != T:
        raise ValueError(
            f"DMS attention got {key.shape[2]} keys for {T} queries through a {type(cache).__name__}: "
            "generation with DMS needs a DMSCache (dms.load(...) or dms.DMSCache(model))"
        )
    doc_ids = doc_ids_for(state, T, query.device)
    shifted = shift_decisions(logits, float("-inf"), doc_ids)  # key k <- logit at k+1; last: keep
    valid = decision_valid(doc_ids, B, T, query.device)
    if module.training:
        log_keep, hard = gumbel_sigmoid_log_keep(shifted, cfg.tau)
        log_keep = log_keep.masked_fill(~valid[..., None], 0.0)
        _record(state, module.layer_idx, hard, valid)
        kernel = get_train_kernel(cfg.attention_impl, query.device)
    else:
        evict = (shifted > 0) & valid[..., None]
        log_keep = torch.zeros_like(shifted).masked_fill(evict, float("-inf"))
        _record(state, module.layer_idx, evict.float(), valid, keep_mask=True)
        kernel = get_train_kernel(cfg.attention_impl, query.device)
    log_keep = log_keep.transpose(1, 2).contiguous()  # [B, Hkv, T]
    o, _ = kernel(query, key, value, log_keep, cfg.window, doc_ids, scaling)
    return o.transpose(1, 2), None
