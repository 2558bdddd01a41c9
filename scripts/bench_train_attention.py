"""Benchmark DMS training attention on one GPU: the kernel alone, and a full retrofit training step.

Section ``kernels`` compares, side by side in one run, at L = 2K..32K with B = tokens // L (same tokens
per step), forward and forward + backward of:
  ours         fused Triton DMS kernel (dms_kernels.train_attention.dms_attention)
  ours_nomask  the same kernel and tiling without the log_keep term (_has_dms=False)
  sdpa         torch SDPA, causal, enable_gqa (no DMS term)
  flex         FlexAttention (torch.compile) with the same DMS score_mod + causal block mask

TFLOP/s use the causal convention: fwd = 2 * 2 * B * H * L^2 * D / 2, fwd+bwd = 3.5x fwd.

Section ``step`` times one full DMS retrofit training step (teacher forward without grad, student
forward, backward, gradient clipping, AdamW step) through the library's own training code
(dms.training.loop: prepare_student + DistillationModule, as train/retrofit.py runs it) for a model with
Qwen3-0.6B's shapes (random bf16 weights from Qwen3Config), L=8192, batch 1, window 256, once per
training-attention kernel of the registry (dms.attention.TRAIN_KERNELS: triton = ours, flex, eager),
selected through ``dms.attention_impl`` exactly as a recipe selects it. Gradient checkpointing off.

Writes JSON (raw rows + summary + device, versions, date, command) and prints tables. Summary ratios
are time(ours) / time(other): lower is better for ours (< 1: ours faster).

  python scripts/bench_train_attention.py --out docs/results/train_attention.json      # both sections
  python scripts/bench_train_attention.py --sections step --merge docs/results/train_attention.json \
      --out OUT.json          # step section only; kernel rows and summary keys kept from the merged file
  python scripts/bench_train_attention.py --sweep [--sweep-cands ...] [--sweep-out S.json]
                                                      # time block-size candidates at L=8192 (ours)
  TRITON_INTERPRET=1 python scripts/bench_train_attention.py --smoke --out /tmp/t.json   # CPU, seconds
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SECTIONS = ("kernels", "step")
KERNEL_METHODS = ("ours", "ours_nomask", "sdpa", "flex")
SUMMARY_LENGTHS = (2048, 4096, 8192, 16384, 32768)
STEP_OURS = "triton"  # the registry name of our kernel in the step section
RATIO_NOTE = ("ratios are time of ours over the other (lower is better for ours, < 1 means ours is faster): "
              "ratio_vs_* and dms_overhead_* use kernel fwd+bwd ms; retrofit_step_ratio_vs_* use full retrofit "
              "step ms (ours = registry kernel 'triton'); retrofit_step_speedup_vs_flex = flex_step_ms / ours_step_ms "
              "(> 1 means ours is faster)")

# Timing knobs of the kernel section; --smoke lowers them (CPU, interpreter).
TIMING = dict(warmup=2, budget_s=0.5, min_reps=3, max_reps=30)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync():
    if _cuda():
        torch.cuda.synchronize()


class _StepTimer:
    """Wall time of one call in ms: CUDA events on a GPU, perf_counter on CPU (smoke runs)."""

    def __init__(self):
        if _cuda():
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, fn) -> float:
        if _cuda():
            self.s.record()
            fn()
            self.e.record()
            torch.cuda.synchronize()
            return self.s.elapsed_time(self.e)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)


def _time(fn, budget_s=None, min_reps=None, max_reps=None, warmup=None):
    """Median ms over repetitions (CUDA events on a GPU), after warm-up calls (compilation)."""
    budget_s = TIMING["budget_s"] if budget_s is None else budget_s
    min_reps = TIMING["min_reps"] if min_reps is None else min_reps
    max_reps = TIMING["max_reps"] if max_reps is None else max_reps
    warmup = TIMING["warmup"] if warmup is None else warmup
    for _ in range(warmup):
        fn()
    _sync()
    timer = _StepTimer()
    est = timer(fn)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(est, 1e-3))))
    times = [timer(fn) for _ in range(reps)]
    return statistics.median(times), (max(times) - min(times)) / 2


def make_inputs(B, H, hkv, L, D, dtype, seed=0, device=None):
    device = device or ("cuda" if _cuda() else "cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(B, hkv, L, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    v = torch.randn(B, hkv, L, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    # log(1 - alpha) with alpha = sigmoid(logit): a mix of kept and evicted keys, as in training.
    logit = 4 * torch.randn(B, hkv, L, device=device, generator=g)
    lk = F.logsigmoid(-logit).requires_grad_(True)
    do = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g)
    return q, k, v, lk, do


def methods(window):
    from dms_kernels.train_attention import dms_attention, dms_attention_flex

    def ours(q, k, v, lk):
        return dms_attention(q, k, v, lk, window)[0]

    def ours_nomask(q, k, v, lk):
        return dms_attention(q, k, v, lk, window, _has_dms=False)[0]

    def sdpa(q, k, v, lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    def flex(q, k, v, lk):
        return dms_attention_flex(q, k, v, lk, window)[0]

    return {"ours": ours, "ours_nomask": ours_nomask, "sdpa": sdpa, "flex": flex}


def bench_one(fn, q, k, v, lk, do):
    leaves = (q, k, v, lk)

    def fwd():
        with torch.no_grad():
            fn(q, k, v, lk)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        fn(q, k, v, lk).backward(do)

    f_ms, f_spread = _time(fwd)
    fb_ms, fb_spread = _time(fwd_bwd)
    return f_ms, f_spread, fb_ms, fb_spread


SWEEP_DEFAULT_CANDS = {
    "fwd": ["128,128,8,3", "128,64,8,3", "64,64,4,3"],
    "dkdv": ["32,64,4,3", "32,128,8,3"],
    "dq": ["128,64,8,3", "128,128,8,2", "64,64,4,2"],
}


def parse_sweep_config(s: str) -> dict:
    """``"BLOCK_M,BLOCK_N,warps,stages[,t|p[,s|r]]"`` -> launch config: ``t`` / ``p`` force tensor-descriptor (TMA) or
    pointer loads; for dK/dV ``s`` sums d log_keep per tile, ``r`` reduces it per query tile."""
    parts = [x.strip() for x in s.split(",")]
    if len(parts) < 4 or len(parts) > 6 or not all(x.isdigit() for x in parts[:4]) \
            or (len(parts) > 4 and parts[4] not in ("t", "p")) or (len(parts) > 5 and parts[5] not in ("s", "r")):
        raise ValueError(f"sweep candidate {s!r}: expected BLOCK_M,BLOCK_N,warps,stages[,t|p[,s|r]], e.g. 128,64,8,3,t")
    bm, bn, w, st = (int(x) for x in parts[:4])
    c = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    if len(parts) > 4:
        c["tma"] = parts[4] == "t"
    if len(parts) > 5:
        c["dlk_tile"] = parts[5] == "s"
    return c


def parse_sweep_cands(spec: str | None) -> dict:
    """``"fwd=c1;c2|dkdv=...|dq=..."`` -> ``{kernel: [candidate, ...]}`` (each checked by :func:`parse_sweep_config`);
    None -> :data:`SWEEP_DEFAULT_CANDS`."""
    if not spec:
        return {k: list(v) for k, v in SWEEP_DEFAULT_CANDS.items()}
    cands = {}
    for part in spec.split("|"):
        kern, sep, vals = part.partition("=")
        kern = kern.strip()
        if not sep or kern not in SWEEP_DEFAULT_CANDS:
            raise ValueError(f"--sweep-cands part {part!r}: expected KERNEL=c1;c2 with KERNEL in "
                             f"{sorted(SWEEP_DEFAULT_CANDS)}")
        cands[kern] = [x.strip() for x in vals.split(";") if x.strip()]
        for c in cands[kern]:
            parse_sweep_config(c)
    return cands


def sweep(args):
    """Time each kernel alone for block-size candidates (BLOCK_M,BLOCK_N,warps,stages) at L=8192."""
    cands = parse_sweep_cands(args.sweep_cands)  # bad specs fail before any GPU work
    from dms_kernels.train_attention import triton_bwd as tb
    from dms_kernels.train_attention import triton_fwd as tf

    L = 8192
    B = max(1, args.tokens // L)
    q, k, v, lk, do = make_inputs(B, args.heads, args.kv_heads, L, args.head_dim, torch.bfloat16)
    q, k, v, lk = (x.detach() for x in (q, k, v, lk))
    scale, W = args.head_dim ** -0.5, args.window
    tf.FWD_CONFIG_OVERRIDE = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    o, lse = tf.dms_attention_fwd(q, k, v, lk, W, None, scale)
    tf.FWD_CONFIG_OVERRIDE = None
    delta = (o.float() * do.float()).sum(-1)
    dq, dk, dv, dlk = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lk)
    flops_f = 2 * 2 * B * args.heads * L * L * args.head_dim / 2

    cfg = parse_sweep_config
    launch = {
        "fwd": lambda c, dms: (setattr(tf, "FWD_CONFIG_OVERRIDE", c), tf.dms_attention_fwd(q, k, v, lk, W, None, scale, dms)),
        "dkdv": lambda c, dms: tb.launch_dkdv(q, k, v, lk, do, lse, delta, dk, dv, dlk, W, None, scale, dms, c),
        "dq": lambda c, dms: tb.launch_dq(q, k, v, lk, do, lse, delta, dq, W, None, scale, dms, c),
    }
    mult = {"fwd": 1.0, "dkdv": 4 / 2, "dq": 3 / 2}  # matmuls per tile over the forward's 2
    rows = []
    print("kernel config        dms(mma bias)  dms(elementwise)  nomask   [ms, L=8192]", flush=True)
    for kern, vals in cands.items():
        for val in vals:
            res = []
            for dms, mma in ((True, "1"), (True, "0"), (False, "1")):
                # the dK/dV kernel's matmul bias has its own switch (off by default): on in the mma column
                os.environ["DMS_ATTN_BIAS_MMA"] = os.environ["DMS_ATTN_DKDV_BIAS_MMA"] = mma
                try:
                    res.append(_time(lambda: launch[kern](cfg(val), dms), budget_s=0.25)[0])
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile/run: report, go on
                    print(f"{kern:5s} {val:14s} dms={dms} mma={mma} failed: {type(exc).__name__}: {str(exc)[:100]}",
                          flush=True)
                    res.append(float("nan"))
            os.environ.pop("DMS_ATTN_BIAS_MMA")
            os.environ.pop("DMS_ATTN_DKDV_BIAS_MMA")
            rows.append((kern, val, *res))
            best = min((x for x in res[:2] if x == x), default=float("nan"))
            print(f"{kern:5s} {val:14s} {res[0]:9.3f} {res[1]:14.3f} {res[2]:12.3f}   "
                  f"dms/nomask {best / res[2]:.3f}  {mult[kern] * flops_f / best * 1e-9:6.1f} TF/s", flush=True)
    tf.FWD_CONFIG_OVERRIDE = None
    return rows



# --------------------------------------------------------------------------------------------------
# Section "kernels": the attention kernel alone
# --------------------------------------------------------------------------------------------------
def run_kernels(args) -> tuple[list, list]:
    fns = methods(args.window)
    names = args.methods.split(",")
    pick_rows = []
    if args.pick_fwd:
        L = 8192
        B = max(1, args.tokens // L)
        q, k, v, lk, do = make_inputs(B, args.heads, args.kv_heads, L, args.head_dim, torch.bfloat16)
        best = None
        for c in args.pick_fwd.split(";"):
            os.environ["DMS_ATTN_FWD_CFG"] = c
            try:
                with torch.no_grad():
                    t_dms = _time(lambda: fns["ours"](q, k, v, lk))[0]
                    t_nomask = _time(lambda: fns["ours_nomask"](q, k, v, lk))[0]
            except Exception as exc:  # noqa: BLE001
                print(f"fwd config {c}: failed {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            pick_rows.append(dict(fwd_cfg=c, L=L, fwd_ms_dms=round(t_dms, 4), fwd_ms_nomask=round(t_nomask, 4)))
            print(f"fwd config {c:12s} L={L}: dms {t_dms:.3f} ms, nomask {t_nomask:.3f} ms, "
                  f"ratio {t_dms / t_nomask:.3f}", flush=True)
            if best is None or t_dms < best[0]:
                best = (t_dms, c)
        if best is None:  # every candidate failed: run with the code default
            os.environ.pop("DMS_ATTN_FWD_CFG", None)
            print("no --pick-fwd config ran; using the code default", flush=True)
        else:
            os.environ["DMS_ATTN_FWD_CFG"] = best[1]
            print(f"PICKED_FWD_CFG={best[1]}", flush=True)
            if args.pick_out:
                with open(args.pick_out, "w") as f:
                    f.write(best[1])
        del q, k, v, lk, do
    H, hkv, D = args.heads, args.kv_heads, args.head_dim
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        B = max(1, args.tokens // L)
        q, k, v, lk, do = make_inputs(B, H, hkv, L, D, torch.bfloat16)
        flops_f = 2 * 2 * B * H * L * L * D / 2
        for name in names:
            if name == "flex" and args.flex_lengths and str(L) not in args.flex_lengths.split(","):
                continue
            try:
                f_ms, f_sp, fb_ms, fb_sp = bench_one(fns[name], q, k, v, lk, do)
            except Exception as exc:  # noqa: BLE001 - e.g. OOM for one method; record and continue
                print(f"L={L} {name}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                rows.append(dict(L=L, B=B, method=name, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                _empty_cache()
                continue
            row = dict(L=L, B=B, H=H, Hkv=hkv, D=D, window=args.window, method=name,
                       fwd_ms=round(f_ms, 4), fwd_spread_ms=round(f_sp, 4),
                       fwd_bwd_ms=round(fb_ms, 4), fwd_bwd_spread_ms=round(fb_sp, 4),
                       fwd_tflops=round(flops_f / f_ms * 1e-9, 1), fwd_bwd_tflops=round(3.5 * flops_f / fb_ms * 1e-9, 1))
            rows.append(row)
            print(f"L={L:6d} B={B:3d} {name:12s} fwd {f_ms:8.3f} ms {row['fwd_tflops']:6.1f} TF/s | "
                  f"fwd+bwd {fb_ms:8.3f} ms {row['fwd_bwd_tflops']:6.1f} TF/s", flush=True)
        del q, k, v, lk, do
        _empty_cache()
    return rows, pick_rows


def _empty_cache():
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Section "step": one full DMS retrofit training step per registry kernel
# --------------------------------------------------------------------------------------------------
TINY_STEP_MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def step_model_config(args):
    from transformers import Qwen3Config

    if args.smoke:
        shapes = dict(TINY_STEP_MODEL)
    else:
        from dms.training.bench import QWEN3_0P6B

        shapes = dict(QWEN3_0P6B)
        shapes["max_position_embeddings"] = max(shapes["max_position_embeddings"], args.step_seq_len)
    if args.step_layers is not None:
        shapes["num_hidden_layers"] = args.step_layers
    return Qwen3Config(**shapes, eos_token_id=1, pad_token_id=1, bos_token_id=1)


def _eager_estimate_gib(hf_cfg, B, T) -> float:
    """Activation memory the reference keeps for backward: ~2 [B, H, T, T] tensors per layer (logsumexp
    input, softmax probabilities; counted as fp32) plus ~2 transient ones; weights and the rest not counted."""
    per = B * hf_cfg.num_attention_heads * T * T * 4
    return (2 * hf_cfg.num_hidden_layers + 2) * per / 2**30


def _kernel_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _dynamo_graphs() -> int:
    utils = sys.modules.get("torch._dynamo.utils")  # only loaded once something was compiled
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


def _flex_block_mask_ms(docs) -> float | None:
    """ms of one create_block_mask call as dms_attention_flex makes it for these documents (per layer)."""
    from dms_kernels.train_attention import flex as fx

    B, T = docs.shape
    return round(_time(lambda: fx._block_mask(docs, B, T, docs.device), budget_s=0.2, min_reps=3, max_reps=10,
                       warmup=1)[0], 3)


def time_retrofit_step(impl: str, hf_cfg, args, ids, docs) -> dict:
    """Build the model, retrofit it the way dms.training does with ``attention_impl=impl``, time steps."""
    from transformers import AutoModelForCausalLM

    from dms.attention import TRAIN_KERNELS, get_train_kernel, register_train_kernel
    from dms.schedule import CRSchedule
    from dms.stats import decision_stats
    from dms.training.config import RetrofitConfig
    from dms.training.loop import DistillationModule, prepare_student

    dev = ids.device
    T = ids.shape[1]
    cfg = RetrofitConfig.from_dict({
        "model": {"dtype": "bfloat16", "gradient_checkpointing": False},
        "data": {"seq_len": T},
        "dms": {"window": args.window, "attention_impl": impl},
        "train": {"trainable": args.step_trainable, "mixed_precision": args.step_mixed_precision,
                  "batch_size": ids.shape[0], "grad_accum": 1},
    })
    t = cfg.train
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    model, teacher, params, lora = prepare_student(cfg, model)
    module = DistillationModule(model, teacher, t.kl_chunk, t.kl_direction, lora).to(dev)
    module.train()
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    schedule = CRSchedule(t.cr, t.cr_warmup_steps)
    # accelerate's mixed precision wraps the module's forward in autocast; loss sum and backward outside
    amp = t.mixed_precision == "bf16"
    n_step = [0]

    def step():
        target = schedule.target_fraction(n_step[0])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            kl, comp, frac, records = module(ids, docs, target)
        loss = kl + t.compression_weight * comp
        loss.backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decision_stats(records)  # the loop's per-step statistics and loss read-back (host syncs)
        float(loss.detach())
        n_step[0] += 1

    # First warm-up step through a counting wrapper in the registry: proves which kernel the student ran.
    kernel = get_train_kernel(impl, dev)
    registered = TRAIN_KERNELS[impl]
    stand_in = None
    if impl == "flex" and dev.type == "cpu":  # smoke on CPU only: FlexAttention has no CPU backward
        kernel = get_train_kernel("eager", dev)
        stand_in = ("CPU smoke run: FlexAttention has no backward on CPU, so this row ran the eager fp32 "
                    "reference in flex's place (plumbing check only, not a flex timing)")
    calls = [0]

    def counted(*a, **kw):
        calls[0] += 1
        return kernel(*a, **kw)

    register_train_kernel(impl, counted)
    try:
        step()
        register_train_kernel(impl, kernel if stand_in else registered)
        _sync()
        for _ in range(args.step_warmup - 1):
            step()
        _sync()
        if _cuda():
            torch.cuda.reset_peak_memory_stats()
        graphs0 = _dynamo_graphs()
        timer = _StepTimer()
        times = [timer(step) for _ in range(args.step_steps)]
        recompiled = _dynamo_graphs() - graphs0
    finally:
        register_train_kernel(impl, registered)
    row = dict(
        method=impl, attention_impl=impl, attention_ran=_kernel_name(kernel), kernel_calls_per_step=calls[0],
        teacher_attention="dms.attention:dense_attention (SDPA, DMS off)",
        step_ms=round(statistics.median(times), 3), step_min_ms=round(min(times), 3),
        step_max_ms=round(max(times), 3), step_times_ms=[round(x, 3) for x in times],
        tokens_per_s=round(ids.numel() / (statistics.median(times) / 1e3), 1),
        n_trainable_params=sum(p.numel() for p in params),
        dynamo_graphs_compiled_while_timed=recompiled,  # 0 expected: nothing recompiles in the timed steps
    )
    if stand_in:
        row["stand_in"] = stand_in
    if _cuda():
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    else:
        row["peak_mem_gib"] = None
    del module, model, teacher, opt, params
    return row


def run_step(args) -> dict:
    dev = torch.device("cuda" if _cuda() else "cpu")
    hf_cfg = step_model_config(args)
    B, T = args.step_batch, args.step_seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, hf_cfg.vocab_size, (B, T), generator=g).to(dev)
    # packed documents as the data pipeline makes them ([B, T] int32 from 0); the loop always passes them
    n_docs = max(1, args.step_docs)
    docs = (torch.arange(T) * n_docs // T).to(torch.int32).expand(B, T).contiguous().to(dev)
    rows = []
    mask_ms = None
    if "flex" in args.step_methods.split(",") and _cuda():
        try:
            mask_ms = _flex_block_mask_ms(docs)
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            print(f"flex block mask timing failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    for impl in args.step_methods.split(","):
        if impl == "eager" and _cuda():
            need = _eager_estimate_gib(hf_cfg, B, T)
            free = torch.cuda.mem_get_info()[0] / 2**30
            if need > 0.9 * free:
                reason = (f"skipped: the reference keeps ~{need:.0f} GiB of [B, H, T, T] attention tensors for "
                          f"backward ({hf_cfg.num_hidden_layers} layers, T={T}); {free:.0f} GiB free")
                print(f"step {impl}: {reason}", flush=True)
                rows.append(dict(method=impl, attention_impl=impl, skipped=reason))
                continue
        try:
            row = time_retrofit_step(impl, hf_cfg, args, ids, docs)
        except Exception as exc:  # noqa: BLE001 - e.g. OOM or compile failure for one kernel: record, go on
            row = dict(method=impl, attention_impl=impl, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            print(f"step {impl}: failed {row['error']}", flush=True)
        else:
            print(f"step {impl:7s} {row['step_ms']:9.2f} ms/step (min {row['step_min_ms']:.2f}, max "
                  f"{row['step_max_ms']:.2f})  peak {row['peak_mem_gib']} GiB  ran {row['attention_ran']} "
                  f"x{row['kernel_calls_per_step']}", flush=True)
        rows.append(row)
        _empty_cache()
    model_desc = {k: getattr(hf_cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim", "intermediate_size",
                                                   "vocab_size", "tie_word_embeddings")}
    notes = [
        "one optimizer step of dms.training.loop (what train/retrofit.py runs): DistillationModule forward "
        "(teacher = same model with DMS off under no_grad, dense SDPA attention; student with DMS through the "
        "registry kernel named by dms.attention_impl) under bf16 autocast as accelerate's mixed precision "
        "applies it, chunked KL + compression loss, backward, clip_grad_norm_(1.0), AdamW step, zero_grad, "
        "decision statistics and loss read-back; one process, no accelerate wrapper",
        f"model: Qwen3Config with {'tiny smoke' if args.smoke else 'Qwen3-0.6B'} shapes, "
        f"{hf_cfg.num_hidden_layers} layers, random bf16 weights (from config, no hub), adapter heads fp32",
        f"batch {B} x seq_len {T}, window {args.window}, {n_docs} packed document(s) per row, "
        f"trainable={args.step_trainable}, gradient checkpointing off",
        f"timing: {args.step_warmup} warm-up steps (the first also counts the kernel calls), then the median of "
        f"{args.step_steps} steps, each timed with {'CUDA events' if _cuda() else 'perf_counter'}; peak memory "
        "= torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state included)",
        "flex: the library's dms_attention_flex builds the document block mask (create_block_mask) on every "
        "call, i.e. once per layer and step, as in training (config.flex_block_mask_ms_per_step: that cost alone, "
        "timed separately); its torch.compile happens in the warm-up steps",
        "eager (the reference implementation; under autocast its matmuls run in bf16) materialises [B, H, T, T] "
        "scores per layer; it is skipped when its estimated memory does not fit (see its row)",
    ]
    return dict(config=dict(model=model_desc, batch=B, seq_len=T, window=args.window, docs_per_row=n_docs,
                            trainable=args.step_trainable, mixed_precision=args.step_mixed_precision,
                            gradient_checkpointing=False, warmup_steps=args.step_warmup, timed_steps=args.step_steps,
                            smoke=bool(args.smoke), flex_block_mask_ms_per_call=mask_ms,
                            flex_block_mask_ms_per_step=None if mask_ms is None
                            else round(mask_ms * hf_cfg.num_hidden_layers, 3)),
                rows=rows, notes=notes)


# --------------------------------------------------------------------------------------------------
# Summary, output
# --------------------------------------------------------------------------------------------------
def _ratio(a, b):
    return round(a / b, 3) if a is not None and b is not None and b > 0 else None


def summarize(kernel_rows: list, step_rows: list) -> dict:
    """Every key is always present; a measurement that did not run (subset of methods/lengths,
    section not run, failure, skipped) gives null."""
    def fb(L, m):
        for r in kernel_rows:
            if r.get("L") == L and r.get("method") == m and "fwd_bwd_ms" in r:
                return r["fwd_bwd_ms"]
        return None

    def st(m):
        for r in step_rows:
            if r.get("method") == m and "step_ms" in r:
                return r["step_ms"]
        return None

    lengths = sorted(set(SUMMARY_LENGTHS) | {r["L"] for r in kernel_rows if "L" in r})
    summary = {f"ratio_vs_sdpa_L{L}": _ratio(fb(L, "ours"), fb(L, "sdpa")) for L in lengths}
    summary["ratio_vs_flex_L8192"] = _ratio(fb(8192, "ours"), fb(8192, "flex"))
    summary["dms_overhead_vs_nomask_L8192"] = _ratio(fb(8192, "ours"), fb(8192, "ours_nomask"))
    summary["retrofit_step_ratio_vs_flex"] = _ratio(st(STEP_OURS), st("flex"))
    summary["retrofit_step_speedup_vs_flex"] = _ratio(st("flex"), st(STEP_OURS))
    summary["retrofit_step_ratio_vs_eager"] = _ratio(st(STEP_OURS), st("eager"))
    summary["retrofit_step_ms_ours"] = st(STEP_OURS)
    summary["retrofit_step_ms_flex"] = st("flex")
    summary["retrofit_step_ms_eager"] = st("eager")
    summary["note"] = RATIO_NOTE
    return summary


def _print_kernel_table(rows, names, args):
    Ls = sorted({r["L"] for r in rows})
    if not Ls:
        return
    print(f"\nH={args.heads} Hkv={args.kv_heads} D={args.head_dim} window={args.window} bf16, "
          f"B*L={args.tokens}; fwd+bwd ms (TFLOP/s)")
    print("| method | " + " | ".join(f"L={L}" for L in Ls) + " |")
    print("|---" * (len(Ls) + 1) + "|")
    for m in names:
        cells = []
        for L in Ls:
            r = next((r for r in rows if r["L"] == L and r["method"] == m), None)
            cells.append("n/a" if r is None or "fwd_bwd_ms" not in r else f"{r['fwd_bwd_ms']:.2f} ({r['fwd_bwd_tflops']:.0f})")
        print(f"| {m} | " + " | ".join(cells) + " |")


def _print_step_table(step):
    if not step or not step.get("rows"):
        return
    c = step["config"]
    print(f"\nretrofit step: {c['model']['num_hidden_layers']} layers, B={c['batch']} L={c['seq_len']} "
          f"window={c['window']} trainable={c['trainable']}")
    print("| attention | step ms (median) | peak GiB | kernel that ran |")
    print("|---|---|---|---|")
    for r in step["rows"]:
        if "step_ms" in r:
            print(f"| {r['method']} | {r['step_ms']:.2f} | {r['peak_mem_gib']} | {r['attention_ran']} |")
        else:
            print(f"| {r['method']} | {r.get('skipped') or r.get('error')} | | |")


def _resolve_args(args):
    """Fill defaults that depend on --smoke (tiny shapes, CPU-friendly timing)."""
    smoke = args.smoke
    dflt = dict(lengths="64" if smoke else ",".join(str(L) for L in SUMMARY_LENGTHS),
                tokens=128 if smoke else 32768, heads=4 if smoke else 32, kv_heads=2 if smoke else 8,
                head_dim=16 if smoke else 128, window=8 if smoke else 256,
                step_seq_len=64 if smoke else 8192, step_warmup=1 if smoke else 3, step_steps=2 if smoke else 10,
                out="runs/bench/train_attention_smoke.json" if smoke else "docs/results/train_attention.json")
    for k, v in dflt.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.step_only:
        args.sections = "step"
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise SystemExit(f"--sections: unknown {bad}; choose from {','.join(SECTIONS)}")
    args.section_list = sections
    bad = [m for m in args.methods.split(",") if m not in KERNEL_METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {','.join(KERNEL_METHODS)}")
    from dms.attention import TRAIN_KERNELS

    bad = [m for m in args.step_methods.split(",") if m not in TRAIN_KERNELS]
    if bad:
        raise SystemExit(f"--step-methods: unknown {bad}; registered training kernels: {sorted(TRAIN_KERNELS)}")
    if args.step_warmup < 1 or args.step_steps < 1:
        raise SystemExit("--step-warmup and --step-steps must be >= 1")
    if smoke:
        TIMING.update(warmup=0, budget_s=0.0, min_reps=1, max_reps=1)
    return args


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="kernels,step", help="comma list of: kernels, step (default both)")
    ap.add_argument("--step-only", action="store_true", help="same as --sections step")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (kernels L=64; step: 2-layer tiny Qwen3, L=64), 1-2 reps: runs on CPU under "
                         "TRITON_INTERPRET=1 in seconds; default --out runs/bench/train_attention_smoke.json")
    ap.add_argument("--merge", default=None,
                    help="results JSON whose data for the sections not run now is kept (rows, step, picks); "
                         "the summary is recomputed over both")
    # section kernels
    ap.add_argument("--lengths", default=None, help="default 2048,4096,8192,16384,32768")
    ap.add_argument("--tokens", type=int, default=None, help="B = tokens // L (default 32768)")
    ap.add_argument("--heads", type=int, default=None, help="default 32")
    ap.add_argument("--kv-heads", type=int, default=None, help="default 8")
    ap.add_argument("--head-dim", type=int, default=None, help="default 128")
    ap.add_argument("--window", type=int, default=None, help="DMS window, both sections (default 256)")
    ap.add_argument("--methods", default=",".join(KERNEL_METHODS))
    ap.add_argument("--flex-lengths", default=None, help="lengths at which to run flex (default: all)")
    ap.add_argument("--out", default=None, help="default docs/results/train_attention.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-out", default=None, help="with --sweep: also write the timings to this JSON file")
    ap.add_argument("--sweep-cands", default=None,
                    help='with --sweep: candidates as "fwd=BM,BN,warps,stages[,t|p];...|dkdv=...[,t|p[,s|r]]|dq=..." '
                         "(t: TMA loads, p: pointer loads, omitted: the default for the device; dkdv's s|r: "
                         "d log_keep summed per tile or reduced per query tile)")
    ap.add_argument("--pick-fwd", default=None,
                    help="'BM,BN,warps,stages;...': time these forward configs at L=8192 first and run with the fastest")
    ap.add_argument("--pick-out", default=None, help="write the picked forward config here")
    # section step
    ap.add_argument("--step-methods", default="triton,flex,eager",
                    help="registry kernels (dms.attention.TRAIN_KERNELS) to time; eager is skipped when its "
                         "estimated memory does not fit")
    ap.add_argument("--step-seq-len", type=int, default=None, help="default 8192")
    ap.add_argument("--step-batch", type=int, default=1)
    ap.add_argument("--step-layers", type=int, default=None, help="decoder layers (default: all 28 of Qwen3-0.6B)")
    ap.add_argument("--step-docs", type=int, default=1, help="packed documents per row (equal lengths)")
    ap.add_argument("--step-trainable", default="adapter", choices=("adapter", "full"))
    ap.add_argument("--step-mixed-precision", default="bf16", choices=("bf16", "no"))
    ap.add_argument("--step-warmup", type=int, default=None, help="warm-up steps (default 3; compilation)")
    ap.add_argument("--step-steps", type=int, default=None, help="timed steps, median reported (default 10)")
    return ap


def _raise_recompile_limit(limit: int = 64):
    """FlexAttention is compiled with dynamic=False: one dynamo cache entry per (shape, grad mode). The kernel
    section alone needs 2 per length (10 at the default 5 lengths) and the step section more, past dynamo's
    default limit of 8, after which flex would fall back to running uncompiled (unfused, T x T scores). A
    benchmark-only setting."""
    if not _cuda():
        return None
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the first is the newer name
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), limit))
            return int(getattr(cfg, name))
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not _cuda():
        if not args.smoke:
            sys.exit("needs a CUDA GPU (or --smoke, which runs on CPU under TRITON_INTERPRET=1)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the kernels below)
    args = _resolve_args(args)
    if args.sweep:
        if not _cuda():
            sys.exit("--sweep needs a CUDA GPU")
        rows = sweep(args)
        if args.sweep_out:
            import triton

            doc = dict(name="train_attention_sweep", device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__,
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       command="python " + " ".join(sys.argv if argv is None else
                                                    ["scripts/bench_train_attention.py", *argv]),
                       L=8192, columns=["kernel", "config", "ms_dms_matmul_bias", "ms_dms_elementwise_bias",
                                        "ms_no_dms_term"],
                       rows=[[k, c, *(None if x != x else round(x, 4) for x in r)] for k, c, *r in rows])
            os.makedirs(os.path.dirname(os.path.abspath(args.sweep_out)), exist_ok=True)
            with open(args.sweep_out, "w") as f:
                json.dump(doc, f, indent=1)
            print(f"wrote {args.sweep_out}")
        return
    import triton

    recompile_limit = _raise_recompile_limit()
    kernel_rows, pick_rows, step = [], [], None
    merged = None
    if args.merge:
        with open(args.merge) as f:
            old = json.load(f)
        kept = []
        if "kernels" not in args.section_list and old.get("rows"):
            kernel_rows, pick_rows = old.get("rows") or [], old.get("fwd_config_pick") or []
            kept.append("kernels")
        if "step" not in args.section_list and old.get("step"):
            step = old["step"]
            kept.append("step")
        merged = dict(path=args.merge, sections=kept,
                      **{k: old.get(k) for k in ("device", "torch", "triton", "date", "command", "env")})
    command = "python " + " ".join(sys.argv if argv is None else ["scripts/bench_train_attention.py", *argv])
    done = []

    def write() -> dict:
        """(Re)write the JSON after each section: a run cut short keeps what it finished."""
        result = dict(
            name="train_attention", device=torch.cuda.get_device_name() if _cuda() else "cpu",
            torch=torch.__version__, triton=triton.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=command, sections=args.section_list, sections_done=list(done),
            complete=len(done) == len(args.section_list), dtype="bfloat16", tokens_per_step=args.tokens,
            env={k: v for k, v in os.environ.items() if k.startswith("DMS_ATTN") or k == "TRITON_INTERPRET"},
            dynamo_recompile_limit=recompile_limit,
            flops_convention="causal: fwd 2*B*H*L^2*D, fwd+bwd 3.5x fwd", rows=kernel_rows,
            summary=summarize(kernel_rows, (step or {}).get("rows") or []), fwd_config_pick=pick_rows, step=step,
        )
        if merged is not None:
            result["merged_from"] = merged
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
        return result

    if "kernels" in args.section_list:
        kernel_rows, pick_rows = run_kernels(args)
        done.append("kernels")
        write()
    if "step" in args.section_list:
        step = run_step(args)
        done.append("step")
    result = write()
    summary = result["summary"]

    print(f"\n{result['device']}  torch {torch.__version__}  triton {triton.__version__}")
    if "kernels" in args.section_list:
        _print_kernel_table(kernel_rows, args.methods.split(","), args)
    if "step" in args.section_list:
        _print_step_table(step)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
