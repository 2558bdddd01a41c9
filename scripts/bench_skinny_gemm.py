#!/usr/bin/env python3
"""Decode-step projections (few rows x a large weight): the fused Triton kernels vs cuBLAS, and a config sweep.

A decode step of a batch of at most 16 sequences multiplies a few rows by every weight once, so each projection
is bound by the bytes of its weight. ``dms.decode_fusion`` runs them as ``grouped_linear`` (q/k/v in one launch,
o_proj / down_proj with the residual add in the epilogue) and ``gate_up_silu``
(``dms_kernels.fused_ops.triton_ops``). This script times each at Llama-3-8B's shapes and reports the fraction
of the measured device copy bandwidth, for the default launch config (``_skinny_cfg``), cuBLAS (``F.linear``)
and, with ``--sweep``, every (BLOCK_N, BLOCK_K, warps, stages) of a grid.

Timing: CUDA-graph replays of back-to-back calls that cycle through enough copies of the weights to exceed the
L2 cache several times, so that a weight is read from DRAM as in a real step (one layer's weights never stay
in L2 until the next step).

    python scripts/bench_skinny_gemm.py --sweep --out docs/results/skinny_gemm.json
    python scripts/bench_skinny_gemm.py --smoke --out /tmp/skinny.json          # CPU, TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from pathlib import Path

import torch

GRID = dict(bn=(16, 32, 64), bk=(64, 128, 256), warps=(2, 4, 8), stages=(3, 4, 6))


def shapes(smoke: bool):
    """name -> (K, [N per weight], kind): kind 'grouped' (grouped_linear), 'residual' (one weight + residual add)
    or 'gate_up' (gate_up_silu)."""
    if smoke:
        return {"qkv": (64, [64, 16, 16], "grouped"), "o_proj+res": (64, [64], "residual"),
                "gate_up": (64, [96, 96], "gate_up"), "down+res": (96, [64], "residual")}
    return {"qkv": (4096, [4096, 1024, 1024], "grouped"), "o_proj+res": (4096, [4096], "residual"),
            "gate_up": (4096, [14336, 14336], "gate_up"), "down+res": (14336, [4096], "residual")}


def run(x, ws, res, kind, cfg=None, reference=False):
    """The projection of ``kind`` on ``x`` and the weights ``ws`` with ``dms_kernels.fused_ops``' Triton kernels
    (launch config ``cfg`` = (BLOCK_N, BLOCK_K, warps, stages); default: theirs), or with ``reference=True`` its
    PyTorch forms (what cuBLAS runs); a list of outputs."""
    from dms_kernels.fused_ops import reference as ref
    from dms_kernels.fused_ops import triton_ops as to

    if kind == "gate_up":
        return [ref.gate_up_silu_reference(x, ws[0], ws[1]) if reference else to.gate_up_silu(x, ws[0], ws[1], cfg=cfg)]
    if kind == "residual":
        return [ref.linear_residual_reference(x, ws[0], res) if reference
                else to.linear_residual(x, ws[0], res, cfg=cfg)]
    return list(ref.grouped_linear_reference(x, ws) if reference else to.grouped_linear(x, ws, cfg=cfg))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="rows of x (the decode batch), at most 16")
    ap.add_argument("--sweep", action="store_true", help="also time every config of the grid")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / interpreter check of the script)")
    ap.add_argument("--out", default="docs/results/skinny_gemm.json")
    args = ap.parse_args(argv)
    if not 1 <= args.rows <= 16:
        print(f"error: --rows must be in [1, 16] (the skinny kernels' tile); got {args.rows}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("error: this benchmark times CUDA graphs; it needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).with_name("bench_decode.py"))
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    from dms_kernels.fused_ops import triton_ops as to

    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float16
    timer = bd.Timer(dev)
    copy_bw = bd.copy_bandwidth(dev, timer, (4 << 30) if cuda else (1 << 20))
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if cuda else 1 << 16
    gen = torch.Generator().manual_seed(0)
    rows = []
    grid = list(itertools.product(*GRID.values())) if args.sweep else []
    for name, (K, Ns, kind) in shapes(args.smoke).items():
        nbytes = K * sum(Ns) * 2
        copies = max(2, -(-4 * l2 // nbytes))  # enough copies to read each from DRAM, not L2
        wsets = [[(torch.randn(n, K, generator=gen) * 0.02).to(dev, dtype) for n in Ns] for _ in range(copies)]
        x = torch.randn(args.rows, K, generator=gen).to(dev, dtype)
        res = torch.randn(args.rows, Ns[0], generator=gen).to(dev, dtype) if kind == "residual" else None
        default = tuple(to._skinny_cfg(x, sum(Ns) if kind != "gate_up" else Ns[0], two_weights=kind == "gate_up")[:4])

        def timed(cfg=None, reference=False):
            """(ms per call, max error vs the PyTorch form): calls cycle through the weight copies."""
            i = [0]

            def step():
                run(x, wsets[i[0] % copies], res, kind, cfg, reference)
                i[0] += 1
            ms = timer.graph_ms(step, inner=2 * copies, reps=10 if cuda else 1)
            err = max(float((y.float() - r.float()).abs().max())
                      for y, r in zip(run(x, wsets[0], res, kind, cfg, reference),
                                      run(x, wsets[0], res, kind, reference=True)))
            return ms, err

        ms_d, err_d = timed(default)
        ms_c, _ = timed(reference=True)
        row = dict(shape=name, kind=kind, rows=args.rows, K=K, N=Ns, weight_bytes=nbytes, weight_copies=copies,
                   default_cfg=list(default), default_us=ms_d * 1e3, default_bw=nbytes / (ms_d * 1e-3) / copy_bw,
                   default_max_err=err_d, cublas_us=ms_c * 1e3, cublas_bw=nbytes / (ms_c * 1e-3) / copy_bw)
        if grid:
            sweep = []
            for cfg in grid:
                try:
                    ms, err = timed(cfg)
                except Exception as e:  # a config the compiler refuses (shared memory): skipped, recorded
                    sweep.append(dict(cfg=list(cfg), error=type(e).__name__))
                    continue
                sweep.append(dict(cfg=list(cfg), us=ms * 1e3, bw=nbytes / (ms * 1e-3) / copy_bw, max_err=err))
            ok = [s for s in sweep if "us" in s]
            row["sweep"] = sweep
            row["best"] = min(ok, key=lambda s: s["us"]) if ok else None
        rows.append(row)
        best = row.get("best")
        print(f"{name:11s} {nbytes / 1e6:7.1f} MB  default {tuple(default)} {row['default_us']:7.1f} us "
              f"({row['default_bw']:.3f} bw)  cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_bw']:.3f})"
              + (f"  best {tuple(best['cfg'])} {best['us']:.1f} us ({best['bw']:.3f})" if best else ""), flush=True)
    doc = dict(rows=rows, copy_bandwidth_GBps=copy_bw / 1e9, l2_bytes=l2, **bd.provenance("bench_skinny_gemm.py", argv))
    bd.dump_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
