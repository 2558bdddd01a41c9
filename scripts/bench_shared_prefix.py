#!/usr/bin/env python3
"""Benchmark shared-prefix parallel sampling on the DMS cache (writes docs/results/shared_prefix.json).

Model: Llama-3-8B's layer shapes (hidden 4096, 32 query heads, 8 KV heads, head dim 128, MLP 14336,
vocab 128256), random bf16 weights, ``--layers`` decoder layers (default 4: a W=64 x 16K dense cache
for 32 layers needs 128 GiB, more than the GPU has; per-step times are reported for the layers run,
and per layer). Retention heads are calibrated on the prompt so that 7 of 8 decided tokens are
evicted (a CR-8 pattern, different per head).

For each prompt length P and sample count W, one decode step (all W samples, one token each) with:
- ``shared``: SharedPrefixDMSCache: one copy of the pruned prompt KV, Triton prefix attention for all
  samples' queries at once, per-sample suffix, exact LSE merge;
- ``per_sample_dms``: the same cache code and kernels, but each sample holds its own copy of the pruned
  prompt (samples=1 per group, W groups): the prefix KV is read W times;
- ``dense``: transformers' own step with SDPA and its default DynamicCache over W full copies.
Also the prefix-attention kernel alone (shared vs per-sample copies). Memory: prefix bytes (constant in
W) and the largest W that fits on the GPU at P = 32K, computed from measured bytes per sample.

    python scripts/bench_shared_prefix.py                 # GPU, full grid
    python scripts/bench_shared_prefix.py --tiny          # CPU smoke test (small shapes)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="4096,16384,32768")
    p.add_argument("--samples", default="8,32,64,128")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--cr", type=float, default=8.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke test")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="DMS decode steps (shared and per-sample) replayed as CUDA graphs (dms.graphs)")
    p.add_argument("--plot", default=None, help="also write a PNG: decode-step ms vs samples W per prompt length")
    p.add_argument("--out", default="docs/results/shared_prefix.json")
    p.add_argument("--profile", action="store_true",
                   help="also trace one graph replay of both DMS steps at prompt 16K, W=64 under torch.profiler: "
                        "device time per kernel name and the kernel count go into 'profile' (where the time goes)")
    return p.parse_args(argv)


def build_model(args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.tiny:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                          rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def calibrate_cr(model, ids, cr, window: int = 0, calib_len: int | None = 2048):
    """Random retention weights, then a per-head bias that makes the prompt's *memory* CR about ``cr``.

    A prompt of P tokens held at memory CR c keeps P / c tokens: the last ``window`` ones plus a fraction
    k = (P / c - window) / (P - window) of the others, so the top 1 - k of each head's retention logits
    (over the first ``calib_len`` prompt tokens; None: all) evict. The benchmark reports the memory CR the
    prefill actually reached (``prefix_memory_cr``).
    """
    import torch

    import dms

    state = dms.dms_state(model)
    heads = [m for n, m in model.named_modules() if n.endswith("dms_retention")]
    g = torch.Generator(device="cpu").manual_seed(1)
    zs = []
    hooks = []
    for h in heads:
        h.proj.weight.data.copy_(torch.randn(h.proj.weight.shape, generator=g) * 0.02)
        h.proj.bias.data.zero_()  # the logits below must not include the bias of an earlier calibration
        hooks.append(h.register_forward_hook(lambda m, a, out: zs.append(out.detach())))
    impl = state.config.attention_impl
    with torch.no_grad(), dms.dms_disabled(model):
        state.config.enabled = True  # run the heads (with the DMS training attention: O(T) memory on CUDA)
        state.config.attention_impl = "auto"
        try:
            model(ids[:, : ids.shape[1] if calib_len is None else min(ids.shape[1], calib_len)])
        finally:
            state.config.attention_impl = impl
    for hk in hooks:
        hk.remove()
    cfg = state.config
    P = ids.shape[1]
    keep = min(1.0, max(1e-4, (P / cr - window) / max(P - window, 1)))
    for h, z in zip(heads, zs):
        # l = scale * (z + b) - offset > 0 for the top (1 - 1/cr) of z per head
        q = torch.quantile(z[0].float(), keep, dim=0)  # [Hkv]
        h.proj.bias.data.copy_(cfg.alpha_offset / cfg.alpha_scale - q.to(h.proj.bias.device) + 1e-4)


def timeit(fn, iters, sync):
    for _ in range(2):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import DynamicCache

    import dms
    from dms.graphs import GraphedDecodeStep
    from dms.shared_prefix import SharedPrefixDMSCache, SharedPrefixLayer

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("error: the full benchmark needs a GPU; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prompts = [int(x) for x in args.prompts.split(",")] if not args.tiny else [64, 128]
    samples = [int(x) for x in args.samples.split(",")] if not args.tiny else [2, 4]
    window = args.window if not args.tiny else 8
    iters = args.iters if not args.tiny else 2
    use_graphs = cuda and args.cuda_graphs == "on"

    model = build_model(args, device, dtype)
    dense_model = model  # the same weights before the patch serve the dense baseline
    weight_bytes_read = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    rows = []
    profile_rows = []
    if args.profile:
        spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).with_name("bench_decode.py"))
        bench_decode = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_decode)
        profile_call = bench_decode.profile_call
    from dms_kernels.prefix_attention import prefix_attention

    for P in prompts:
        torch.manual_seed(P)
        ids = torch.randint(0, model.config.vocab_size, (1, P), device=device)
        # dense baseline first (the model is patched below)
        for W in samples:
            row = {"prompt": P, "samples": W}
            # after the first prompt the model is patched: DMS off is the original model (bit-identical)
            off = dms.dms_disabled(model) if hasattr(model, "_dms_state") else contextlib.nullcontext()
            try:
                with torch.no_grad(), off:
                    dc = DynamicCache(config=dense_model.config)
                    dense_model(ids, past_key_values=dc)
                    dc.batch_repeat_interleave(W)
                    tok = torch.randint(0, 100, (W, 1), device=device)
                    pos = torch.full((W, 1), P, device=device)
                    n_before = dc.get_seq_length()

                    def dense_step():
                        dense_model(tok, past_key_values=dc, position_ids=pos)
                        for layer in dc.layers:  # drop the step's token (crop()'s sign differs across versions)
                            layer.keys = layer.keys[..., :n_before, :]
                            layer.values = layer.values[..., :n_before, :]

                    row["dense_ms"] = timeit(dense_step, iters, sync)
                    row["dense_kv_bytes"] = sum(l.keys.numel() + l.values.numel() for l in dc.layers) * dc.layers[0].keys.element_size()
                del dc, dense_step
            except torch.OutOfMemoryError:
                row["dense_ms"] = None
                row["dense_kv_bytes"] = None
            dc = dense_step = None  # the closure holds the cache: drop both before the next size
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
        # DMS
        if not hasattr(model, "_dms_state"):
            dms.retrofit(model, dms.DMSConfig(window=window, attention_impl="eager"))
            for h in [m for n, m in model.named_modules() if n.endswith("dms_retention")]:
                h.to(device)
        calibrate_cr(model, ids, args.cr, window)
        with torch.no_grad():
            base = SharedPrefixDMSCache.from_prompts(model, ids, None, 1)
        L0 = base.layers[0]
        held_frac = float((L0.ppos >= 0).float().mean()) if L0.ppos.numel() else 0.0
        prefix_memory_cr = base.stats()["memory_cr"]  # prompt tokens per token held (window included)
        for row in [r for r in rows if r["prompt"] == P]:
            W = row["samples"]
            tok = torch.randint(0, 100, (W, 1), device=device)
            pos = torch.full((W, 1), P - 1, device=device)

            def fresh(per_sample: bool):
                layers = []
                for l in base.layers:
                    nl = SharedPrefixLayer.__new__(SharedPrefixLayer)
                    nl.__dict__.update(l.__dict__)
                    nl.suffix = None
                    if per_sample:  # W groups of one sample, each with its own copy of the prompt KV
                        nl.samples = 1
                        for name in ("pk", "pv", "ppos", "pevict", "pseen"):
                            setattr(nl, name, getattr(l, name).repeat_interleave(W, 0).contiguous())
                        nl.keys, nl.values = nl.pk, nl.pv
                    else:
                        nl.samples = W
                    layers.append(nl)
                return SharedPrefixDMSCache(layers)

            for kind in ("shared", "per_sample_dms"):
                try:
                    with torch.no_grad():
                        cache = fresh(kind == "per_sample_dms")
                        # static-mode steps (dms.graphs): replayed as one CUDA graph per step with
                        # --cuda-graphs on, else the same code eagerly. The first call is the last prompt
                        # token (the suffix starts); every timed step then appends one more token.
                        step_fn = GraphedDecodeStep(model, cache, horizon=iters + 8, cuda_graph=use_graphs)
                        step_fn(tok, pos)
                        pos2 = pos + 1
                        row[f"{kind}_ms"] = timeit(lambda: step_fn(tok, pos2), iters, sync)
                        if args.profile and cuda and (P, W) == (16384, 64):
                            profile_call(lambda: step_fn(tok, pos2), profile_rows,
                                         dict(what=f"{kind} step", prompt=P, samples=W), top=20)
                        st = cache.stats()
                        row[f"{kind}_prefix_bytes"] = st["prefix_bytes"]
                        # KV bytes one step reads: the pruned prefix (once when shared, W copies otherwise)
                        # plus every sample's suffix
                        row[f"{kind}_kv_read_bytes"] = st["bytes_held"]
                        step_fn.close()
                except torch.OutOfMemoryError:
                    row[f"{kind}_ms"] = None
                cache = step_fn = None
                if cuda:
                    torch.cuda.empty_cache()
            # the prefix attention kernel alone, one layer
            H, Hkv, D = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
            q = torch.randn(W, H, 1, D, device=device, dtype=dtype)
            vis = L0.ppos >= 0
            impl = "triton" if cuda else "reference"
            row["kernel_shared_ms"] = timeit(lambda: prefix_attention(q, L0.pk, L0.pv, vis, D ** -0.5, W, impl=impl),
                                             iters, sync)
            pk, pv, pvis = (t.repeat_interleave(W, 0) for t in (L0.pk, L0.pv, vis))
            row["kernel_per_sample_ms"] = timeit(lambda: prefix_attention(q, pk, pv, pvis, D ** -0.5, 1, impl=impl),
                                                 iters, sync)
            del pk, pv, pvis
            row["prefix_held_fraction"] = held_frac  # of the stored prefix slots, the visible ones
            row["prefix_memory_cr"] = prefix_memory_cr
            # Roofline: a decode step reads every weight but the embedding table, plus the KV. The ratio of
            # bytes read bounds the step speedup a bandwidth-bound implementation can show.
            wb = weight_bytes_read
            if row.get("shared_kv_read_bytes") and row.get("per_sample_dms_kv_read_bytes"):
                row["weight_bytes_read"] = wb
                row["step_bound_speedup_vs_per_sample"] = (wb + row["per_sample_dms_kv_read_bytes"]) / (
                    wb + row["shared_kv_read_bytes"])
                if row.get("dense_kv_bytes"):
                    row["step_bound_speedup_vs_dense"] = (wb + row["dense_kv_bytes"]) / (wb + row["shared_kv_read_bytes"])
            print(json.dumps(row), flush=True)

    def ratio(a, b):
        return None if (a is None or b is None) else a / b

    def pick(P, W):
        return next((r for r in rows if r["prompt"] == P and r["samples"] == W), None)

    key = pick(16384, 64) or rows[-1]
    summary = {
        "speedup_vs_per_sample_w64_16k": ratio(key.get("per_sample_dms_ms"), key.get("shared_ms")),
        "speedup_vs_dense_w64_16k": ratio(key.get("dense_ms"), key.get("shared_ms")),
        "kernel_speedup_vs_per_sample_w64_16k": ratio(key.get("kernel_per_sample_ms"), key.get("kernel_shared_ms")),
        # the most a bandwidth-bound step can gain from reading the prefix once (weights are read either way)
        "step_bound_speedup_vs_per_sample_w64_16k": key.get("step_bound_speedup_vs_per_sample"),
        "step_bound_speedup_vs_dense_w64_16k": key.get("step_bound_speedup_vs_dense"),
        "prefix_memory_cr_16k": key.get("prefix_memory_cr"),
    }
    # Largest W at 32K: weights (all 32 layers of the real model) + W x per-sample KV must fit in memory.
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        n_params_full = 8.03e9
        free = total * 0.95 - n_params_full * 2
        P = max(prompts)
        r = [x for x in rows if x["prompt"] == P]
        per_tok_dense = 2 * 8 * 128 * 2 * 32  # K and V, 8 KV heads, dim 128, bf16, 32 layers
        dense_per_sample = per_tok_dense * P
        prefix_once = dense_per_sample / max(r[0].get("prefix_memory_cr") or 1.0, 1.0) if r else dense_per_sample
        suffix_per_sample = per_tok_dense * (window + 1024)  # window + 1K generated tokens, generous
        summary["max_w_32k_dense"] = int(free // dense_per_sample)
        summary["max_w_32k_dms"] = int((free - prefix_once) // suffix_per_sample)
        summary["max_w_note"] = ("computed for the full 32-layer model from bytes per token: weights 16.1 GB, "
                                 "dense KV per sample P*131072 B, DMS: the pruned prefix once + each sample's "
                                 "window + 1024 generated tokens")
    import transformers
    import triton

    result = {
        "name": "shared_prefix", "rows": rows, "summary": summary, "profile": profile_rows,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__},
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/bench_shared_prefix.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": f"Llama-3-8B layer shapes, {args.layers} layers, random bf16 weights, CR-{args.cr:g} retention pattern",
        "cuda_graphs": use_graphs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n| prompt | W | shared ms | per-sample DMS ms | dense ms | speedup vs per-sample | vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f = lambda x: "OOM" if x is None else f"{x:.2f}"
        print(f"| {r['prompt']} | {r['samples']} | {f(r.get('shared_ms'))} | {f(r.get('per_sample_dms_ms'))} | "
              f"{f(r.get('dense_ms'))} | {f(ratio(r.get('per_sample_dms_ms'), r.get('shared_ms')))} | "
              f"{f(ratio(r.get('dense_ms'), r.get('shared_ms')))} |")
    print(json.dumps(summary, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows, path):
    """Decode-step ms vs W, one panel per prompt length: shared prefix, per-sample DMS copies, dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = sorted({r["prompt"] for r in rows})
    fig, axes = plt.subplots(1, len(prompts), figsize=(4.2 * len(prompts), 3.8), squeeze=False)
    for ax, P in zip(axes[0], prompts):
        rs = sorted((r for r in rows if r["prompt"] == P), key=lambda r: r["samples"])
        W = [r["samples"] for r in rs]
        for key, name in (("shared_ms", "shared prefix (DMS)"), ("per_sample_dms_ms", "per-sample DMS copies"),
                          ("dense_ms", "dense (transformers)")):
            pts = [(w, r.get(key)) for w, r in zip(W, rs) if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("samples W")
        ax.set_ylabel("decode step, ms")
        ax.set_title(f"prompt {P}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
