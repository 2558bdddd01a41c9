"""Fused elementwise ops for the decode step: one kernel where transformers launches a chain of them.

At decode (a few rows per step) every elementwise op is a separate kernel of a few microseconds; a
Llama layer launches about 60. These kernels cover the chains with the most launches, each matching the
transformers computation (including where it rounds to the model dtype):

- ``rms_norm(x, weight, eps)``: Llama/Mistral/Qwen RMSNorm, ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``
  (8 kernels in transformers);
- ``rope(q, k, cos, sin)``: ``apply_rotary_pos_emb`` for q and k in one launch (10 kernels);
- ``silu_mul(gate, up)``: ``silu(gate) * up`` of the gated MLP (2 kernels);
- ``retention_head(x, norm_weight, proj_weight, proj_bias, eps)``: DMS's adapter head,
  ``Linear(RMSNorm(x32))`` in fp32 (5 kernels);
- ``grouped_linear(x, weights, biases)`` / ``gate_up_silu(x, w_gate, w_up, ...)``: decode-size projections (at
  most 16 rows) of one input against up to three weights in one launch, and the MLP's gate/up products with
  ``silu(gate) * up`` in their epilogue;
- ``linear_residual(x, weight, residual)``: ``residual + F.linear(x, weight)`` at decode size (the residual adds
  of a decoder layer in the epilogues of o_proj and down_proj).

``reference.py`` holds the PyTorch forms (the transformers code paths), ``triton_ops.py`` the kernels.
``dms.decode_fusion`` swaps them into a model for graphed decoding.
"""
from __future__ import annotations

from .reference import (
    gate_up_silu_reference,
    grouped_linear_reference,
    linear_residual_reference,
    retention_head_reference,
    rms_norm_reference,
    rope_reference,
    silu_mul_reference,
)

__all__ = ["gate_up_silu", "gate_up_silu_reference", "grouped_linear", "grouped_linear_reference",
           "linear_residual", "linear_residual_reference",
           "retention_head", "retention_head_reference", "rms_norm", "rms_norm_reference", "rope",
           "rope_reference", "silu_mul", "silu_mul_reference"]


_TRITON_OPS = ("gate_up_silu", "grouped_linear", "linear_residual", "retention_head", "rms_norm", "rope", "silu_mul")


def __getattr__(name):
    # the kernels load triton on first use, so importing the references needs no triton
    if name in _TRITON_OPS:
        from . import triton_ops

        return getattr(triton_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
