#!/usr/bin/env python3
"""Quality benchmark: base model -> DMS retrofits at several CRs (+ ablations) -> DMS vs training-free baselines.

    python scripts/bench_quality.py --corpus .corpus --work runs/quality          # everything, on one GPU
    python scripts/bench_quality.py --stages build --work runs/quality            # only the base model
    python scripts/bench_quality.py --crs 2 4 8 --steps 300 --window 32 --ablations immediate windows qneuron full

Stages (each skips what <work> already holds, so a run can be split over several commands):
  build     pretrain the reference base model (dms.base_models) into <work>/base, unless --base-model is given
  retrofit  dms.training.run_retrofit for each CR (adapter heads, --window) and each ablation (at the largest CR):
            immediate eviction (window 0), other windows (--ablation-windows), q-neuron retention heads
            (full fine-tune, as they have no parameters of their own), adapter heads + full fine-tune
  eval      dms.eval.evaluate_system for the base model (full cache), every baseline at every CR, every retrofit
  report    docs/results/quality.json, the "Quality" section of docs/benchmarks.md and docs/quality_*.png
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

STAGES = ("build", "retrofit", "eval", "report")
ABLATIONS = ("immediate", "windows", "qneuron", "full")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="/work/shared/data/corpus", help="folder with train/validation.jsonl.gz")
    p.add_argument("--work", default="runs/quality", help="working folder (base model, runs, cached evaluations)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--base-model", default=None, help="use this base checkpoint instead of building <work>/base")
    p.add_argument("--base-steps", type=int, default=None, help="pretraining steps (BaseModelConfig.steps)")
    p.add_argument("--base-batch", type=int, default=None)
    p.add_argument("--base-family", default="llama", choices=("llama", "qwen3"))
    p.add_argument("--base-max-seconds", type=float, default=None)
    p.add_argument("--base-config", default=None, help='JSON of further BaseModelConfig fields, e.g. \'{"hidden_size": 128}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crs", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--window", type=int, default=32, help="DMS window of the main runs (memory CR <= T / window)")
    p.add_argument("--steps", type=int, default=300, help="retrofit steps per run")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="retrofit lr for adapter-only runs")
    p.add_argument("--full-lr", type=float, default=3e-4, help="retrofit lr for full fine-tune runs")
    p.add_argument("--attention", default="eager", choices=("auto", "eager", "flex", "triton"))
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=ABLATIONS)
    p.add_argument("--ablation-windows", type=int, nargs="+", default=[8, 128])
    p.add_argument("--mix-docs", type=int, default=3000, help="documents in the retrofit corpus")
    p.add_argument("--mix-task-fraction", type=float, default=0.3,
                   help="share of retrieval documents in the retrofit corpus (the rest: plain corpus text)")
    p.add_argument("--baselines", nargs="*", default=["sliding_window", "streaming_llm", "h2o", "tova", "quest"])
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--n-per-task", type=int, default=16)
    p.add_argument("--ppl-rows", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--re-eval", action="store_true", help="ignore cached evaluations in <work>/eval")
    p.add_argument("--json", default="docs/results/quality.json")
    p.add_argument("--docs", default="docs")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--note", action="append", default=[], help="free-text note added to the report (repeatable)")
    p.add_argument("--retrofit-deadline", type=float, default=None,
                   help="seconds since start after which no further retrofit is started (main CRs go first)")
    p.add_argument("--eval-deadline", type=float, default=None,
                   help="seconds since start after which no further system is evaluated (the report still runs)")
    return p.parse_args(argv)


def run_specs(args):
    from dms.eval.bench import RunSpec

    top = max(args.crs)
    specs = [RunSpec(f"dms-cr{c:g}", c, args.window, lr=args.lr) for c in sorted(args.crs, reverse=True)]
    if "immediate" in args.ablations:
        specs.append(RunSpec(f"dms-cr{top:g}-w0", top, 0, lr=args.lr))
    if "qneuron" in args.ablations:
        specs.append(RunSpec(f"dms-cr{top:g}-qneuron", top, args.window, "q_neuron", "full", args.full_lr))
    if "full" in args.ablations:
        specs.append(RunSpec(f"dms-cr{top:g}-fullft", top, args.window, "adapter", "full", args.full_lr))
    if "windows" in args.ablations:
        specs += [RunSpec(f"dms-cr{top:g}-w{w}", top, w, lr=args.lr) for w in args.ablation_windows if w != args.window]
    return specs


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from dms.base_models import BaseModelConfig, build_base_model, write_retrofit_mix
    from dms.eval import DMSSystem, EvalConfig, EvalData, PolicySystem, evaluate_system
    from dms.eval import bench

    t_start = time.time()
    argl = list(argv if argv is not None else sys.argv[1:])
    # Notes are report text, not settings: leave them out of the recorded command.
    argl = [a for i, a in enumerate(argl) if a != "--note" and (i == 0 or argl[i - 1] != "--note")]
    command = "python scripts/bench_quality.py " + shlex.join(argl)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    progress = not args.no_progress
    work = Path(args.work)
    (work / "eval").mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus)
    base_dir = Path(args.base_model) if args.base_model else work / "base"
    timings = {}

    # ---- build ----------------------------------------------------------------------------------------
    if "build" in args.stages and not (base_dir / "build_info.json").is_file():
        if args.base_model:
            raise SystemExit(f"error: --base-model {base_dir} has no build_info.json")
        over = {"family": args.base_family, **(json.loads(args.base_config) if args.base_config else {})}
        if args.base_steps:
            over["steps"] = args.base_steps
        if args.base_batch:
            over["batch_size"] = args.base_batch
        over.setdefault("data_workers", min(8, max(0, (os.cpu_count() or 1) - 4)))
        if args.base_max_seconds:
            over["max_seconds"] = args.base_max_seconds
        t = time.time()
        build_base_model(corpus, base_dir, BaseModelConfig(**over), seed=args.seed, device=device, progress=progress)
        timings["build_s"] = time.time() - t
    if not (base_dir / "config.json").is_file():
        print(f"error: no base model in {base_dir}; run the build stage or pass --base-model", file=sys.stderr)
        return 2

    # ---- retrofit -------------------------------------------------------------------------------------
    specs = run_specs(args)
    runs_dir = work / "runs"
    if "retrofit" in args.stages:
        from dms.training import run_retrofit
        from transformers import AutoTokenizer

        mix = work / "retrofit_mix.jsonl.gz"
        if not mix.is_file():
            tok = AutoTokenizer.from_pretrained(str(base_dir))
            write_retrofit_mix(corpus / "train.jsonl.gz", tok, mix, args.mix_docs, args.seq_len,
                               task_fraction=args.mix_task_fraction, seed=args.seed)
        for spec in specs:
            out = runs_dir / spec.name
            if (out / "summary.json").is_file():
                continue
            if args.retrofit_deadline is not None and time.time() - t_start > args.retrofit_deadline:
                print(f"[{spec.name}] skipped: --retrofit-deadline {args.retrofit_deadline:g}s passed", flush=True)
                continue
            t = time.time()
            cfg = bench.retrofit_config(spec, base_dir, mix, out, args.steps, args.seq_len, args.batch_size,
                                        args.attention, args.seed, progress)
            summary = run_retrofit(cfg, log=print)
            timings[f"retrofit_{spec.name}_s"] = time.time() - t
            print(f"[{spec.name}] {time.time() - t:.0f}s eval={json.dumps(summary.get('eval'))}", flush=True)

    # ---- eval -----------------------------------------------------------------------------------------
    ecfg = EvalConfig(lengths=args.eval_lengths, n_per_task=args.n_per_task, ppl_rows=args.ppl_rows,
                      ppl_len=args.seq_len, batch_size=args.eval_batch, prefill_chunk=args.prefill_chunk,
                      seed=args.eval_seed)
    results: dict[str, dict] = {}
    for f in sorted((work / "eval").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("eval_config") == json.loads(json.dumps(ecfg.__dict__)):
            results[r["system"]] = r
    if "eval" in args.stages:
        import dms

        t = time.time()
        base, tok = bench.load_plain(base_dir, device)
        data = EvalData.build(tok, corpus / "validation.jsonl.gz", ecfg)

        def run(system, teacher):
            if system.name in results and not args.re_eval:
                return
            if args.eval_deadline is not None and time.time() - t_start > args.eval_deadline:
                print(f"[eval {system.name}] skipped: --eval-deadline {args.eval_deadline:g}s passed", flush=True)
                return
            r = evaluate_system(system, teacher, tok, data, ecfg, progress=progress)
            results[system.name] = r
            (work / "eval" / f"{system.name}.json").write_text(json.dumps(r, indent=1))
            print(f"[eval {system.name}] ppl={r.get('ppl'):.3f} (+{100 * r.get('ppl_increase', 0):.1f}%) "
                  f"kl={r.get('kl'):.4f} memory_cr={r.get('memory_cr')} retrieval={r.get('retrieval_accuracy')} "
                  f"tasks={r.get('task_accuracy')}", flush=True)

        def run_dms(spec):
            exp = runs_dir / spec.name / "export"
            if not exp.is_dir() or (spec.name in results and not args.re_eval):
                return
            model, _ = dms.load(str(exp), device=device, dtype="float32", attention_impl=args.attention)
            run(DMSSystem(model, spec.name), base)
            del model

        # Order: what the summary needs first (full cache, then per CR from the largest: DMS, baselines), ablations last.
        run(PolicySystem(base, "full"), base)
        main = {s.cr: s for s in specs if s.name == f"dms-cr{s.cr:g}"}
        for cr in sorted(args.crs, reverse=True):
            if cr in main:
                run_dms(main[cr])
            for b in args.baselines:
                run(PolicySystem(base, b, cr), base)
        for spec in specs:
            run_dms(spec)
        timings["eval_s"] = time.time() - t
        import transformers

        # Where and how the numbers were measured; the report stage (possibly run elsewhere) reuses it.
        (work / "run_meta.json").write_text(json.dumps({
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "timings_s": {**timings, "total_s": time.time() - t_start}}, indent=1))

    # ---- report ---------------------------------------------------------------------------------------
    if "report" in args.stages:
        import transformers

        run_rows = {s.name: bench.read_losses(runs_dir / s.name) for s in specs}
        main_runs = {s.cr: s.name for s in specs if s.name == f"dms-cr{s.cr:g}"}
        summary = bench.summarize(results, args.crs, main_runs, args.baselines, run_rows)
        build_info = json.loads((base_dir / "build_info.json").read_text()) if (base_dir / "build_info.json").is_file() else {}
        meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "python": sys.version.split()[0]},
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command}
        if (work / "run_meta.json").is_file():  # measured in an earlier command (e.g. on the GPU machine)
            measured = json.loads((work / "run_meta.json").read_text())
            timings = measured.pop("timings_s", timings)
            meta = {**measured, "report_command": command}
        if args.note:
            meta["notes"] = args.note
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        imgs = []
        if results:
            abl = {s.name: s.cr for s in specs if s.name not in main_runs.values()}
            bench.plot_quality(results, args.crs, main_runs, args.baselines, docs / "quality_vs_budget.png", meta["command"],
                               abl)
            bench.plot_kv_reads(results, args.crs, main_runs, args.baselines, docs / "quality_vs_kv_reads.png", meta["command"])
            imgs += ["quality_vs_budget.png", "quality_vs_kv_reads.png"]
        if any(run_rows.values()):
            bench.plot_training({k: v for k, v in run_rows.items() if v}, docs / "quality_training_curves.png", meta["command"])
            imgs.append("quality_training_curves.png")
        order = ["full"] + [main_runs[c] for c in args.crs if c in main_runs]
        order += [f"{b}@cr{c:g}" for c in args.crs for b in args.baselines]
        order += [s.name for s in specs if s.name not in order]
        runs_meta = {}
        for s in specs:
            sp = runs_dir / s.name / "summary.json"
            runs_meta[s.name] = {"spec": bench.spec_dict(s),
                                 "train_summary": json.loads(sp.read_text()) if sp.is_file() else None,
                                 "steps_to_target_cr": bench.steps_to_cr(run_rows.get(s.name, []), s.cr)}
        doc = {"summary": summary, **meta, "base_model": {k: v for k, v in build_info.items() if k != "loss_curve"},
               "retrofit": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
                            "window": args.window, "attention": args.attention, "runs": runs_meta},
               "timings_s": timings,
               "rows": [{k: v for k, v in results[n].items() if k != "eval_config"} for n in order if n in results],
               "eval_config": ecfg.__dict__}
        out_json = Path(args.json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(doc, indent=1) + "\n")
        rel = os.path.relpath(out_json, docs)
        section = bench.markdown_section(results, order, summary, meta, imgs).replace("results/quality.json", rel)
        bench.write_section(docs / "benchmarks.md", section)
        print(json.dumps(summary, indent=1))
    print(f"total {time.time() - t_start:.0f}s; timings {json.dumps({k: round(v) for k, v in timings.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
