"""Pure-PyTorch fp32 reference for shared-prefix decode attention (Hydragen's prefix part).

All decode queries that share a prefix (``W`` samples x the ``g`` query heads of a KV head) attend to
that prefix as one ``[W * g, D] x [D, S]`` product, reading the prefix KV once.
"""
from __future__ import annotations

import torch


def check_inputs(q, k, v, visible, length=None):
    """Shapes of the grouped prefix attention; with ``length``, ``visible`` may cover only the first
    ``length`` key slots of the ``[G, Hkv, capacity, D]`` buffers (the static decode path passes that)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [G, Hkv, M, D] and k, v [G, Hkv, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    G, Hkv, M, D = q.shape
    if k.shape[0] != G or k.shape[1] != Hkv or k.shape[3] != D:
        raise ValueError(f"k must be [G={G}, Hkv={Hkv}, S, D={D}]; got {tuple(k.shape)}")
    short_ok = length is not None and visible.shape[:2] == k.shape[:2] and length <= visible.shape[2] <= k.shape[2]
    if visible.shape != k.shape[:3] and not short_ok:
        raise ValueError(f"visible must be [G, Hkv, S] = {tuple(k.shape[:3])}; got {tuple(visible.shape)}")
    return G, Hkv, M, k.shape[2], D


def prefix_attention_grouped_reference(q, k, v, visible, scale: float):
    """q ``[G, Hkv, M, D]``, k/v ``[G, Hkv, S, D]``, visible ``[G, Hkv, S]`` bool.

    Returns ``o [G, Hkv, M, D]`` (q.dtype; zeros where no key is visible) and ``lse [G, Hkv, M]``
    (fp32, -inf where no key is visible).
    """
    check_inputs(q, k, v, visible)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(p, v.float()).to(q.dtype), lse
