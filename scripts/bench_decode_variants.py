#!/usr/bin/env python3
"""Decode-attention kernel variants side by side (H100; CUDA-graph timing, fractions of copy bandwidth).

Times the split-K decode kernel (``dms_kernels.decode_attention.triton_decode``) on the rows where its fixed
per-call cost shows (batch 8 / 32, dense, ragged CR 8 and lengths skewed around ctx/2, built as in
``scripts/bench_decode.py``), for each variant:

- ``vmask_pos``: V tiles masked by slot position as well as the stream length (``V_MASK_POS=True``);
- ``default``: masked by the stream length only (the default);
- ``stages3`` / ``warps8``: the default with 3 pipeline stages / 8 warps;
- ``tma`` / ``tma_stages3`` / ``tma_stages4``: pages read by bulk copies through tensor descriptors (``use_tma=True``),
  2 / 3 / 4 stages;
- ``no_pdl``: the split and merge kernels launched without programmatic dependent launch (``pdl=False``);
- ``ppsN`` (N in 8, 10, 12, 14, 16, 20, 24) / ``stages4``: the default with splits of N pages, or 4 pipeline stages.

``--variants`` picks some, ``--repeat`` times each row that many times over, the variants interleaved.

    python scripts/bench_decode_variants.py --out docs/results/decode_kernel_variants.json
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROWS = [(8192, 8, "dense", 1.0), (8192, 8, "skew2", 2.0), (32768, 8, "cr8", 8.0), (32768, 8, "skew2", 2.0),
        (32768, 8, "dense", 1.0), (8192, 32, "cr8", 8.0), (32768, 32, "cr8", 8.0)]
VARIANTS = {
    "vmask_pos": (True, {}),
    "default": (False, {}),
    "stages3": (False, dict(num_stages=3)),
    "warps8": (False, dict(num_warps=8)),
    "tma": (False, dict(use_tma=True)),
    "tma_stages3": (False, dict(use_tma=True, num_stages=3)),
    "tma_stages4": (False, dict(use_tma=True, num_stages=4)),
    "no_pdl": (False, dict(pdl=False)),
    "stages4": (False, dict(num_stages=4)),
    **{f"pps{n}": (False, dict(pages_per_split=n)) for n in (8, 10, 12, 14, 16, 20, 24)},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/decode_kernel_variants.json")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--repeat", type=int, default=1, help="time each row this many times, variants interleaved")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark times CUDA graphs; it needs a CUDA GPU", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).with_name("bench_decode.py"))
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    from dms_kernels.decode_attention import triton_decode as td

    dev = torch.device("cuda")
    timer = bd.Timer(dev)
    copy_bw = bd.copy_bandwidth(dev, timer, 4 << 30)
    H, Hkv, D, PS = 32, 8, 128, 64
    rows = []
    saved = td.V_MASK_POS
    try:
        for ctx, B, name, cr in ROWS:
            gen = bd.row_generator("kernel", ctx, B, name)  # the same lengths as bench_decode.py's kernel row
            lens = bd.ragged_lengths(B, Hkv, ctx, cr, args.window, gen)
            k, v, pos, bt, sl = bd.build_store(lens, PS, D, torch.bfloat16, dev, gen)
            q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
            live = int(lens.sum()) * D * 2 * 2
            max_len = int(lens.max())
            row = dict(context=ctx, batch=B, lengths=name, live_bytes=live)
            for rep in range(args.repeat):
                for vname in args.variants:
                    vmask, kw = VARIANTS[vname]
                    td.V_MASK_POS = vmask
                    fn = lambda: td.paged_decode_attention(q, k, v, pos, bt, sl, D ** -0.5,  # noqa: E731
                                                           max_len=max_len, kernel="split", **kw)
                    ms = timer.graph_ms(fn, reps=10)
                    frac = round(live / (ms * 1e-3) / copy_bw, 4)
                    if args.repeat == 1:
                        row[vname] = frac
                    else:
                        row.setdefault(vname, []).append(frac)
            rows.append(row)
            print(row, flush=True)
    finally:
        td.V_MASK_POS = saved
    doc = dict(rows=rows, copy_bandwidth_GBps=copy_bw / 1e9, **bd.provenance("bench_decode_variants.py", argv))
    bd.dump_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
