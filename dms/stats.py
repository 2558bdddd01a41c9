"""Compression-ratio accounting (DESIGN.md, "Compression ratio"): always say which CR."""
from __future__ import annotations

import torch


def decision_cr(evicted_fraction: float) -> float:
    """Decision CR ``1 / (1 - fraction flagged for eviction)`` (what the loss targets)."""
    return 1.0 / max(1.0 - float(evicted_fraction), 1e-9)


def decision_stats(records: dict) -> dict:
    """Per-layer and per-head decision CR from ``DMSState.records`` of the last forward."""
    per_layer, per_head = [], []
    ev_total, n_total = 0.0, 0.0
    for layer in sorted(records):
        r = records[layer]
        ev = r["evicted"].detach().float()
        n = float(r["count"])
        frac_heads = (ev / max(n, 1.0)).tolist()
        per_head.append([decision_cr(f) for f in frac_heads])
        per_layer.append(decision_cr(float(ev.mean()) / max(n, 1.0)))
        ev_total += float(ev.sum())
        n_total += n * ev.numel()
    frac = ev_total / max(n_total, 1.0)
    return {"evicted_fraction": frac, "decision_cr": decision_cr(frac), "decision_cr_per_layer": per_layer,
            "decision_cr_per_head": per_head}


def memory_cr_from_mask(evict: torch.Tensor, valid: torch.Tensor, window: int) -> float:
    """Memory CR at the end of each sequence: tokens seen / tokens held (window included).

    evict ``[B, T, H]`` hard decisions per key (already shifted: index k = decision about key k),
    valid ``[B, T]`` real tokens. A key is held at the end iff it is among the last ``window``
    positions of its row or it is kept.
    """
    B, T, H = evict.shape
    n = valid.sum(-1)  # real tokens per row (left-aligned positions assumed contiguous)
    pos = valid.long().cumsum(-1) - 1
    in_window = (n[:, None] - pos) <= window
    held = valid[..., None] & (in_window[..., None] | ~evict)
    return float(n.sum() * H) / max(float(held.sum()), 1.0)
