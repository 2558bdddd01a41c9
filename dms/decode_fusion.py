"""Fused elementwise kernels in a transformers model's decode step (``dms_kernels.fused_ops``).

A one-token decode step of a Llama-style layer runs about 60 kernels; most are elementwise chains of a
few microseconds each (RMSNorm: 8, rotary embedding: 10, the retention head: 5, SiLU-gate: 2), which
together cost about as much as reading the layer's weights at batch 8 (docs/benchmarks.md). Inside
:func:`fused_decode_ops` those chains run as one Triton kernel each:

- every ``*RMSNorm`` of the supported families (input/post-attention norms, the final norm, Qwen3's
  q/k norms) -> ``rms_norm``;
- ``apply_rotary_pos_emb`` of the model's modeling module -> ``rope`` (q and k in one launch);
- the gated MLP's ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU -> ``silu_mul``;
- :class:`dms.heads.AdapterRetentionHead` -> ``retention_head``;
- with ``gemm=True`` (batches of at most 16 rows; :class:`dms.graphs.GraphedDecodeStep` turns it on with CUDA
  graphs): q/k/v projections in one launch, gate/up with the SiLU gate in one launch, and the decoder layer's two
  residual adds in the epilogues of o_proj and down_proj (``linear_residual``; ``DMS_DECODE_RESIDUAL=0`` keeps
  them as separate adds).

The kernels round where transformers rounds, so bf16 results match the unfused ops (up to the RMSNorm
reduction order). The swap is per instance (``module.forward``) and per modeling module (the rope
function), and is undone on exit. :class:`dms.graphs.GraphedDecodeStep` uses it on CUDA (``fuse=None``),
so the captured graph holds the fused kernels.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
import torch.nn as nn

from .heads import AdapterRetentionHead

FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3")


def _family(module) -> str | None:
    mod = type(module).__module__
    for fam in FAMILY_MODULES:
        if mod == f"transformers.models.{fam}.modeling_{fam}":
            return fam
    return None


def _is_rms_norm(m) -> bool:
    return (_family(m) is not None and type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() == 1 and hasattr(m, "variance_epsilon"))


def _is_attention(m) -> bool:
    return _family(m) is not None and type(m).__name__.endswith("Attention")


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_gated_mlp(m) -> bool:
    return (_family(m) is not None and type(m).__name__.endswith("MLP") and _is_silu(getattr(m, "act_fn", None))
            and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")))


def _rms_forward(m):
    from dms_kernels.fused_ops import rms_norm

    def forward(hidden_states):
        return rms_norm(hidden_states, m.weight, m.variance_epsilon)

    return forward


def _mlp_forward(m, gemm: bool = False):
    from dms_kernels.fused_ops import gate_up_silu, silu_mul
    from dms_kernels.fused_ops.triton_ops import SKINNY_MAX_ROWS

    def forward(x):
        if gemm and x.shape[:-1].numel() <= SKINNY_MAX_ROWS:  # decode: gate, up and SiLU(gate) * up in one kernel
            return m.down_proj(gate_up_silu(x, m.gate_proj.weight, m.up_proj.weight, m.gate_proj.bias, m.up_proj.bias))
        return m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x)))

    return forward


def _qkv_forwards(attn):
    """q_proj computes q, k and v in one launch and hands k, v to k_proj / v_proj, which transformers calls
    next with the same input (any other input: their own F.linear)."""
    from dms_kernels.fused_ops import grouped_linear
    from dms_kernels.fused_ops.triton_ops import SKINNY_MAX_ROWS

    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    pending: dict = {}

    def q_forward(x):
        if x.shape[:-1].numel() > SKINNY_MAX_ROWS:
            return torch.nn.functional.linear(x, q.weight, q.bias)
        biases = [q.bias, k.bias, v.bias] if q.bias is not None else None
        yq, yk, yv = grouped_linear(x, [q.weight, k.weight, v.weight], biases)
        pending["k"], pending["v"], pending["x"] = yk, yv, x
        return yq

    def kv_forward(mod, name):
        def forward(x):
            if pending.get("x") is x and name in pending:
                return pending.pop(name)
            return torch.nn.functional.linear(x, mod.weight, mod.bias)
        return forward

    return q_forward, kv_forward(k, "k"), kv_forward(v, "v")


def _is_decoder_layer(m) -> bool:
    return (_family(m) is not None and type(m).__name__.endswith("DecoderLayer") and _gemm_fusable_attention(
        getattr(m, "self_attn", None)) and _is_gated_mlp(getattr(m, "mlp", None))
        and all(hasattr(m, n) for n in ("input_layernorm", "post_attention_layernorm")))


def residual_epilogue_enabled() -> bool:
    """Decoder layers' residual adds in the o_proj / down_proj epilogues (gemm mode); DMS_DECODE_RESIDUAL=0: off."""
    return os.environ.get("DMS_DECODE_RESIDUAL", "1") != "0"


def _layer_forwards(layer):
    """(decoder layer forward, o_proj forward, down_proj forward) with the residual adds in the projections.

    The layer runs transformers' own sequence (norm, attention, norm, MLP) but hands each residual to the
    projection that ends the block, which returns ``residual + proj(x)`` (:func:`linear_residual`). Any call
    with more than ``SKINNY_MAX_ROWS`` rows or positional extras goes to the class's own forward; a
    projection that was not reached with its residual (another code path) leaves the add to the layer.
    """
    from dms_kernels.fused_ops import linear_residual
    from dms_kernels.fused_ops.triton_ops import SKINNY_MAX_ROWS

    own = type(layer).forward
    pending: dict = {}
    o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj

    def proj_forward(mod):
        def forward(x):
            res = pending.pop("res", None)
            if res is not None and x.shape[:-1].numel() <= SKINNY_MAX_ROWS:
                return linear_residual(x, mod.weight, res, mod.bias)
            if res is not None:
                pending["res"] = res  # not ours to add
            return torch.nn.functional.linear(x, mod.weight, mod.bias)
        return forward

    def layer_forward(hidden_states, *args, **kwargs):
        if args or hidden_states.shape[:-1].numel() > SKINNY_MAX_ROWS:
            return own(layer, hidden_states, *args, **kwargs)
        residual = hidden_states
        pending["res"] = residual
        h, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        if pending.pop("res", None) is not None:  # o_proj did not take it
            h = residual + h
        residual = h
        pending["res"] = residual
        out = layer.mlp(layer.post_attention_layernorm(h))
        if pending.pop("res", None) is not None:
            out = residual + out
        return out

    return layer_forward, proj_forward(o_proj), proj_forward(down_proj)


def _gemm_fusable_attention(m) -> bool:
    lin = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    return (_is_attention(m) and all(isinstance(x, nn.Linear) for x in lin)
            and len({x.in_features for x in lin}) == 1 and len({x.bias is None for x in lin}) == 1)


def _head_forward(m: AdapterRetentionHead):
    from dms_kernels.fused_ops import retention_head

    def forward(x):
        return retention_head(x, m.norm_weight, m.proj.weight, m.proj.bias, m.eps)

    return forward


def _rope_fn(original):
    from dms_kernels.fused_ops import rope

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.pop("unsqueeze_dim", args[0] if args else 1)
        ok = (unsqueeze_dim == 1 and not kwargs and len(args) <= 1 and q.dim() == 4 and cos.dim() == 3
              and cos.shape[-1] == q.shape[-1] and q.dtype == k.dtype == cos.dtype == sin.dtype)
        if not ok:  # partial rotary, other layouts: transformers' own function
            return original(q, k, cos, sin, *args, **kwargs)
        return rope(q, k, cos, sin)

    return apply_rotary_pos_emb


def fusable(model) -> dict:
    """What :func:`fused_decode_ops` would swap in ``model``: counts per kind (for logs and tests)."""
    n = dict(rms_norm=0, mlp=0, retention_head=0, rope_modules=0)
    mods = set()
    for m in model.modules():
        n["rms_norm"] += _is_rms_norm(m)
        n["mlp"] += _is_gated_mlp(m)
        n["retention_head"] += isinstance(m, AdapterRetentionHead)
        if _is_attention(m):
            mods.add(type(m).__module__)
    n["rope_modules"] = sum(hasattr(sys.modules[name], "apply_rotary_pos_emb") for name in mods)
    return n


@contextlib.contextmanager
def fused_decode_ops(model, enabled: bool = True, gemm: bool = False):
    """While active, ``model``'s elementwise chains run as fused Triton kernels (see the module doc).

    ``gemm``: also the decode-size projections (at most 16 rows): q/k/v in one launch and gate/up with the SiLU
    gate in one launch (``dms_kernels.fused_ops.grouped_linear`` / ``gate_up_silu``), instead of cuBLAS's
    separate (often split-K) products. Off here by default; graphed decode steps turn it on (H100, Llama-3-8B
    shapes, 32K / batch 8: 8.51 vs 9.16 ms per CR-8 step; ``scripts/bench_decode.py --compare-gemm`` times both).
    Needs CUDA tensors, or ``TRITON_INTERPRET=1`` on CPU (tests). Nested use is a no-op.
    """
    if not enabled or getattr(model, "_dms_fused", False):
        yield model
        return
    patched: list[nn.Module] = []
    rope_saved: dict[str, object] = {}
    try:
        if gemm and residual_epilogue_enabled():
            for m in model.modules():
                if _is_decoder_layer(m):
                    m.forward, m.self_attn.o_proj.forward, m.mlp.down_proj.forward = _layer_forwards(m)
                    patched.extend([m, m.self_attn.o_proj, m.mlp.down_proj])
        for m in model.modules():
            if _is_rms_norm(m):
                m.forward = _rms_forward(m)
            elif _is_gated_mlp(m):
                m.forward = _mlp_forward(m, gemm)
            elif isinstance(m, AdapterRetentionHead):
                m.forward = _head_forward(m)
            else:
                if gemm and _gemm_fusable_attention(m):
                    m.q_proj.forward, m.k_proj.forward, m.v_proj.forward = _qkv_forwards(m)
                    patched.extend([m.q_proj, m.k_proj, m.v_proj])
                if _is_attention(m):
                    name = type(m).__module__
                    mod = sys.modules[name]
                    if name not in rope_saved and hasattr(mod, "apply_rotary_pos_emb"):
                        rope_saved[name] = mod.apply_rotary_pos_emb
                        mod.apply_rotary_pos_emb = _rope_fn(rope_saved[name])
                continue
            patched.append(m)
        model._dms_fused = True
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for name, fn in rope_saved.items():
            sys.modules[name].apply_rotary_pos_emb = fn
        model._dms_fused = False


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fusion_available(device: torch.device) -> bool:
    """Fused kernels can run here: CUDA with Triton, or the Triton interpreter."""
    return _triton_importable() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
