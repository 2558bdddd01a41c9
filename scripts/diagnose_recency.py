#!/usr/bin/env python3
"""Does a base model gain from far context, and can a CR-2 DMS retrofit beat the sliding window on perplexity?

The diagnosis behind docs/benchmarks.md "Session 11" (results/quality_cr2_diag_s11.json), on one GPU:

    python scripts/diagnose_recency.py --base .qbase --corpus .corpus_q --out diag.json

1. Per-row perplexity of the base with its full cache and with sliding windows / StreamingLLM at several budgets,
   on two row sets of the validation split: ``packed`` (documents joined with EOS, cut into rows) and ``indoc``
   (slices inside one document). A window that beats the full cache means the base loses from its far context,
   so at mild CRs recency is hard to beat for any method distilled towards the full cache.
2. CR-2 retrofits (adapter heads) at several windows and step counts, each evaluated the same way.
Rows are scored one at a time, so per-row figures pair across systems (mean and standard error of differences).
"""
import argparse
import json
import math
import time
import traceback
from pathlib import Path
import dms
from dms.eval import DMSSystem, EvalConfig, PolicySystem
from dms.eval.suite import document_rows, perplexity_and_kl
from dms.eval import bench
from dms.eval.bench import RunSpec, decision_target
from dms.eval.tasks import read_corpus, token_stream
from dms.base_models import BaseModelConfig, write_retrofit_mix
from dms.training import run_retrofit

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--base", required=True, help="plain base model folder")
ap.add_argument("--corpus", required=True, help="folder with train.jsonl.gz and validation.jsonl.gz")
ap.add_argument("--out", required=True, help="JSON written after every system")
ap.add_argument("--work", default="runs/diagnose_recency", help="retrofit runs and their mix")
ap.add_argument("--device", default="cuda")
ap.add_argument("--deadline", type=float, default=560, help="seconds after which nothing new is started")
ap.add_argument("--rows", type=int, default=10**6, help="at most this many rows per set")
args = ap.parse_args()
t0 = time.time()
OUT_FILE = Path(args.out)
DEADLINE = args.deadline
dev = args.device
T = 4096
base, tok = bench.load_plain(args.base, dev)
texts = read_corpus(Path(args.corpus) / "validation.jsonl.gz", None)
stream = token_stream(tok, texts)
packed = stream[: ((stream.numel() - 1) // T) * T].view(-1, T)
NR = args.rows
sets = {"packed": packed[:NR], "indoc": document_rows(tok, texts, T, NR)}
print({k: tuple(v.shape) for k, v in sets.items()}, flush=True)
cfg = EvalConfig(lengths=[T], n_per_task=1, ppl_rows=0, ppl_len=T, batch_size=8, ppl_batch_size=1, prefill_chunk=256)
res = {}

def save():
    OUT_FILE.write_text(json.dumps(res, indent=1))

def ev(system):
    if time.time() - t0 > DEADLINE:
        print("deadline: skip", system.name, flush=True); return
    t = time.time()
    out = {}
    for sname, r in sets.items():
        per = [perplexity_and_kl(system, base, r[i:i + 1], cfg) for i in range(r.shape[0])]
        out[sname] = {k: [p.get(k) for p in per] for k in ("ppl", "teacher_ppl", "kl", "memory_cr", "decision_cr")}
        nll = sum(math.log(p["ppl"]) for p in per) / len(per)
        nllt = sum(math.log(p["teacher_ppl"]) for p in per) / len(per)
        out[sname]["ppl_increase"] = math.exp(nll - nllt) - 1
        k = min(16, len(per))  # the first 16 rows: the published quality table's perplexity rows until session 11
        out[sname]["ppl_increase_rows0_15"] = (math.exp(sum(math.log(p["ppl"]) for p in per[:k]) / k
                                                - sum(math.log(p["teacher_ppl"]) for p in per[:k]) / k) - 1)
        mc = [p["memory_cr"] for p in per if p.get("memory_cr")]
        out[sname]["memory_cr_mean_held"] = len(mc) / sum(1 / m for m in mc) if mc else None
    res[system.name] = out
    print(f"[{system.name}] {time.time() - t:.0f}s " + " ".join(
        f"{s}: {out[s]['ppl_increase']:+.5f} (rows0-15 {out[s]['ppl_increase_rows0_15']:+.5f}, mcr {out[s]['memory_cr_mean_held']})"
        for s in sets), flush=True)
    save()

for name, pol, cr, kw in ([("full", "full", 1, {}), ("sw@2", "sliding_window", 2, {}), ("sw@2.18", "sliding_window", 2.18, {"rounding": "ceil"}),
                          ("streaming@2", "streaming_llm", 2, {}), ("sw@1.6", "sliding_window", 1.6, {}), ("sw@2.67", "sliding_window", 2.6667, {})]):
    ev(PolicySystem(base, pol, cr, name=name, **kw))

work = Path(args.work)
mix = work / "mix.jsonl.gz"
mix.parent.mkdir(exist_ok=True)
recipe = json.loads((Path(args.base) / "build_info.json").read_text())["recipe"]
bmix = BaseModelConfig(**{k: v for k, v in recipe.items() if k in BaseModelConfig.__dataclass_fields__}).mix()
write_retrofit_mix(Path(args.corpus) / "train.jsonl.gz", tok, mix, 800, T, task_fraction=0.3, seed=0, mix=bmix)
variants = [("dms-cr2-w1536-s300", 2, 1536, 300), ("dms-cr2-w1536-s1000", 2, 1536, 1000), ("dms-cr2-w1024-s300", 2, 1024, 300),
            ("dms-cr2-w1843-s300", 2, 1843, 300), ("dms-cr2-w1843-s1000", 2, 1843, 1000)]
for name, cr, w, steps in variants:
    if time.time() - t0 > DEADLINE - 90:
        print("deadline: skip retrofit", name, flush=True); continue
    t = time.time()
    spec = RunSpec(name, cr, w, "adapter", "adapter", 3e-3, target_cr=decision_target(cr, T, w))
    rc = bench.retrofit_config(spec, args.base, mix, work / name, steps, T, 2, "auto" if dev == "cuda" else "eager", 0, False, dtype="bfloat16" if dev == "cuda" else "float32")
    try:
        run_retrofit(rc, log=lambda *a, **k: None)
    except Exception:
        traceback.print_exc(); continue
    print(f"retrofit {name} {time.time() - t:.0f}s", flush=True)
    model, _ = dms.load(str(work / name / "export"), device=dev, dtype="float32", attention_impl="eager")
    ev(DMSSystem(model, name))
    del model
print(f"total {time.time() - t0:.0f}s")
