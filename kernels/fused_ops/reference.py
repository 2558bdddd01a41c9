"""PyTorch references of the fused ops: the computations transformers (and dms.heads) run, op by op."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Mistral/Qwen2/Qwen3 ``RMSNorm.forward``: fp32 statistics, rounded to x.dtype, times weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` (unsqueeze_dim 1): q ``[B, H, T, D]``, k ``[B, Hkv, T, D]``,
    cos/sin ``[B, T, D]``; every product and the sum rounded to the input dtype, as transformers does."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * c) + (_rotate_half(q) * s), (k * c) + (_rotate_half(k) * s)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU."""
    return F.silu(gate) * up


def retention_head_reference(x, norm_weight, proj_weight, proj_bias, eps: float) -> torch.Tensor:
    """:class:`dms.heads.AdapterRetentionHead`: ``Linear(RMSNorm(x.float()))`` in fp32 -> ``[..., n_out]``."""
    xn = F.rms_norm(x.float(), (x.shape[-1],), norm_weight.float(), eps)
    return F.linear(xn, proj_weight.float(), proj_bias.float())


def grouped_linear_reference(x, weights, biases=None):
    """``[F.linear(x, w, b) for w, b in zip(weights, biases)]``: q/k/v projections of one input."""
    biases = biases if biases is not None else [None] * len(weights)
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


def gate_up_silu_reference(x, w_gate, w_up, b_gate=None, b_up=None):
    """The gated MLP's ``silu(gate_proj(x)) * up_proj(x)`` (before down_proj)."""
    return F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)


def linear_residual_reference(x, weight, residual, bias=None):
    """A decoder layer's ``residual + o_proj(x)`` / ``residual + down_proj(x)``."""
    return residual + F.linear(x, weight, bias)
