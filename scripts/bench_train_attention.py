"""Benchmark DMS training attention (forward + backward) on one GPU.

Compares, side by side in one run, at L = 2K..32K with B = tokens // L (same tokens per step):
  ours         fused Triton DMS kernel (dms_kernels.train_attention.dms_attention)
  ours_nomask  the same kernel and tiling without the log_keep term (_has_dms=False)
  sdpa         torch SDPA, causal, enable_gqa (no DMS term)
  flex         FlexAttention (torch.compile) with the same DMS score_mod + causal block mask

TFLOP/s use the causal convention: fwd = 2 * 2 * B * H * L^2 * D / 2, fwd+bwd = 3.5x fwd.
Writes JSON (raw rows + summary + device, versions, date, command) and prints a table.

  python scripts/bench_train_attention.py --out docs/results/train_attention.json
  python scripts/bench_train_attention.py --sweep     # time block-size candidates at L=8192 (ours)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F


def _time(fn, budget_s=0.5, min_reps=3, max_reps=30):
    """Median ms over repetitions timed with CUDA events, after 2 warm-up calls (compilation)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = s.elapsed_time(e)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(est, 1e-3))))
    times = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), (max(times) - min(times)) / 2


def make_inputs(B, H, hkv, L, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(B, hkv, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    v = torch.randn(B, hkv, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    # log(1 - alpha) with alpha = sigmoid(logit): a mix of kept and evicted keys, as in training.
    logit = 4 * torch.randn(B, hkv, L, device="cuda", generator=g)
    lk = F.logsigmoid(-logit).requires_grad_(True)
    do = torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g)
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


def sweep(args):
    """Time each kernel alone for block-size candidates (BLOCK_M,BLOCK_N,warps,stages) at L=8192."""
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

    def cfg(s):
        bm, bn, w, st = (int(x) for x in s.split(","))
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)

    cands = {
        "fwd": ["128,128,8,3", "128,64,8,3", "64,64,4,3"],
        "dkdv": ["32,64,4,3", "32,128,8,3"],
        "dq": ["128,64,8,3", "128,128,8,2", "64,64,4,2"],
    }
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
            try:
                res = []
                for dms, mma in ((True, "1"), (True, "0"), (False, "1")):
                    os.environ["DMS_ATTN_BIAS_MMA"] = mma
                    res.append(_time(lambda: launch[kern](cfg(val), dms), budget_s=0.25)[0])
                os.environ.pop("DMS_ATTN_BIAS_MMA")
                rows.append((kern, val, *res))
                print(f"{kern:5s} {val:12s} {res[0]:9.3f} {res[1]:14.3f} {res[2]:12.3f}   "
                      f"dms/nomask {res[0] / res[2]:.3f}  {mult[kern] * flops_f / res[0] * 1e-9:6.1f} TF/s", flush=True)
            except Exception as exc:  # noqa: BLE001 - report a config that fails to compile/run and go on
                print(f"{kern:5s} {val:12s} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    tf.FWD_CONFIG_OVERRIDE = None
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--tokens", type=int, default=32768, help="B = tokens // L")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--methods", default="ours,ours_nomask,sdpa,flex")
    ap.add_argument("--flex-lengths", default=None, help="lengths at which to run flex (default: all)")
    ap.add_argument("--out", default="docs/results/train_attention.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--pick-fwd", default=None,
                    help="'BM,BN,warps,stages;...': time these forward configs at L=8192 first and run with the fastest")
    ap.add_argument("--pick-out", default=None, help="write the picked forward config here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.sweep:
        sweep(args)
        return
    import triton

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
                torch.cuda.empty_cache()
                continue
            row = dict(L=L, B=B, H=H, Hkv=hkv, D=D, window=args.window, method=name,
                       fwd_ms=round(f_ms, 4), fwd_spread_ms=round(f_sp, 4),
                       fwd_bwd_ms=round(fb_ms, 4), fwd_bwd_spread_ms=round(fb_sp, 4),
                       fwd_tflops=round(flops_f / f_ms * 1e-9, 1), fwd_bwd_tflops=round(3.5 * flops_f / fb_ms * 1e-9, 1))
            rows.append(row)
            print(f"L={L:6d} B={B:3d} {name:12s} fwd {f_ms:8.3f} ms {row['fwd_tflops']:6.1f} TF/s | "
                  f"fwd+bwd {fb_ms:8.3f} ms {row['fwd_bwd_tflops']:6.1f} TF/s", flush=True)
        del q, k, v, lk, do
        torch.cuda.empty_cache()

    def get(L, m):
        for r in rows:
            if r["L"] == L and r["method"] == m and "fwd_bwd_ms" in r:
                return r["fwd_bwd_ms"]
        return None

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b is not None else None

    summary = {f"ratio_vs_sdpa_L{L}": ratio(get(L, "ours"), get(L, "sdpa")) for L in sorted({r["L"] for r in rows})}
    summary["ratio_vs_flex_L8192"] = ratio(get(8192, "ours"), get(8192, "flex"))
    summary["dms_overhead_vs_nomask_L8192"] = ratio(get(8192, "ours"), get(8192, "ours_nomask"))
    summary["note"] = "ratios are fwd+bwd time of ours over the other (lower is better for ours)"
    result = dict(
        name="train_attention", device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(sys.argv), dtype="bfloat16", tokens_per_step=args.tokens,
        env={k: v for k, v in os.environ.items() if k.startswith("DMS_ATTN")},
        flops_convention="causal: fwd 2*B*H*L^2*D, fwd+bwd 3.5x fwd", rows=rows, summary=summary, fwd_config_pick=pick_rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"H={H} Hkv={hkv} D={D} window={args.window} bf16, B*L={args.tokens}; fwd+bwd ms (TFLOP/s)")
    Ls = sorted({r["L"] for r in rows})
    print("| method | " + " | ".join(f"L={L}" for L in Ls) + " |")
    print("|---" * (len(Ls) + 1) + "|")
    for m in names:
        cells = []
        for L in Ls:
            r = next((r for r in rows if r["L"] == L and r["method"] == m), None)
            cells.append("n/a" if r is None or "fwd_bwd_ms" not in r else f"{r['fwd_bwd_ms']:.2f} ({r['fwd_bwd_tflops']:.0f})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
