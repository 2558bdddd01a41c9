"""DMS training attention: causal + document mask + delayed-eviction soft mask (see reference.py).

``dms_attention`` is the fused Triton kernel (forward + backward), ``dms_attention_hard`` its
forward-only hard-mask form (prefill / teacher-forced evaluation), ``dms_attention_flex`` the
FlexAttention implementation of the same semantics, ``dms_attention_reference`` the fp32 ground truth.
"""
from __future__ import annotations

import torch

from .reference import check_inputs, dms_attention_reference, hard_log_keep

__all__ = [
    "dms_attention_reference",
    "hard_log_keep",
    "dms_attention",
    "dms_attention_hard",
    "dms_attention_flex",
]

_SUPPORTED_D = (16, 32, 64, 128, 256)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def padded_head_dim(D: int) -> int | None:
    """The kernel head dim that serves ``D``: the smallest of ``_SUPPORTED_D`` >= D (other sizes run zero-padded,
    which changes no score and no output column), or None above 256."""
    return next((d for d in _SUPPORTED_D if d >= D), None)


def unsupported_reason(q, k) -> str | None:
    """Why the Triton kernels cannot take these inputs (e.g. ``"head dim 320"``), or None when they can."""
    D = q.shape[-1]
    if padded_head_dim(D) is None:
        return f"head dim {D} (at most {_SUPPORTED_D[-1]})"
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype}"
    return None


def _pad_head_dim(*ts):
    """Zero-pad the last dim of each tensor up to :func:`padded_head_dim` (differentiable; same tensors if no pad)."""
    D = ts[0].shape[-1]
    Dp = padded_head_dim(D)
    if Dp == D:
        return ts
    return tuple(torch.nn.functional.pad(t, (0, Dp - D)) for t in ts)


def _validate(q, k, v, log_keep, window, doc_ids, scale):
    B, H, hkv, T, D = check_inputs(q, k, v, log_keep, window, doc_ids)
    if padded_head_dim(D) is None:
        raise ValueError(f"head dim D={D} not supported by the Triton kernel (at most {_SUPPORTED_D[-1]}); "
                         "use the flex or eager attention implementation")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype in {_SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == log_keep.device):
        raise ValueError(f"all inputs must be on one device; got {q.device}, {k.device}, {v.device}, {log_keep.device}")
    if doc_ids is not None and (doc_ids.dtype.is_floating_point or doc_ids.device != q.device):
        raise ValueError(f"doc_ids must be an integer tensor on {q.device}; got {doc_ids.dtype} on {doc_ids.device}")
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"scale must be > 0; got {scale}")
    if T == 0 or B == 0:
        raise ValueError(f"empty input: B={B}, T={T}")
    return B, H, hkv, T, D


def _dense_rows(t):
    """Unit last stride and no overlapping or gapped dims beyond the heads/positions permutation."""
    return t.stride(-1) == 1 and (t.is_contiguous() or t.transpose(1, 2).is_contiguous())


def _prep(q, k, v, log_keep, doc_ids, bounds=None, strided=False):
    from .triton_fwd import doc_bounds

    # the forward-only kernel (strided) reads transformers' transposed [B, T, H, D] projections in place
    if not (strided and _dense_rows(q) and _dense_rows(k) and k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lk = log_keep.detach().float().contiguous()
    if bounds is None and doc_ids is not None:
        bounds = doc_bounds(doc_ids)  # torch.unique + int(max): two host syncs
    return q, k, v, lk, bounds


def precompute_doc_bounds(doc_ids):
    """``doc_bounds`` of ``doc_ids [B, T]`` to pass as ``dms_attention(..., doc_bounds=)`` to every layer
    of one forward pass (computed once instead of once per layer)."""
    from .triton_fwd import doc_bounds

    return doc_bounds(doc_ids)


class _DMSAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_keep, window, doc_ids, scale, has_dms, bounds=None):
        from .triton_fwd import bias_mma_enabled, dms_attention_fwd, split_log_keep

        lk_dtype = log_keep.dtype
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient (no extra pass)
        q, k, v, lk, docs = _prep(q, k, v, log_keep, doc_ids, bounds)
        lk2 = split_log_keep(lk, scale, q.dtype) if has_dms and bias_mma_enabled() else None
        o, lse = dms_attention_fwd(q, k, v, lk, window, docs, scale, has_dms, lk2)
        doc_t = docs if docs is not None else ()
        ctx.has_lk2 = lk2 is not None
        ctx.save_for_backward(q, k, v, lk, o, lse, *((lk2,) if lk2 is not None else ()), *doc_t)
        ctx.window, ctx.scale, ctx.has_dms, ctx.has_doc, ctx.lk_dtype = window, scale, has_dms, docs is not None, lk_dtype
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        from .triton_bwd import dms_attention_bwd

        q, k, v, lk, o, lse, *rest = ctx.saved_tensors
        lk2 = rest.pop(0) if ctx.has_lk2 else None
        docs = tuple(rest) if ctx.has_doc else None
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dlk = dms_attention_bwd(do, q, k, v, lk, o, lse, ctx.window, docs, ctx.scale, ctx.has_dms, dlse, lk2)
        dlk = dlk.to(ctx.lk_dtype) if ctx.lk_dtype.is_floating_point else None
        return dq, dk, dv, dlk, None, None, None, None, None


def dms_attention(q, k, v, log_keep, window, doc_ids=None, scale=None, *, doc_bounds=None, _has_dms: bool = True):
    """Fused Triton DMS training attention (differentiable in q, k, v and log_keep).

    Args:
        q: ``[B, H, T, D]`` queries (fp16 / bf16 / fp32; D <= 256: 16, 32, 64, 128, 256 run as they are, other
            sizes zero-padded to the next of these, which is exact).
        k, v: ``[B, Hkv, T, D]``, same dtype, ``H % Hkv == 0`` (query head h uses KV head h // (H // Hkv)).
        log_keep: ``[B, Hkv, T]`` per-key ``log(1 - alpha)`` (0 keep, -inf evicted), used in fp32.
        window: keys with ``q - k <= window`` are fully visible; beyond, ``log_keep[k]`` is added.
        doc_ids: optional ``[B, T]`` integer document ids (no attention across different ids).
        scale: softmax scale, default ``D ** -0.5``.
        doc_bounds: optional :func:`precompute_doc_bounds` of ``doc_ids``, shared by the layers of a forward.
        _has_dms: private; False drops the log_keep term (benchmark baseline with the same tiling).

    Returns:
        ``o [B, H, T, D]`` in q.dtype and ``lse [B, H, T]`` fp32 (natural log), as the reference.
    """
    _, _, _, _, D = _validate(q, k, v, log_keep, window, doc_ids, scale)
    scale = D ** -0.5 if scale is None else float(scale)
    # head dims other than the kernel's run zero-padded (e.g. 80 -> 128): zero columns change no score, the output's
    # are dropped
    qp, kp, vp = _pad_head_dim(q, k, v)
    o, lse = _DMSAttention.apply(qp, kp, vp, log_keep, int(window), doc_ids, scale, bool(_has_dms), doc_bounds)
    return o[..., :D], lse


dms_attention.precompute_doc_bounds = precompute_doc_bounds  # dms.attention.ForwardPlan.attend looks for it
dms_attention.unsupported_reason = unsupported_reason  # dms.attention.get_train_kernel("auto", ...) asks it


@torch.no_grad()
def dms_attention_hard(q, k, v, evict_bool_or_log_keep, window, doc_ids=None, scale=None):
    """Forward-only DMS attention with a hard mask (prefill, teacher-forced evaluation).

    Args:
        evict_bool_or_log_keep: ``[B, Hkv, T]`` bool eviction decisions (True = evict), or log_keep
            values in {0, -inf}. Evicted keys stay visible to the next ``window`` queries only.
        Others as :func:`dms_attention`.

    Returns:
        ``o [B, H, T, D]`` and ``lse [B, H, T]`` (no autograd graph).
    """
    m = evict_bool_or_log_keep
    lk = hard_log_keep(m) if m.dtype == torch.bool else m
    _, _, _, _, D = _validate(q, k, v, lk, window, doc_ids, scale)
    scale = D ** -0.5 if scale is None else float(scale)
    from .triton_fwd import dms_attention_fwd

    q, k, v = _pad_head_dim(q, k, v)
    q, k, v, lk, docs = _prep(q, k, v, lk, doc_ids, strided=True)
    o, lse = dms_attention_fwd(q, k, v, lk, int(window), docs, scale, True, out_like_q=True, hard=True)
    return o[..., :D], lse


def dms_attention_flex(q, k, v, log_keep, window, doc_ids=None, scale=None):
    """FlexAttention implementation with the same semantics; see :mod:`.flex`."""
    from .flex import dms_attention_flex as _f

    return _f(q, k, v, log_keep, window, doc_ids=doc_ids, scale=scale)
