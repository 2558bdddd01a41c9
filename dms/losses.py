"""Distillation and compression losses (DESIGN.md, "Loss")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KL_DIRECTIONS = ("forward", "reverse")


def _chunk_kl(student_h, teacher_logits, weight, bias, direction: str):
    s = F.linear(student_h, weight, bias).float()
    logp_s = F.log_softmax(s, dim=-1)
    logp_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if direction == "forward":  # KL(teacher || student): mass-covering, the usual distillation choice
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def chunked_distillation_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
    direction: str = "forward",
    teacher_lm_head: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Mean per-token KL between teacher and student next-token distributions, in fp32 chunks.

    Full-vocabulary logits never exist for the whole sequence: each chunk of ``chunk_size`` tokens is
    projected, compared and (for the student) recomputed in backward, so peak memory is
    ``chunk_size x vocab`` instead of ``B x T x vocab``.

    Args:
        student_hidden, teacher_hidden: ``[B, T, hidden]`` final hidden states (after the final norm).
        lm_head: the output projection (shared by teacher and student unless ``teacher_lm_head``).
        mask: ``[B, T]`` bool, tokens that count (padding excluded); default all.
        direction: ``forward`` = KL(teacher || student) (default), ``reverse`` = KL(student || teacher).
    Returns:
        scalar mean KL over counted tokens (differentiable w.r.t. the student).
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction must be one of {KL_DIRECTIONS}; got {direction!r}")
    B, T, Hd = student_hidden.shape
    s = student_hidden.reshape(B * T, Hd)
    t = teacher_hidden.reshape(B * T, Hd)
    m = torch.ones(B * T, dtype=torch.bool, device=s.device) if mask is None else mask.reshape(B * T).bool()
    idx = m.nonzero().squeeze(-1)
    if idx.numel() == 0:
        return student_hidden.sum() * 0.0
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    t_head = teacher_lm_head or lm_head
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, idx.numel(), chunk_size):
        sel = idx[start:start + chunk_size]
        with torch.no_grad():
            t_logits = F.linear(t[sel], t_head.weight, getattr(t_head, "bias", None))
        sh = s[sel]
        if sh.requires_grad:
            kl = checkpoint(_chunk_kl, sh, t_logits, weight, bias, direction, use_reentrant=False)
        else:
            kl = _chunk_kl(sh, t_logits, weight, bias, direction)
        total = total + kl.sum()
    return total / idx.numel()


def compression_loss(records: dict, target_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided ``relu(target_fraction - mean(hard decisions))`` over all layers and heads.

    ``records`` is ``DMSState.records`` of the last student forward ({layer: {"evicted": [Hkv], "count"}}).
    Returns (loss, achieved eviction fraction).
    """
    if not records:
        raise RuntimeError("no DMS decisions were recorded: was the student forward run with DMS enabled?")
    recs = list(records.values())
    ev = torch.cat([r["evicted"].reshape(-1) for r in recs]).sum()  # two kernels, not two per layer
    count = recs[0]["count"]
    if all(r["count"] is count for r in recs):  # one forward: every layer shares the plan's count
        n = count * sum(r["evicted"].numel() for r in recs)
    else:
        n = sum(r["count"] * r["evicted"].numel() for r in recs)
    frac = ev / torch.as_tensor(n, device=ev.device).clamp(min=1)
    return F.relu(target_fraction - frac), frac.detach()
