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
        from .decode_fusion import fusion_available

        if x.is_cuda and not torch.is_grad_enabled() and fusion_available(x.device):
            # Inference on CUDA: one Triton kernel (dms_kernels.fused_ops.retention_head), fp32 accuracy, x
            # read once in its own dtype. The PyTorch form below costs an fp32 copy of x, RMSNorm and a skinny
            # fp32 GEMM (0.3 ms per layer at an 8K prefill on the H100), and at decode a cuBLAS GEMV of 39 us.
            from dms_kernels import fused_ops

            return fused_ops.retention_head(x, self.norm_weight, self.proj.weight, self.proj.bias, self.eps)
        # F.rms_norm: one fused op (CUDA) instead of six elementwise kernels and their backward nodes;
        # same formula as the manual x * rsqrt(mean(x^2) + eps) * w (bit-identical on CPU).
        xn = F.rms_norm(x.float(), (x.shape[-1],), _fp32(self.norm_weight), self.eps)
        return F.linear(xn, _fp32(self.proj.weight), _fp32(self.proj.bias))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # the heads are kept in fp32; skip the no-op cast (a dispatcher call per weight, layer and pass)
    return t if t.dtype == torch.float32 else t.float()


_NEG_OFFSET: dict = {}  # (device, offset) -> 0-d tensor -offset


def eviction_logits(z: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """``l = scale * z - offset`` (fp32)."""
    z = z.float()
    if z.is_cuda:
        # one kernel (``-offset + scale * z``) instead of two: a decode step runs this once per layer. The
        # device scalar is made on first use, outside any CUDA-graph capture (the graphed step warms up first).
        key = (z.device, float(offset))
        c = _NEG_OFFSET.get(key)
        if c is None:
            c = _NEG_OFFSET[key] = torch.tensor(-float(offset), device=z.device)
        return torch.add(c, z, alpha=scale)
    return z * scale - offset


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


def logistic_noise_offsets(shape, valid: torch.Tensor, offset: float, tau: float, device,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise term of the training decisions, for all layers at once: ``[..., B, Hz, T]`` fp32.

    ``c = (offset - g) / tau`` with ``g`` logistic noise, and ``+inf`` where key ``t`` has no decision
    (``valid [B, T]`` False: last token of a document, padding). With it the whole relaxation of one
    layer is ``-(l + g) / tau = c - (scale / tau) * z_next`` (see :class:`TrainDecisions`). Drawn once
    per forward pass instead of per layer: one ``rand`` and four elementwise kernels for all layers.
    """
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-6, 1 - 1e-6)
    g = torch.log(u) - torch.log1p(-u)  # logistic(0, 1) == Gumbel - Gumbel
    c = (offset - g).div_(tau)
    return c.masked_fill_(~valid[:, None, :], float("inf"))


class TrainDecisions(torch.autograd.Function):
    """Fused training relaxation of one layer (same maths as :func:`shift_decisions` followed by
    :func:`gumbel_sigmoid_log_keep`, masking and the per-head eviction sums).

    ``apply(z, c, k)``: retention output ``z [B, T, Hz]`` (fp32), ``c [B, Hz, T]`` from
    :func:`logistic_noise_offsets`, ``k = alpha_scale / tau``. With ``l = scale * z - offset``:

    - ``yn[t] = c[t] - k * z[t + 1] = -(l[t + 1] + g) / tau`` (key ``t`` is decided by the next token;
      ``+inf`` where ``t`` has no decision, so the key is kept and gets no gradient);
    - ``log_keep = log(1 - alpha) = logsigmoid(yn)``, returned as ``[B, Hz, T]`` contiguous fp32,
      the layout the attention kernels take;
    - ``evicted [Hz]``: number of hard decisions ``alpha > 0.5`` (``yn < 0``) per head; its gradient is
      the straight-through ``d alpha`` of every decided key.

    Five kernels forward and six backward per layer, against ~70 and ~40 for the unfused graph
    (CPU profile: ``python -m dms.training.bench profile-ops``).
    """

    @staticmethod
    def forward(ctx, z, c, k: float):
        ctx.set_materialize_grads(False)  # an unused output gets no zero-filled gradient
        zn = torch.roll(z, -1, 1).transpose(1, 2)  # [B, Hz, T]: index t holds z[t + 1] (last: masked by c)
        yn = torch.add(c, zn, alpha=-k)
        if not yn.is_contiguous():  # c is contiguous, so the output follows it; kept as a guard
            yn = yn.contiguous()
        log_keep = F.logsigmoid(yn)
        evicted = torch.sum(yn < 0, dim=(0, 2), dtype=yn.dtype)
        ctx.save_for_backward(log_keep)
        ctx.k = k
        return log_keep, evicted

    @staticmethod
    def backward(ctx, d_log_keep, d_evicted):
        (log_keep,) = ctx.saved_tensors
        k = ctx.k
        # With keep = 1 - alpha = exp(log_keep):  d log_keep / d yn = alpha,  d alpha / d yn = -alpha * keep
        # (straight-through for the hard decision), and d yn / d z[t + 1] = -k, so
        #   dz[t + 1] = -k * alpha * (d_log_keep - keep * d_evicted)
        #             = expm1(log_keep) * (k * d_log_keep - k * keep * d_evicted)
        # alpha as -expm1(log_keep) stays exact for tiny alpha; it is exactly 0 for keys without a decision.
        if d_evicted is not None:
            keep, d_ev = torch.exp(log_keep), d_evicted.view(1, -1, 1)
            if d_log_keep is not None:
                u = torch.addcmul(d_log_keep, keep, d_ev, value=-1)
            else:
                u = keep.mul_(d_ev).neg_()
        elif d_log_keep is not None:
            u = d_log_keep
        else:
            return None, None, None
        dz = torch.expm1(log_keep).mul_(u).mul_(k)  # [B, Hz, T], column T-1 is 0
        return torch.roll(dz, 1, 2).transpose(1, 2), None, None  # key t -> z position t + 1: [B, T, Hz]


def train_decisions(z: torch.Tensor, c: torch.Tensor, alpha_scale: float, tau: float):
    """``(log_keep [B, Hz, T], evicted [Hz])`` for retention output ``z [B, T, Hz]``; see :class:`TrainDecisions`."""
    return TrainDecisions.apply(_fp32(z), c, alpha_scale / tau)
