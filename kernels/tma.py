"""Tensor-memory-accelerator (TMA) loads for the Triton kernels: when to use them, and the allocator they need.

On Hopper (sm90) and newer GPUs a tile load through a tensor descriptor (``tl.make_tensor_descriptor``) is one
asynchronous bulk copy issued by a single thread instead of per-thread address arithmetic and ``cp.async``;
rows past the described shape read as zero. The kernels build their descriptors on the device (one per program
and head, so any row stride works), which needs a small global scratch buffer that Triton obtains through the
allocator set by ``triton.set_allocator``: :func:`ensure_allocator` installs a torch-backed one where none is set.

``DMS_ATTN_TMA`` (training-attention kernels): ``auto`` (default: on for 16-bit inputs on sm90+), ``0`` off, ``1`` on
wherever the layout allows, also under ``TRITON_INTERPRET=1`` (how the CPU tests run the descriptor code paths).
The decode kernel has its own switch (``DMS_DECODE_TMA``, off: slower there on the H100).
"""
from __future__ import annotations

import functools
import os

import torch
import triton


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def ensure_allocator() -> None:
    """Install a torch-backed Triton allocator when none is set.

    Triton keeps the allocator in a context variable, so a thread that never set one (autograd's backward
    threads, for instance) starts without it: launchers call this before each TMA launch (cheap)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # layout of a future Triton: set ours unconditionally
        triton.set_allocator(_torch_alloc)
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_torch_alloc)


def _mode() -> str:
    m = os.environ.get("DMS_ATTN_TMA", "auto").strip().lower()
    if m not in ("auto", "0", "1"):
        raise ValueError(f"DMS_ATTN_TMA={m!r} is not understood; use auto, 0 or 1")
    return m


def aligned(t: torch.Tensor) -> bool:
    """Descriptor base and every outer stride are 16-byte multiples and the last dim is contiguous (TMA's rules)."""
    es = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride()[:-1])


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """This Triton has device-side tensor descriptors and host ones (``triton.tools.tensor_descriptor``); older
    releases (the package allows triton >= 3.2) keep pointer loads everywhere."""
    import triton.language as tl

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor")


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether the kernels read these ``[B, heads, T, D]`` tensors through tensor descriptors."""
    mode = _mode()
    if mode == "0" or not tensors or not available():
        return False
    t0 = tensors[0]
    if not all(aligned(t) for t in tensors):
        return False
    if mode == "1":
        return True
    return (t0.device.type == "cuda" and t0.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(t0.device)[0] >= 9)
