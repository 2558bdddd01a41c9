"""DMS settings: one validated dataclass, serialisable into a Hugging Face ``config.json``.

Two on-disk spellings load:
- ours: a ``dms`` dict in config.json (``DMSConfig.to_dict()``);
- NVIDIA's released checkpoints: flat ``dms_*`` fields (``dms_window_size``, ``dms_alpha_scale``,
  ``dms_initial_alpha_offset``, ``dms_separate_alpha``, ``dms_alpha_per``) with weights named
  ``dms_proj_alpha*``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RETENTION_MODES = ("adapter", "q_neuron")
GRANULARITIES = ("head", "layer")
ATTENTION_IMPLS = ("auto", "eager", "flex", "triton")


@dataclass
class DMSConfig:
    """How a model evicts its KV cache (semantics pinned in DESIGN.md).

    Attributes:
        window: delayed-eviction window; key ``k`` stays fully visible to queries ``q - k <= window``.
        alpha_scale, alpha_offset: eviction logit ``l = alpha_scale * z - alpha_offset``.
        tau: Gumbel-sigmoid temperature during training.
        retention: ``adapter`` (RMSNorm + zero-initialised Linear on the layer input) or ``q_neuron``
            (last channel of the first query head of each GQA group, zero extra parameters).
        granularity: ``head`` (one decision per KV head) or ``layer`` (one per layer).
        attention_impl: training/prefill attention kernel: ``auto`` picks ``triton`` on CUDA when
            available, else ``eager``.
        enabled: False makes the patched model behave exactly like the original (used for the teacher).
        eps: RMSNorm epsilon of the adapter head.
    """

    window: int = 256
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    tau: float = 0.1
    retention: str = "adapter"
    granularity: str = "head"
    attention_impl: str = "auto"
    enabled: bool = True
    eps: float = 1e-6
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int):
            raise ValueError(f"window must be an integer >= 0; got {self.window!r}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (tokens kept fully visible after each key); got {self.window}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0 (Gumbel-sigmoid temperature, default 0.1); got {self.tau}")
        if not self.alpha_scale > 0:
            raise ValueError(f"alpha_scale must be > 0; got {self.alpha_scale}")
        if self.retention not in RETENTION_MODES:
            raise ValueError(f"retention must be one of {RETENTION_MODES}; got {self.retention!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {self.granularity!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}; got {self.attention_impl!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("enabled")  # runtime switch, not a property of the checkpoint
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DMSConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DMS config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf_config) -> "DMSConfig":
        """Read DMS settings from a transformers config (ours or NVIDIA's flat ``dms_*`` fields)."""
        ours = getattr(hf_config, "dms", None)
        if isinstance(ours, dict):
            return cls.from_dict(ours)
        if getattr(hf_config, "dms_window_size", None) is not None:
            per = getattr(hf_config, "dms_alpha_per", "head")
            return cls(
                window=int(hf_config.dms_window_size),
                alpha_scale=float(getattr(hf_config, "dms_alpha_scale", 100.0)),
                alpha_offset=float(getattr(hf_config, "dms_initial_alpha_offset", 5.0)),
                retention="adapter" if getattr(hf_config, "dms_separate_alpha", True) else "q_neuron",
                granularity="layer" if per == "layer" else "head",
            )
        raise ValueError(
            "this checkpoint has no DMS settings (no `dms` entry and no `dms_window_size` in config.json): "
            "it is a plain model. Retrofit it first (train/retrofit.py) or call dms.retrofit(model, DMSConfig(...))."
        )

    def write_to_hf_config(self, hf_config) -> None:
        hf_config.dms = self.to_dict()
