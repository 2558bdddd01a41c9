#!/usr/bin/env python3
"""Evaluate a DMS checkpoint or a plain model with training-free KV policies; one JSON out.

    python scripts/evaluate.py runs/quality/runs/dms-cr8/export --teacher runs/quality/base --out dms-cr8.json
    python scripts/evaluate.py runs/quality/base --policies full h2o tova quest --crs 4 8 --out baselines.json
    python scripts/evaluate.py CKPT --lengths 1024 2048 4096 --n-per-task 32 --seed 7 --corpus-file val.jsonl.gz

Measures (dms.eval): perplexity and KL(teacher || model) under exact inference semantics (hard decisions),
decision CR and memory CR overall / per layer / per head, peak tokens held and KV reads while generating,
and greedy-answer accuracy on passkey (several depths), multi-key recall and variable tracking built from
corpus text. A DMS checkpoint without --teacher is compared with itself with DMS off (exact for
adapter-only retrofits; pass the base model for full fine-tunes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="DMS checkpoint folder (config has DMS settings) or a plain HF model folder")
    p.add_argument("--teacher", default=None, help="plain model for KL/perplexity reference (DMS checkpoints)")
    p.add_argument("--policies", nargs="+", default=["full"],
                   help="plain models only: full sliding_window streaming_llm h2o tova quest")
    p.add_argument("--crs", type=float, nargs="+", default=[8.0], help="plain models only: budget = context / CR")
    p.add_argument("--quest-metadata", default="count", choices=("count", "ignore"),
                   help="quest: count its page metadata (one token-equivalent per page) within the reads budget "
                        "(default), or ignore it (the older accounting)")
    p.add_argument("--corpus-file", default="/work/shared/data/corpus/validation.jsonl.gz")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--n-per-task", type=int, default=16)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--n-keys", type=int, default=4)
    p.add_argument("--hops", type=int, default=2)
    p.add_argument("--ppl-rows", type=int, default=8)
    p.add_argument("--ppl-len", type=int, default=2048)
    p.add_argument("--ppl-rows-from", default="stream", choices=("stream", "documents"),
                   help="perplexity rows: the validation documents joined and cut into rows (stream), or slices that lie "
                        "inside one document (documents: far context is always the same document's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ppl-batch-size", type=int, default=None, help="perplexity rows per forward (default --batch-size)")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--window", type=int, default=None, help="override a DMS checkpoint's window")
    p.add_argument("--attention", default=None, help="DMS prefill kernel: eager, flex, triton, auto")
    p.add_argument("--device", default=None)
    p.add_argument("--keep-answers", action="store_true", help="store every generated answer in the JSON")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class _DMSOffTeacher:
    """The retrofitted model itself with DMS disabled (the distillation teacher of an adapter-only retrofit)."""

    def __init__(self, model):
        self.model = model

    def eval(self):
        return self

    def __call__(self, **kwargs):
        from dms import dms_disabled

        with dms_disabled(self.model):
            return self.model(**kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import AutoConfig

    from dms.eval import DMSSystem, EvalConfig, EvalData, PolicySystem, evaluate_system
    from dms.eval.bench import load_plain

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = EvalConfig(lengths=args.lengths, n_per_task=args.n_per_task, depths=args.depths, n_keys=args.n_keys,
                         hops=args.hops, ppl_rows=args.ppl_rows, ppl_len=args.ppl_len, batch_size=args.batch_size,
                         ppl_rows_from=args.ppl_rows_from,
                         ppl_batch_size=args.ppl_batch_size,
                         prefill_chunk=args.prefill_chunk, max_new_tokens=args.max_new_tokens, seed=args.seed)
        hf = AutoConfig.from_pretrained(args.model)
        is_dms = isinstance(getattr(hf, "dms", None), dict) or getattr(hf, "dms_window_size", None) is not None
        if is_dms:
            import dms

            model, tok = dms.load(args.model, device=device, dtype="float32", attention_impl=args.attention,
                                  window=args.window)
            teacher = load_plain(args.teacher, device)[0] if args.teacher else _DMSOffTeacher(model)
            systems = [DMSSystem(model, "dms")]
        else:
            model, tok = load_plain(args.model, device)
            teacher = model
            systems = [PolicySystem(model, p, 1.0 if p == "full" else cr,
                                    **({"quest_metadata": args.quest_metadata} if p == "quest" else {}))
                       for p in args.policies for cr in ([1.0] if p == "full" else args.crs)]
        data = EvalData.build(tok, args.corpus_file, cfg)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [evaluate_system(s, teacher, tok, data, cfg, progress=not args.no_progress, keep_answers=args.keep_answers)
               for s in systems]
    doc = {"model": args.model, "teacher": args.teacher, "quest_metadata": args.quest_metadata,
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python scripts/evaluate.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "results": results}
    for r in results:
        print(f"{r['system']:>22}: ppl {r.get('ppl', float('nan')):.3f} ({100 * r.get('ppl_increase', 0):+.1f}%) "
              f"KL {r.get('kl', float('nan')):.4f} memory CR {r.get('memory_cr')} decision CR {r.get('decision_cr')} "
              f"retrieval {r.get('retrieval_accuracy')} tasks {r.get('task_accuracy')}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
