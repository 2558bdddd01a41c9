"""Typed retrofit configuration: recipe YAML + CLI -> these dataclasses -> library calls.

A recipe has four sections, each a dataclass validated on construction; unknown keys are errors:

    model: {name_or_path, dtype, gradient_checkpointing}
    data:  {source, text_field, split, seq_len, chat_template, seed, max_documents}
    dms:   {window, tau, retention, granularity, attention_impl, alpha_scale, alpha_offset}
    train: {steps, cr, lr, batch_size, grad_accum, trainable, output, resume, ...}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import DMSConfig
from ..data import DataConfig

TRAINABLE = ("adapter", "full", "lora")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # auto: what accelerate launch was given


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # None: the built-in tiny default (dms/default_model.py)
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be auto/float32/bfloat16/float16; got {self.dtype!r}")


@dataclass
class TrainConfig:
    steps: int = 1000
    cr: float = 8.0
    cr_warmup_steps: int | None = None  # default: 70% of steps
    lr: float = 1e-3
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 1  # sequences per device per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    compression_weight: float = 1.0
    kl_direction: str = "forward"
    kl_chunk: int = 1024
    trainable: str = "adapter"
    lora_r: int = 16
    lora_alpha: int = 32
    mixed_precision: str = "auto"
    seed: int = 0
    output: str = "runs/dms-retrofit"
    resume: str | None = None  # None, "auto", or a checkpoint folder
    overwrite: bool = False
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    eval_batches: int = 4
    progress: bool = True

    def __post_init__(self):
        try:
            self.cr = float(self.cr)
        except (TypeError, ValueError):
            raise ValueError(f"--cr must be a number >= 1; got {self.cr!r}") from None
        if not self.cr >= 1:
            raise ValueError(f"--cr must be >= 1 (1 = no compression, 8 = keep one token in eight); got {self.cr}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1; got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1; got {self.batch_size}, {self.grad_accum}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {TRAINABLE}; got {self.trainable!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {MIXED_PRECISION}; got {self.mixed_precision!r}")
        if self.kl_direction not in ("forward", "reverse"):
            raise ValueError(f"--kl-direction must be forward or reverse; got {self.kl_direction!r}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1; got {self.keep_last}")
        if self.cr_warmup_steps is None:
            self.cr_warmup_steps = max(1, int(0.7 * self.steps))


@dataclass
class RetrofitConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dms: DMSConfig = field(default_factory=DMSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.dms.retention == "q_neuron" and self.train.trainable == "adapter":
            raise ValueError("q_neuron retention has no adapter parameters: use --trainable full or lora")
        if self.dms.window >= self.data.seq_len:
            import warnings

            warnings.warn(
                f"window {self.dms.window} >= seq_len {self.data.seq_len}: every key stays inside the window, "
                "nothing is ever evicted during training; lower --window or raise --seq-len", stacklevel=2)

    def to_dict(self) -> dict:
        return {name: _asdict(getattr(self, name)) for name in ("model", "data", "dms", "train")}

    @classmethod
    def from_dict(cls, d: dict) -> "RetrofitConfig":
        sections = {"model": ModelConfig, "data": DataConfig, "dms": DMSConfig, "train": TrainConfig}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown recipe sections {sorted(unknown)}; expected {sorted(sections)}")
        built = {}
        for name, klass in sections.items():
            sec = dict(d.get(name) or {})
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(sec) - known
            if bad:
                raise ValueError(f"unknown keys in recipe section {name!r}: {sorted(bad)}; known: {sorted(known)}")
            built[name] = klass(**sec)
        return cls(**built)


def _asdict(obj) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    d.pop("enabled", None)
    return d


def load_recipe(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"recipe {path!r} not found; recipes live in recipes/*.yaml") from None
    if not isinstance(d, dict):
        raise ValueError(f"recipe {path!r} must be a mapping with sections model/data/dms/train")
    return d
