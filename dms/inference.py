"""Load a DMS checkpoint (ours or NVIDIA's released format) ready for ``model.generate()``."""
from __future__ import annotations

import contextlib
import glob
import os
import re

import torch
from safetensors import safe_open

from .config import DMSConfig
from .patching import decoder_layers, retrofit

NVIDIA_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.dms_proj_alpha\.(weight|bias)$")
OUR_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.dms_retention\.(norm_weight|proj\.weight|proj\.bias)$")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    prev = logging.get_verbosity()
    logging.set_verbosity_error()  # the retention weights are "unexpected" to the base class; we load them next
    try:
        yield
    finally:
        logging.set_verbosity(prev)


def _retention_tensors(path: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}: DMS checkpoints are saved with safetensors")
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                if "dms_retention" in k or "dms_proj_alpha" in k:
                    out[k] = sf.get_tensor(k)
    return out


def load_retention_weights(model, path: str) -> int:
    """Copy retention-head weights from a checkpoint folder into a retrofitted model; returns how many."""
    layers = decoder_layers(model)
    n = 0
    for name, t in _retention_tensors(path).items():
        m = OUR_WEIGHT.search(name)
        if m:
            head = layers[int(m.group(1))].self_attn.dms_retention
            target = {"norm_weight": head.norm_weight, "proj.weight": head.proj.weight, "proj.bias": head.proj.bias}[m.group(2)]
        else:
            m = NVIDIA_WEIGHT.search(name)
            if not m:
                continue
            layer = layers[int(m.group(1))]
            head = layer.self_attn.dms_retention
            # NVIDIA's projection reads the attention input, input_layernorm(x) = RMSNorm(x) * w_ln, so
            # our head reproduces it exactly with its norm weight set to the layer norm's weight.
            head.norm_weight.data.copy_(layer.input_layernorm.weight.float())
            target = head.proj.weight if m.group(2) == "weight" else head.proj.bias
        if target.shape != t.shape:
            raise ValueError(f"retention weight {name} has shape {tuple(t.shape)}, model expects {tuple(target.shape)}")
        target.data.copy_(t.to(target.dtype))
        n += 1
    return n


def load(path: str, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         attention_impl: str | None = None, window: int | None = None, cache: str = "auto",
         cuda_graphs: bool = False):
    """Load a DMS checkpoint folder and return ``(model, tokenizer)`` in eval mode.

    ``model.generate()`` then prunes the KV cache live: a cache is created per call, ``cache="paged"``
    (:class:`dms.paged_cache.PagedDMSCache`), ``"reference"`` (:class:`dms.DMSCache`) or ``"auto"``
    (paged on CUDA, reference elsewhere). ``cuda_graphs=True``: one-token steps on the paged cache are
    replayed as CUDA graphs (:func:`dms.graphs.enable_graph_decoding`; eager static steps off CUDA).
    Raises ValueError if the checkpoint has no DMS settings.
    """
    from .paged_cache import CACHE_KINDS

    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}; got {cache!r}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a checkpoint folder (expected config.json + *.safetensors)")
    hf_config = AutoConfig.from_pretrained(path)
    cfg = DMSConfig.from_hf_config(hf_config)  # raises for plain models
    if attention_impl is not None:
        cfg.attention_impl = attention_impl
    if window is not None:
        cfg.window = window
    if cfg.retention == "adapter":
        cfg.eps = float(getattr(hf_config, "rms_norm_eps", cfg.eps))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    retrofit(model, cfg)
    model._dms_cache_kind = cache
    if cfg.retention == "adapter":
        n = load_retention_weights(model, path)
        if n == 0:
            raise ValueError(f"{path} declares adapter retention heads but holds no dms_retention/dms_proj_alpha weights")
    if device is not None:
        model.to(device)
    model.eval()
    if cuda_graphs:
        from .graphs import enable_graph_decoding

        enable_graph_decoding(model)
    tokenizer = None
    with contextlib.suppress(Exception):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
