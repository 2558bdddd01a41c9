"""Paged DMS decoding: append one token per stream and attend over the ragged per-head page store.

``paged_append`` / ``paged_decode_attention`` are the Triton kernels (triton_decode.py);
``paged_append_reference`` / ``paged_decode_attention_reference`` their pure-PyTorch references
(reference.py, which also documents the store layout). ``masked_attention_lse`` is the fp32 hard-mask
attention with log-sum-exp used for prefill chunks against already cached keys; ``chunk_attention`` its
Triton form (triton_chunk.py). ``pack_survivors`` (triton_pack.py) writes a repack's surviving keys into their
pages in one launch; ``pack_survivors_reference`` is its PyTorch form.
"""
from __future__ import annotations

from .reference import (
    gather_stream,
    masked_attention_lse,
    pack_survivors_reference,
    paged_append_reference,
    paged_decode_attention_reference,
    ring_size,
)

# Head dims the Triton decode / chunk kernels take (the callers' backend choice reads it without importing Triton).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

__all__ = [
    "SUPPORTED_HEAD_DIMS", "chunk_attention", "gather_stream", "masked_attention_lse", "pack_survivors",
    "pack_survivors_reference", "paged_append", "paged_append_reference", "paged_decode_attention",
    "paged_decode_attention_reference", "ring_size",
]


def paged_append(*args, **kwargs):
    from .triton_decode import paged_append as _f

    return _f(*args, **kwargs)


def paged_decode_attention(*args, **kwargs):
    from .triton_decode import paged_decode_attention as _f

    return _f(*args, **kwargs)


def chunk_attention(*args, **kwargs):
    from .triton_chunk import chunk_attention as _f

    return _f(*args, **kwargs)


def pack_survivors(*args, **kwargs):
    from .triton_pack import pack_survivors as _f

    return _f(*args, **kwargs)
