"""``dms.retrofit``: patch a loaded Hugging Face causal LM in place (no copied modeling files).

What the patch does:
1. registers the ``dms`` attention implementation (dms/attention.py) and switches the model to it;
2. adds a retention head per decoder layer: an :class:`~dms.heads.AdapterRetentionHead` stored as
   ``layer.self_attn.dms_retention`` (adapter mode), or a hook on ``q_proj`` (q-neuron mode);
3. hooks the top-level forward to capture the 2D padding mask and the cache;
4. wraps ``generate`` so that a :class:`~dms.cache.DMSCache` is used unless the caller passes one.

:func:`enable_gradient_checkpointing` is the activation checkpointing to use with a retrofitted model
(transformers' own does not re-run the retention heads in the backward pass).
"""
from __future__ import annotations

import contextlib
import inspect
import types

import torch
from transformers import AttentionInterface

from .attention import DMSState, ForwardPlan, dms_attention_forward
from .config import DMSConfig
from .heads import AdapterRetentionHead

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_NAME = "dms"


def _register():
    AttentionInterface.register(ATTN_NAME, dms_attention_forward)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Llama-style causal LM (``model.model.layers``), PEFT-wrapped or not."""
    return decoder_stack(model).layers


def decoder_stack(model) -> torch.nn.Module:
    """The module owning the decoder layers (``model.model`` for Llama-style LMs)."""
    base = model
    for _ in range(5):  # PeftModel -> LoraModel -> CausalLM -> Model
        if hasattr(base, "layers") and isinstance(base.layers, torch.nn.ModuleList):
            return base
        base = getattr(base, "model", None) or getattr(base, "base_model", None)
        if base is None:
            break
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}; supported families: {SUPPORTED_FAMILIES}")


def _check_family(config):
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"DMS does not support model type {mt!r} yet; supported families: {', '.join(SUPPORTED_FAMILIES)}. "
            "Architectures with standard q/k/v projections and a `self_attn` per decoder layer can be added "
            "to dms.patching.SUPPORTED_FAMILIES once covered by the logits-equality test."
        )


def _layer_prehook(layer, args, kwargs):
    attn = layer.self_attn
    state: DMSState = attn._dms_state
    if not state.enabled:
        return None
    x = args[0] if args else kwargs["hidden_states"]
    attn._dms_z = attn.dms_retention(x)
    return None


def _make_q_hook(num_heads: int, num_kv_heads: int, head_dim: int, layer_granularity: bool):
    group = num_heads // num_kv_heads
    # the first query head of each GQA group (or head 0 for one decision per layer), as a slice: no
    # index tensor to copy to the device (a host sync per layer) on every call
    heads = slice(0, 1) if layer_granularity else slice(0, num_heads, group)
    masks: dict = {}  # (device, dtype) -> [H, D] mask, built once

    def hook(q_proj, args, out):
        attn = q_proj._dms_attn()
        state: DMSState = attn._dms_state
        if not state.enabled:
            return None
        q = out.view(*out.shape[:-1], num_heads, head_dim)
        attn._dms_z = q[..., heads, head_dim - 1].float()  # [B, T, Hkv or 1], read before RoPE
        mask = masks.get((out.device, out.dtype))
        if mask is None:
            mask = masks[(out.device, out.dtype)] = torch.ones(num_heads, head_dim, dtype=out.dtype, device=out.device)
            mask[heads, head_dim - 1] = 0  # that channel no longer takes part in attention
        return (q * mask).view_as(out)

    return hook


def _model_prehook(model, args, kwargs):
    state: DMSState = model._dms_state
    bound = model._dms_sig.bind_partial(*args, **kwargs).arguments
    state.attention_mask = bound.get("attention_mask")
    state.cache = bound.get("past_key_values")
    state.valid_memo = None
    state.records = {}
    state.plan = None  # built on first use by the layers (masks shared by all layers of this forward)
    if state.enabled and state.cache is None and model.training:
        src = bound.get("input_ids")
        src = src if src is not None else bound.get("inputs_embeds")
        if src is not None:  # training step: draw every layer's Gumbel noise now, in one call
            plan = state.plan = ForwardPlan(state, src.shape[0], src.shape[1], src.device)
            plan.noise(0, 1 if state.config.granularity == "layer" else state.num_kv_heads)
    return None


def retrofit(model, config: DMSConfig | None = None):
    """Turn a loaded causal LM into a DMS model in place and return it.

    Args:
        model: a ``*ForCausalLM`` of a supported family (Llama, Mistral, Qwen2, Qwen3), any head layout.
        config: DMS settings (default ``DMSConfig()``); written into ``model.config.dms``.
    """
    config = config or DMSConfig()
    if getattr(model, "_dms_state", None) is not None:
        raise ValueError("this model is already retrofitted with DMS")
    hf = model.config
    _check_family(hf)
    _register()
    layers = decoder_layers(model)
    num_heads = hf.num_attention_heads
    num_kv = getattr(hf, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    state = DMSState(config, len(layers), num_kv)
    n_out = 1 if config.granularity == "layer" else num_kv
    param = next(model.parameters())
    for layer in layers:
        attn = layer.self_attn
        attn._dms_state = state
        attn._dms_z = None
        if config.retention == "adapter":
            head = AdapterRetentionHead(hf.hidden_size, n_out, config.eps).to(device=param.device, dtype=torch.float32)
            attn.dms_retention = head
            layer.register_forward_pre_hook(_layer_prehook, with_kwargs=True)
        else:
            if head_dim < 2:
                raise ValueError(f"q_neuron retention needs head_dim >= 2; got {head_dim}")
            ref = lambda a=attn: a  # noqa: E731 - avoid registering attn as a submodule of q_proj
            attn.q_proj._dms_attn = ref
            attn.q_proj.register_forward_hook(_make_q_hook(num_heads, num_kv, head_dim, config.granularity == "layer"))
    model._dms_state = state
    # The hook sits on the decoder stack, so both model(...) and model.model(...) (used by the
    # distillation loss to get hidden states without full-vocabulary logits) pass through it.
    stack = decoder_stack(model)
    stack._dms_state = state
    stack._dms_sig = inspect.signature(stack.forward)
    stack.register_forward_pre_hook(_model_prehook, with_kwargs=True)
    model.config._attn_implementation = ATTN_NAME
    for m in model.modules():  # sub-configs (e.g. text_config) share the switch
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_NAME
    config.write_to_hf_config(model.config)
    _wrap_generate(model)
    return model


def _wrap_generate(model):
    original = model.generate

    def generate(self, *args, **kwargs):
        from .cache import DMSCache

        shared = kwargs.pop("dms_shared_prefix", True)
        system_len = kwargs.pop("dms_system_len", None)
        if system_len is not None and (not shared or kwargs.get("past_key_values") is not None
                                       or not self._dms_state.enabled):
            raise ValueError(f"dms_system_len={system_len} shares a system prompt through the shared-prefix cache: "
                             "it cannot be combined with dms_shared_prefix=False, your own past_key_values or "
                             "DMS disabled; drop dms_system_len")
        if self._dms_state.enabled and kwargs.get("past_key_values") is None:
            if shared:  # W samples of a prompt share one copy of its pruned KV (dms/shared_prefix.py)
                from .shared_prefix import maybe_generate_shared

                if system_len is not None:
                    kwargs["dms_system_len"] = system_len
                out = maybe_generate_shared(self, original, args, kwargs)
                if out is not None:
                    return out
            from .paged_cache import make_cache  # paged on CUDA, reference elsewhere, or dms.load(cache=...)

            kwargs["past_key_values"] = make_cache(self, getattr(self, "_dms_cache_kind", "auto"))
        return original(*args, **kwargs)

    model.generate = types.MethodType(generate, model)


def dms_state(model) -> DMSState:
    state = getattr(model, "_dms_state", None)
    if state is None:
        for m in model.modules():
            state = getattr(m, "_dms_state", None)
            if state is not None:
                break
    if state is None:
        raise ValueError("model is not retrofitted with DMS: call dms.retrofit(model, DMSConfig(...)) first")
    return state


@contextlib.contextmanager
def dms_disabled(model):
    """Run the model exactly as the original (the distillation teacher): no heads, no mask."""
    state = dms_state(model)
    prev = state.config.enabled
    state.config.enabled = False
    try:
        yield
    finally:
        state.config.enabled = prev


@contextlib.contextmanager
def packed_documents(model, doc_ids: torch.Tensor | None):
    """Attach packed-document ids ``[B, T]`` (-1 = padding) to the next forward passes."""
    state = dms_state(model)
    prev = state.doc_ids
    state.doc_ids = doc_ids
    try:
        yield
    finally:
        state.doc_ids = prev


def enable_gradient_checkpointing(model):
    """Activation checkpointing per decoder layer of a retrofitted model (use it instead of
    ``model.gradient_checkpointing_enable()``).

    transformers' own checkpointing re-runs only ``layer.forward`` in the backward pass, not the
    layer's forward pre-hooks, and the adapter retention head runs in such a hook: the recomputed
    attention would find no eviction logits. Here the checkpointed function runs the pre-hooks and
    then the forward (non-reentrant), with the DMS state of the first pass replayed: documents, padding
    mask, on/off switch and the forward plan, whose Gumbel noise the recomputation therefore reuses
    (the RNG state is replayed as well). Calling it twice is a no-op. Returns the model.
    """
    from torch.utils.checkpoint import checkpoint

    replayed = ("doc_ids", "attention_mask", "cache", "plan")
    for layer in decoder_layers(model):
        if getattr(layer, "_dms_checkpointed", False):
            continue
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
        forward = layer.forward

        def wrapped(*args, _forward=forward, _layer=layer, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _forward(*args, **kwargs)
            # a cache would be extended twice (first pass + recomputation); training needs none
            for key in ("past_key_values", "past_key_value", "layer_past"):
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False

            # the recomputation runs in backward, after packed_documents()/dms_disabled() have exited:
            # replay the DMS state of the first pass
            state = _layer.self_attn._dms_state
            first = {k: getattr(state, k) for k in replayed}
            enabled = state.config.enabled

            def run(*a):
                now = {k: getattr(state, k) for k in first}
                now_enabled = state.config.enabled
                for k, v in first.items():
                    setattr(state, k, v)
                state.config.enabled = enabled
                try:
                    for hid, hook in _layer._forward_pre_hooks.items():
                        if hid in _layer._forward_pre_hooks_with_kwargs:
                            hook(_layer, a, kwargs)
                        else:
                            hook(_layer, a)
                    return _forward(*a, **kwargs)
                finally:
                    for k, v in now.items():
                        setattr(state, k, v)
                    state.config.enabled = now_enabled

            return checkpoint(run, *args, use_reentrant=False)

        layer.forward = wrapped
        layer._dms_checkpointed = True
    return model


def retention_parameters(model):
    """Parameters of the adapter retention heads (empty in q-neuron mode)."""
    return [p for n, p in model.named_parameters() if "dms_retention" in n]
