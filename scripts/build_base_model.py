#!/usr/bin/env python3
"""Pretrain a reference base model (BPE tokenizer + small GQA Llama/Qwen3) on the shared corpus.

    python scripts/build_base_model.py --corpus /work/shared/data/corpus --out runs/base-llama
    python scripts/build_base_model.py --corpus .corpus --out runs/base-qwen3 --family qwen3 --steps 1500 --seed 1
    python scripts/build_base_model.py --corpus .corpus --out runs/base --time-budget-s 470 --max-seconds 495  # the reference
                                                                                   # base of docs/benchmarks.md (one H100)

The mix teaches in-context retrieval (planted key-value facts recalled later); the work lives in
dms.base_models. Prints the validation loss and, with --eval-n > 0, the retrieval accuracy at full cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def parse_args(argv=None):
    from dms.base_models import BaseModelConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="folder with train.jsonl.gz and validation.jsonl.gz")
    p.add_argument("--out", required=True, help="export folder (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--eval-n", type=int, default=16, help="task examples per task and length at full cache (0: skip)")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[2048, 4096])
    for f in dataclasses.fields(BaseModelConfig):  # every recipe field is a flag (annotations: "int | None", ...)
        typ = {"int": int, "float": float, "str": str, "tuple": _floats}[str(f.type).split(" ")[0]]
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=None, help=f"default {f.default}")
    return p.parse_args(argv)


def _floats(text: str) -> tuple:
    """``"0.2,0.5,0.3"`` -> ``(0.2, 0.5, 0.3)`` (tuple-valued recipe fields such as --mix-weights)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.15,0.5,0.35; got {text!r}") \
            from None


def main(argv=None) -> int:
    args = parse_args(argv)
    from dms.base_models import BaseModelConfig, build_base_model

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BaseModelConfig)
                 if getattr(args, f.name) is not None}
    try:
        cfg = BaseModelConfig(**overrides)
        info = build_base_model(args.corpus, args.out, cfg, seed=args.seed, device=args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.eval_n > 0:
        from dms.eval.bench import full_cache_accuracy

        info["full_cache_eval"] = full_cache_accuracy(args.out, f"{args.corpus}/validation.jsonl.gz", args.eval_lengths,
                                                      args.eval_n, device=args.device)
        with open(f"{args.out}/build_info.json", "w") as f:
            json.dump(info, f, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k not in ("loss_curve", "recipe")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
