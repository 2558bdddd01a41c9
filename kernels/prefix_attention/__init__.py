"""Shared-prefix decode attention (Hydragen's prefix part) for DMS parallel sampling.

``prefix_attention(query, keys, values, visible, scale, samples)`` takes per-sample decode queries
``[G * W, H, 1, D]`` and each prompt's shared prefix ``[G, Hkv, S, D]``; it returns ``o [G * W, H, 1, D]``
and ``lse [G * W, H, 1]`` to be merged with the suffix part.
"""
from __future__ import annotations

import torch

from .reference import prefix_attention_grouped_reference


def _group(query, Hkv, samples):
    GW, H, T, D = query.shape
    if T != 1 or GW % samples:
        raise ValueError(f"query must be [G*W, H, 1, D] with W={samples}; got {tuple(query.shape)}")
    G, g = GW // samples, H // Hkv
    q = query.reshape(G, samples, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(G, Hkv, samples * g, D)
    return q, G, g


def _ungroup(o, lse, G, Hkv, samples, g):
    D = o.shape[-1]
    o = o.reshape(G, Hkv, samples, g, D).permute(0, 2, 1, 3, 4).reshape(G * samples, Hkv * g, 1, D)
    lse = lse.reshape(G, Hkv, samples, g).permute(0, 2, 1, 3).reshape(G * samples, Hkv * g, 1)
    return o, lse


def prefix_attention(query, keys, values, visible, scale: float, samples: int, impl: str = "triton",
                     length: int | None = None):
    """Prefix part of shared-prefix decoding; ``impl`` is ``triton`` or ``reference``.

    ``length`` limits the keys to the first ``length`` entries of in-place growing buffers.
    """
    q, G, g = _group(query, keys.shape[1], samples)
    if impl == "triton":
        from .triton_kernel import prefix_attention_grouped

        o, lse = prefix_attention_grouped(q, keys, values, visible, scale, length=length)
    elif impl == "reference":
        if length is not None:
            keys, values, visible = keys[:, :, :length], values[:, :, :length], visible[:, :, :length]
        o, lse = prefix_attention_grouped_reference(q, keys, values, visible, scale)
    else:
        raise ValueError(f"impl must be 'triton' or 'reference'; got {impl!r}")
    return _ungroup(o, lse, G, keys.shape[1], samples, g)


__all__ = ["prefix_attention", "prefix_attention_grouped_reference"]
