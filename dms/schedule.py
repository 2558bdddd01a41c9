"""Compression-ratio schedule: CR rises linearly from 1 to the target over the warm-up steps, then holds."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CRSchedule:
    target_cr: float = 8.0
    warmup_steps: int = 700

    def __post_init__(self):
        try:
            self.target_cr = float(self.target_cr)
        except (TypeError, ValueError):
            raise ValueError(f"--cr must be a number >= 1 (target compression ratio); got {self.target_cr!r}") from None
        if not self.target_cr >= 1:
            raise ValueError(f"--cr must be >= 1 (1 = no compression, 8 = keep 1 token in 8); got {self.target_cr}")
        if self.warmup_steps < 0:
            raise ValueError(f"CR warm-up steps must be >= 0; got {self.warmup_steps}")

    def cr(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.target_cr
        return 1.0 + (self.target_cr - 1.0) * min(1.0, step / self.warmup_steps)

    def target_fraction(self, step: int) -> float:
        """Fraction of tokens the loss asks to flag for eviction: ``1 - 1 / CR(step)``."""
        return 1.0 - 1.0 / self.cr(step)
