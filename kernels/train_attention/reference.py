"""Pure-PyTorch fp32 reference for DMS training attention (the ground truth for every kernel).

Semantics (DESIGN.md, "Delayed eviction"): for query position ``i`` and key position ``j``

    score(i, j) = scale * <q_i, k_j>                      if j <= i and doc[i] == doc[j]
                + log_keep[j]   only when  i - j > window
    score(i, j) = -inf                                      otherwise (future or other document)

A key is always fully visible to itself and to the next ``window`` queries, so every query row has
at least one finite score (itself) and the output is never NaN, even when ``log_keep`` holds -inf.
"""
from __future__ import annotations

import torch


def check_inputs(q, k, v, log_keep, window, doc_ids):
    """Validate shapes/dtypes shared by the reference and the kernels; raise ValueError with the values."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, Hkv, T={T}, D={D}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or H % hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={hkv}")
    if log_keep.shape != (B, hkv, T):
        raise ValueError(f"log_keep must be [B, Hkv, T] = {(B, hkv, T)}; got {tuple(log_keep.shape)}")
    if int(window) < 0:
        raise ValueError(f"window must be >= 0; got {window}")
    if doc_ids is not None and doc_ids.shape != (B, T):
        raise ValueError(f"doc_ids must be [B, T] = {(B, T)}; got {tuple(doc_ids.shape)}")
    return B, H, hkv, T, D


def dms_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor,
    window: int,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with the DMS delayed-eviction soft mask, computed in fp32.

    Args:
        q: ``[B, H, T, D]`` queries.
        k, v: ``[B, Hkv, T, D]`` keys/values (GQA: ``H % Hkv == 0``; query head ``h`` uses KV head ``h // (H // Hkv)``).
        log_keep: ``[B, Hkv, T]`` per-key ``log(1 - alpha)`` (0 = keep, -inf = evicted); any dtype, used in fp32.
        window: keys with ``i - j <= window`` are fully visible.
        doc_ids: optional ``[B, T]`` integer document ids; no attention across different ids.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``o [B, H, T, D]`` in ``q.dtype`` and ``lse [B, H, T]`` (fp32 natural-log sum-exp of the scores).
        Differentiable with respect to q, k, v and log_keep.
    """
    B, H, hkv, T, D = check_inputs(q, k, v, log_keep, window, doc_ids)
    scale = D ** -0.5 if scale is None else scale
    g = H // hkv
    qf, kf, vf = q.float(), k.float(), v.float()
    kf = kf.repeat_interleave(g, dim=1)
    vf = vf.repeat_interleave(g, dim=1)
    lk = log_keep.float().repeat_interleave(g, dim=1)  # [B, H, T]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, T, T]
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    visible = j <= i
    if doc_ids is not None:
        visible = visible & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    far = (i - j) > int(window)
    # where() instead of multiplication keeps -inf log_keep from producing 0 * -inf = NaN.
    bias = torch.where(far, lk[:, :, None, :], torch.zeros((), device=q.device))
    scores = (scores + bias).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    o = torch.matmul(p, vf)
    return o.to(q.dtype), lse


def hard_log_keep(evict: torch.Tensor) -> torch.Tensor:
    """Inference-mode mask values from boolean eviction decisions ``[B, Hkv, T]``: 0 keep, -inf evict."""
    return torch.zeros(evict.shape, dtype=torch.float32, device=evict.device).masked_fill(evict, float("-inf"))
