"""Compression-ratio accounting (DESIGN.md, "Compression ratio"): always say which CR."""
from __future__ import annotations

import torch


def decision_cr(evicted_fraction: float) -> float:
    """Decision CR ``1 / (1 - fraction flagged for eviction)`` (what the loss targets)."""
    return 1.0 / max(1.0 - float(evicted_fraction), 1e-9)


def decision_stats(records: dict) -> dict:
    """Per-layer and per-head decision CR from ``DMSState.records`` of the last forward.

    All numbers cross to the host in one transfer (one device sync per call, not four per layer).
    """
    layers = sorted(records)
    if not layers:
        frac = 0.0
        return {"evicted_fraction": frac, "decision_cr": decision_cr(frac), "decision_cr_per_layer": [],
                "decision_cr_per_head": []}
    evs = [records[l]["evicted"].detach().float().reshape(-1) for l in layers]
    dev = evs[0].device
    counts = [torch.as_tensor(records[l]["count"]).detach().float().reshape(1).to(dev) for l in layers]
    flat = torch.cat(evs + counts).tolist()
    sizes = [e.numel() for e in evs]
    n_all = flat[sum(sizes):]
    per_layer, per_head = [], []
    ev_total, n_total, off = 0.0, 0.0, 0
    for size, n in zip(sizes, n_all):
        ev = flat[off:off + size]
        off += size
        per_head.append([decision_cr(e / max(n, 1.0)) for e in ev])
        per_layer.append(decision_cr(sum(ev) / size / max(n, 1.0)))
        ev_total += sum(ev)
        n_total += n * size
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
