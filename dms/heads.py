"""Retention heads and eviction decisions (DESIGN.md, "The method, pinned down").

A retention head produces one eviction logit per token and KV head, ``l = scale * z - offset``.
The logit produced at position ``t`` decides about key ``t - 1``; :func:`shift_decisions` applies
that shift (and keeps the last token of every document, which has no decision yet).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterRetentionHead(nn.Module):
    """``z = Linear(RMSNorm(x))`` on the decoder layer's input residual; Linear zero-initialised.

    A fresh head outputs ``z = 0``, i.e. ``l = -offset`` (evicts almost nothing at the default offset 5).
    """

    def __init__(self, hidden_size: int, num_outputs: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.proj = nn.Linear(hidden_size, num_outputs, bias=True)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, hidden]`` -> z ``[B, T, num_outputs]`` (computed in fp32 for a stable threshold)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        return F.linear(xf, self.proj.weight.float(), self.proj.bias.float())


def eviction_logits(z: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """``l = scale * z - offset`` (fp32)."""
    return z.float() * scale - offset


def shift_decisions(values: torch.Tensor, fill: float | bool, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Move per-position values ``[B, T, H]`` so that index ``k`` holds what position ``k+1`` decided.

    The last position (and the last token of each document when ``doc_ids [B, T]`` is given) gets
    ``fill`` — its decision has not been made yet, so it is kept.
    """
    B, T, H = values.shape
    out = torch.cat([values[:, 1:], values.new_full((B, 1, H), fill)], dim=1)
    if doc_ids is not None and T > 1:
        boundary = torch.ones(B, T, dtype=torch.bool, device=values.device)
        boundary[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
        out = out.masked_fill(boundary[..., None], fill)
    return out


def gumbel_sigmoid_log_keep(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None, noise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time relaxation. ``logits [...]`` -> (``log(1 - alpha)``, hard decision with straight-through).

    ``alpha = sigmoid((l + g) / tau)`` with ``g`` logistic noise (difference of two Gumbel samples);
    the hard decision is ``alpha > 0.5`` in the forward pass and carries ``d alpha`` backward.
    ``log(1 - alpha) = logsigmoid(-(l + g) / tau)`` is computed without forming ``1 - alpha``.
    """
    x = logits.float()
    if noise:
        u = torch.rand(x.shape, device=x.device, generator=generator).clamp_(1e-6, 1 - 1e-6)
        x = x + (torch.log(u) - torch.log1p(-u))  # logistic(0, 1) == Gumbel - Gumbel
    y = x / tau
    alpha = torch.sigmoid(y)
    hard = (alpha > 0.5).to(alpha.dtype)
    hard = hard + alpha - alpha.detach()
    return F.logsigmoid(-y), hard
