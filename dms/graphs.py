"""Decode steps without per-step host overhead: the model's one-token step captured as a CUDA graph.

A decode step of a 32-layer model launches several hundred small kernels; launched one by one from
Python they cost more than the step's memory traffic at small batch (transformers' default path spends
most of its step time there). :class:`GraphedDecodeStep` captures the whole step (embedding, every
layer's retention head, the paged cache's Triton append + decode kernels, the LM head) once and replays
it per token. The paged cache supports this through its *static* mode
(:meth:`dms.paged_cache.PagedDMSCacheLayer.begin_static`): pages and block-table columns for the next
``horizon`` tokens are reserved up front, the kernel grid is fixed, and nothing reads device values on
the host. After ``horizon`` tokens the step is captured again (a few milliseconds).

:func:`fast_generate` is a lean generation loop on top (greedy or sampling, eos handling, batches of
prompts of different lengths): prefill through the paged cache, then graph replays.

    import dms
    from dms.graphs import fast_generate
    model, tok = dms.load("runs/x/export", device="cuda", dtype="bfloat16")
    enc = tok(["a prompt", "another, longer prompt"], return_tensors="pt", padding=True).to("cuda")
    out = fast_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=256)
    print(tok.batch_decode(out.sequences[:, enc.input_ids.shape[1]:]))

On CPU (or ``cuda_graph=False``) the same static-mode code runs eagerly, which is how CI tests it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .paged_cache import PagedDMSCache


class GraphedDecodeStep:
    """``step(input_ids [B, 1], position_ids [B, 1]) -> logits [B, V]`` for a DMS model and its cache.

    Args:
        model: a retrofitted causal LM (DMS on), on the device of ``cache``.
        cache: a :class:`PagedDMSCache` that already holds the prompt (prefill done), or a
            :class:`dms.shared_prefix.SharedPrefixDMSCache` (W samples sharing each prompt's pruned KV).
        horizon: decode steps per capture (pages for that many tokens are reserved up front).
        cuda_graph: capture and replay (default: when the model is on CUDA). With False the static-mode
            step runs eagerly (same cache code path; used on CPU and as the reference in tests).
        fuse: run the step's elementwise chains as fused Triton kernels (:mod:`dms.decode_fusion`);
            default: when capturing CUDA graphs. ``fuse_gemm``: with ``fuse``, also the grouped q/k/v and
            gate/up projection kernels of batches of at most 16 rows (:func:`dms.decode_fusion.fused_decode_ops`);
            default: when ``fuse`` is on and CUDA graphs are captured (measured on the H100 at 32K / batch 8,
            docs/benchmarks.md "Session 5": 8.51 vs 9.16 ms per CR-8 step).

    The returned logits of a replay live in a buffer that the next step overwrites; clone to keep them.
    Call :meth:`close` (or use it as a context manager) before other cache operations (another prompt
    chunk, beam reorder): it leaves static mode.
    """

    def __init__(self, model, cache: PagedDMSCache, horizon: int = 128, cuda_graph: bool | None = None,
                 forward=None, fuse: bool | None = None, fuse_gemm: bool | None = None):
        from .shared_prefix import SharedPrefixDMSCache

        if not isinstance(cache, (PagedDMSCache, SharedPrefixDMSCache)):
            raise ValueError("GraphedDecodeStep needs a dms.paged_cache.PagedDMSCache or a "
                             f"dms.shared_prefix.SharedPrefixDMSCache; got {type(cache).__name__}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1; got {horizon}")
        layers = [l for l in cache.layers if l.is_initialized]
        if len(layers) != len(cache.layers):
            raise ValueError("the cache has not seen a prompt yet: run the prefill through it first")
        p = next(model.parameters())
        self.device = p.device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on CUDA; it is on {self.device}")
        if cuda_graph and getattr(cache, "backend", "triton") != "triton":
            raise ValueError("cuda_graph=True needs the paged cache's triton backend (PagedDMSCache(backend='triton'))")
        self.model, self.cache, self.horizon, self.cuda_graph = model, cache, int(horizon), bool(cuda_graph)
        from .decode_fusion import fusion_available

        if fuse and not fusion_available(self.device):
            raise ValueError(f"fuse=True needs CUDA (or TRITON_INTERPRET=1) and Triton; the model is on {self.device}")
        self.fuse = bool(self.cuda_graph and fusion_available(self.device)) if fuse is None else bool(fuse)
        self.fuse_gemm = self.fuse and (self.cuda_graph if fuse_gemm is None else bool(fuse_gemm))
        self._call = forward or model  # the un-wrapped forward when enable_graph_decoding wraps the model
        self.graph = None
        self.left = 0
        self.warm = False
        self.captures = 0
        self._ids = self._pos = None  # static inputs, allocated at the first call
        self._logits = None

    # --- one step --------------------------------------------------------------------------------------
    def _forward(self, input_ids, position_ids):
        from .decode_fusion import fused_decode_ops

        with fused_decode_ops(self.model, self.fuse, gemm=self.fuse_gemm):
            out = self._call(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _begin(self):
        for l in self.cache.layers:
            l.begin_static(self.horizon)
        self.left = self.horizon

    def _end(self):
        self.graph = None
        self.left = 0
        for l in self.cache.layers:
            l.end_static()

    def _capture(self):
        layers = self.cache.layers
        saved = [l.static_host_state() for l in layers]
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._logits = self._forward(self._ids, self._pos)
        for l, st in zip(layers, saved):  # capture ran the Python once, but no kernel
            l.set_static_host_state(st)
        self.graph = g
        self.captures += 1

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self._ids is None:
            self._ids = torch.zeros(input_ids.shape, dtype=torch.long, device=self.device)
            self._pos = torch.zeros(position_ids.shape, dtype=torch.long, device=self.device)
        if input_ids.shape != self._ids.shape or position_ids.shape != self._pos.shape or input_ids.shape[1] != 1:
            raise ValueError(f"expected input_ids and position_ids of shape {tuple(self._ids.shape)}; "
                             f"got {tuple(input_ids.shape)} and {tuple(position_ids.shape)}")
        if self.left == 0:
            self._end()
            self._begin()
        self.left -= 1
        if not self.cuda_graph:
            return self._forward(input_ids.to(self.device), position_ids.to(self.device))
        if not self.warm:
            # First step eagerly on a side stream: compiles the Triton kernels and creates library
            # handles, which must not happen during capture. It is a real step of the sequence.
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                logits = self._forward(input_ids.to(self.device), position_ids.to(self.device))
            torch.cuda.current_stream().wait_stream(s)
            self.warm = True
            return logits
        if self.graph is None:
            self._capture()
        self._ids.copy_(input_ids)
        self._pos.copy_(position_ids)
        self.graph.replay()
        for l in self.cache.layers:
            l.advance_static(1)
        return self._logits

    def close(self):
        """Leave static mode (the cache is an ordinary paged cache again)."""
        self._end()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class FastGenerateOutput:
    sequences: torch.Tensor  # [B, T_prompt + new] (prompt as given, padding included)
    cache: PagedDMSCache
    steps: int  # decode steps run
    captures: int  # CUDA graph captures


def _sampler(do_sample, temperature, top_k, top_p, generator):
    """``logits [B, V] -> tokens [B]``: argmax, or sampling after transformers' own logits warpers."""
    if not do_sample:
        return lambda logits: logits.argmax(-1)
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k and top_k > 0:
        warp.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warp.append(TopPLogitsWarper(top_p))
    return lambda logits: torch.multinomial(warp(None, logits.float()).softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def fast_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, cuda_graph: bool | None = None, horizon: int = 128,
                  generator: torch.Generator | None = None, streamer=None, cache: PagedDMSCache | None = None,
                  fuse: bool | None = None, **cache_kwargs) -> FastGenerateOutput:
    """Generate with the paged DMS cache and graph-replayed decode steps (see module doc).

    Prompts may be left-padded (``attention_mask`` 0 = padding, never cached); positions follow
    transformers' convention (cumulative count of real tokens). ``eos_token_id`` / ``pad_token_id``
    default to the model's generation config, as in ``model.generate``; rows that produced an eos
    continue with the pad id (else the first eos id), and generation stops when every row has. ``streamer`` gets ``put``/``end`` as in
    transformers. ``cache``: continue an existing paged cache (multi-turn) instead of a new one.
    ``fuse``: fused elementwise kernels in the decode step (:mod:`dms.decode_fusion`; default with CUDA graphs).
    """
    from .patching import dms_state

    state = dms_state(model)
    if not state.enabled:
        raise ValueError("fast_generate needs DMS enabled (it decodes through the paged DMS cache)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
    dev = next(model.parameters()).device
    input_ids = input_ids.to(dev)
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(dev)
    gcfg = getattr(model, "generation_config", None)
    if eos_token_id is None and gcfg is not None:  # as model.generate: the model's own eos (pass [] for none)
        eos_token_id = gcfg.eos_token_id
    if pad_token_id is None and gcfg is not None:
        pad_token_id = gcfg.pad_token_id
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if cache is None:
        cache = PagedDMSCache(model, **cache_kwargs)
        prior = torch.zeros(B, dtype=torch.long, device=dev)
    else:
        prior = cache.layers[0].seen.to(dev) if cache.layers[0].is_initialized else torch.zeros(B, dtype=torch.long, device=dev)
    position_ids = (prior[:, None] + attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # the mask of this chunk only: the cache knows which earlier tokens are real
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    next_pos = (prior + attention_mask.long().sum(-1))[:, None]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    eos_t = torch.tensor(eos, device=dev) if eos else None
    new = []
    sample = _sampler(do_sample, temperature, top_k, top_p, generator)
    step = GraphedDecodeStep(model, cache, horizon=horizon, cuda_graph=cuda_graph, fuse=fuse)
    try:
        for i in range(max_new_tokens):
            tok = sample(logits)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            new.append(tok)
            if streamer is not None:
                streamer.put(tok.cpu())
            if eos_t is not None:
                done = done | torch.isin(tok, eos_t)
                if i % 8 == 0 and bool(done.all()):  # a host sync: only every 8 tokens
                    break
            if i == max_new_tokens - 1:
                break
            logits = step(tok[:, None], next_pos)
            next_pos = next_pos + 1
    finally:
        step.close()
    if streamer is not None:
        streamer.end()
    gen = torch.stack(new, 1)
    if eos_t is not None and gen.shape[1] > 1:  # the loop checks only every 8 tokens: cut what followed
        is_eos = torch.isin(gen, eos_t)
        if bool(is_eos.any(1).all()):
            gen = gen[:, : int(is_eos.int().argmax(1).max()) + 1]
    seq = torch.cat([input_ids, gen], 1)
    return FastGenerateOutput(sequences=seq, cache=cache, steps=len(new) - 1, captures=step.captures)


# --- model.generate() through graph-replayed steps ---------------------------------------------------------
def _supported_cache(cache) -> bool:
    from .shared_prefix import SharedPrefixDMSCache

    if isinstance(cache, PagedDMSCache):
        return all(l.is_initialized for l in cache.layers)
    return isinstance(cache, SharedPrefixDMSCache)


def close_graph_step(cache) -> None:
    """Leave static decoding on ``cache`` (before a prompt chunk, a beam reorder, a batch change)."""
    step = cache.__dict__.pop("_dms_graph_step", None) if cache is not None else None
    if step is not None:
        step.close()


def enable_graph_decoding(model, horizon: int = 128, cuda_graph: bool | None = None, fuse: bool | None = None):
    """Route one-token steps of ``model(...)`` / ``model.generate()`` through :class:`GraphedDecodeStep`.

    Applies when the step's cache is a :class:`PagedDMSCache` (after its prefill) or a shared-prefix
    cache, the input is one token per row, gradients are off and no attentions / hidden states are
    asked for; everything else runs the model's own forward (and first leaves static mode, so prompt
    chunks of a multi-turn conversation and beam reorders work as before). ``model.generate()`` still
    runs its own Python per step (logits processors, stopping criteria), but the model's step is one
    graph replay. On CPU (or ``cuda_graph=False``) the static-mode steps run eagerly. ``fuse``: fused
    elementwise kernels in the step (:mod:`dms.decode_fusion`; default with CUDA graphs).
    Returns the model; :func:`disable_graph_decoding` undoes it.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1; got {horizon}")
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if getattr(model, "_dms_graph_original_forward", None) is None:
        model._dms_graph_original_forward = model.forward
    original = model._dms_graph_original_forward
    model._dms_graph_settings = dict(horizon=int(horizon), cuda_graph=cuda_graph, fuse=fuse)

    @functools.wraps(original)  # keeps the signature: generate() passes position_ids only if forward takes them
    def forward(*args, **kwargs):
        from .patching import dms_state

        cache = kwargs.get("past_key_values")
        ids = kwargs.get("input_ids", args[0] if args else None)
        eligible = (
            cache is not None and _supported_cache(cache) and ids is not None and ids.dim() == 2
            and ids.shape[1] == 1 and kwargs.get("inputs_embeds") is None and not torch.is_grad_enabled()
            and not model.training and not kwargs.get("output_attentions") and not kwargs.get("output_hidden_states")
            and dms_state(model).enabled and len(args) <= 1
        )
        if not eligible:
            close_graph_step(cache)
            return original(*args, **kwargs)
        step = cache.__dict__.get("_dms_graph_step")
        if step is not None and (step._ids is not None and step._ids.shape != ids.shape):
            close_graph_step(cache)
            step = None
        if step is None:
            step = GraphedDecodeStep(model, cache, forward=original, **model._dms_graph_settings)
            cache._dms_graph_step = step
        pos = kwargs.get("position_ids")
        if pos is None:  # the next position of each row = its real tokens seen so far (padding excluded)
            pos = _next_positions(cache)
        logits = step(ids, pos[:, -1:])
        return CausalLMOutputWithPast(logits=logits[:, None, :].clone(), past_key_values=cache)

    model.forward = forward
    return model


def _next_positions(cache) -> torch.Tensor:
    layer = cache.layers[0]
    if isinstance(cache, PagedDMSCache):
        return layer.seen[:, None].clone()
    seen = layer.suffix.seen if layer.suffix is not None else layer.pseen.repeat_interleave(layer.samples)
    return seen[:, None].clone()


def disable_graph_decoding(model):
    """Undo :func:`enable_graph_decoding` (open graph steps end when their cache is next used)."""
    original = getattr(model, "_dms_graph_original_forward", None)
    if original is not None:
        model.forward = original
        model._dms_graph_original_forward = None
    return model
