"""FlexAttention implementation of DMS training attention (same semantics as reference.py).

The DMS term is a ``score_mod`` (``+ log_keep[b, h // g, k]`` where ``q - k > window``; FlexAttention
differentiates through the captured ``log_keep``), causality and documents a ``block_mask``. On CUDA
the call is ``torch.compile``-d (needed for a fused kernel); on CPU it runs eagerly (tests only: the
eager path materialises the T x T scores).
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:  # torch >= 2.9: return_lse is deprecated in favour of return_aux
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover
    AuxRequest = None

from .reference import check_inputs

_compiled = None
_mask_cache: dict = {}


def _flex():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _block_mask(doc_ids, B, T, device):
    if doc_ids is None:
        key = (T, str(device))
        if key not in _mask_cache:  # causal masks are reused across calls (as a training loop would)
            _mask_cache[key] = create_block_mask(_causal, None, None, T, T, device=device)
        return _mask_cache[key]

    def doc_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(doc_mask, B, None, T, T, device=device)


def dms_attention_flex(q, k, v, log_keep, window, doc_ids=None, scale=None):
    """DMS attention through FlexAttention.

    Args: as :func:`dms_kernels.train_attention.dms_attention_reference` (q ``[B, H, T, D]``,
    k/v ``[B, Hkv, T, D]``, log_keep ``[B, Hkv, T]``, doc_ids ``[B, T]``).

    Returns: ``o [B, H, T, D]`` (q.dtype) and ``lse [B, H, T]`` fp32 natural-log sum-exp.
    Differentiable in q, k, v and log_keep.
    """
    B, H, hkv, T, D = check_inputs(q, k, v, log_keep, window, doc_ids)
    g = H // hkv
    W = int(window)
    lk = log_keep.float()

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx - kv_idx > W, score + lk[b, h // g, kv_idx], score)

    block_mask = _block_mask(doc_ids, B, T, q.device)
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=g > 1)
    if q.is_cuda:
        fn = _flex()
    else:
        fn = flex_attention
        import warnings

        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if AuxRequest is not None:
        o, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        return o, aux.lse
    return fn(q, k, v, return_lse=True, **kw)
