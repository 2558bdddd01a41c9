#!/usr/bin/env python3
"""Quality benchmark: base model -> DMS retrofits at several CRs (+ ablations) -> DMS vs training-free baselines.

    python scripts/bench_quality.py --corpus .corpus --work runs/quality          # everything, on one GPU
    python scripts/bench_quality.py --stages build --work runs/quality            # only the base model
    python scripts/bench_quality.py --crs 2 4 8 --steps 300 --window 32 --ablations immediate windows qneuron full
    python scripts/bench_quality.py --smoke --corpus .corpus --work /tmp/q --json /tmp/q/q.json --docs /tmp/q/d  # CPU

CR: by default (``--cr-definition memory``) "CR c" is the memory CR of DESIGN.md at the end of the ``--ppl-len``
rows: the training-free baselines hold ``context / c`` tokens, and each retrofit's compression loss targets the
decision CR ``d = (T - w) / (T / c - w)`` that leaves the same memory with its window ``w``
(``dms.eval.bench.decision_target``); ``--cr-definition decision`` trains for decision CR ``c`` instead.

Stages (each skips what <work> already holds, so a run can be split over several commands):
  build     pretrain the reference base model (dms.base_models) into <work>/base, unless --base-model is given
  retrofit  dms.training.run_retrofit for each CR (adapter heads, --window) and each ablation (at the largest CR),
            in this order: q-neuron retention heads (full fine-tune, as they have no parameters of their own),
            adapter heads + full fine-tune, immediate eviction (window 0), other windows (--ablation-windows)
  eval      dms.eval.evaluate_system for the base model (full cache), every baseline at every CR, every retrofit
            (Quest: one system per --quest-page-sizes entry; its KV reads include its page metadata and its page
            selection fits the same reads budget, unless --quest-metadata ignore); and, after each main DMS run,
            every baseline again at that run's budget (below)
  report    docs/results/quality.json, the "Quality" section of docs/benchmarks.md and docs/quality_*.png

Budget-matched comparison (on by default; --no-matched-baselines turns it off). A retrofit aimed at CR c does not land
exactly on it (e.g. memory CR 2.18 at "CR 2": it holds ~8% fewer tokens than the baselines' context / 2). So, once
the main run dms-crC is evaluated, every baseline is evaluated once more at the memory CR m that run measured (both
directions: m < c gives the baselines more tokens than nominal). Its budget is DMS's mean tokens held per row, layer
and KV head, T / m at the T = --ppl-len perplexity rows (context / m for task prompts of other lengths), rounded UP to
an integer (dms.eval.suite.PolicySystem, rounding="ceil"): a matched baseline never holds fewer tokens than DMS, at
most one more. These rows are named <baseline>@crC-matched (never a nominal name) and cached in <work>/eval like the
others, recording matched_to (the DMS run), nominal_cr (C), cr (m), budget_rounding and budget_tokens (at T); a cached
one is reused only while the DMS row still reports the same m, otherwise it is re-evaluated (only that file is
rewritten; the nominal <baseline>@crC rows are never touched). The summary keeps its nominal fields and adds, per
main CR, best_baseline_ppl_increase_crC_matched(_policy), best_baseline_retrieval_ratio_crC_matched(_policy),
matched_budget_crC (m) and dms_beats_every_baseline_crC_matched; the report shows both in one margins table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
import traceback
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
    p.add_argument("--base-max-seconds", type=float, default=None, help="hard stop of the pretraining loop")
    p.add_argument("--base-time-budget", type=float, default=None,
                   help="seconds of pretraining: the step count (and cosine schedule) fits the measured step time")
    p.add_argument("--base-config", default=None, help='JSON of further BaseModelConfig fields, e.g. \'{"hidden_size": 128}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crs", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--window", type=int, default=32, help="DMS window of the main runs (memory CR <= T / window)")
    p.add_argument("--window-share", type=float, default=None,
                   help="instead of one --window: each main run's window is this share of its budget, "
                        "w = round(share * ppl_len / CR) (0.5: half of the tokens held are the recent window); "
                        "the ablations use the largest CR's window")
    p.add_argument("--window-share-at", nargs="*", default=[], metavar="CR=SHARE",
                   help="a different --window-share for one CR's main run, e.g. 2=0.75 (repeatable as a list)")
    p.add_argument("--cr-definition", default="memory", choices=("memory", "decision"),
                   help="what 'CR c' means for DMS runs: memory CR c at --ppl-len tokens (default) or decision CR c")
    p.add_argument("--steps", type=int, default=300, help="retrofit steps per run")
    p.add_argument("--seq-len", type=int, default=2048, help="retrofit rows (tokens)")
    p.add_argument("--ppl-len", type=int, default=None, help="perplexity rows (tokens; default --seq-len): the "
                   "context at which memory CRs are measured")
    p.add_argument("--retrofit-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights of the retrofitted model during training (retention heads are fp32 either way)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="retrofit lr for adapter-only runs")
    p.add_argument("--full-lr", type=float, default=3e-4, help="retrofit lr for full fine-tune runs")
    p.add_argument("--attention", default="eager", choices=("auto", "eager", "flex", "triton"),
                   help="DMS training-attention kernel of the retrofits")
    p.add_argument("--eval-attention", default="eager", choices=("auto", "eager", "flex", "triton"),
                   help="DMS prefill kernel of the evaluation (eager: the fp32 reference)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=ABLATIONS)
    p.add_argument("--ablation-windows", type=int, nargs="+", default=[8, 128])
    p.add_argument("--mix-docs", type=int, default=3000, help="documents in the retrofit corpus")
    p.add_argument("--mix-task-fraction", type=float, default=0.3,
                   help="share of retrieval documents in the retrofit corpus (the rest: plain corpus text)")
    p.add_argument("--baselines", nargs="*", default=["sliding_window", "streaming_llm", "h2o", "tova", "quest"])
    p.add_argument("--matched-baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate every baseline at the memory CR each main DMS run achieved (its tokens held, "
                        "rounded up): the budget-matched comparison, reported beside the nominal one (default: on)")
    p.add_argument("--quest-metadata", default="count", choices=("count", "ignore"),
                   help="Quest's KV reads: count its page metadata (one token-equivalent per page) within the reads "
                        "budget (default), or ignore it (the older accounting, for comparison)")
    p.add_argument("--quest-page-sizes", type=int, nargs="+", default=[16],
                   help="one Quest system per page size: 'quest' for 16, 'quest-pN' for the others")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--n-per-task", type=int, default=16)
    p.add_argument("--ppl-rows", type=int, default=8,
                   help="perplexity rows (at most; a number above what the validation split holds takes all of it)")
    p.add_argument("--ppl-rows-from", default="stream", choices=("stream", "documents"),
                   help="perplexity rows: the validation documents joined and cut into rows (stream), or slices that lie "
                        "inside one document (documents)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--ppl-batch", type=int, default=None, help="perplexity rows per forward (default --eval-batch)")
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
    p.add_argument("--results-copy", default=None,
                   help="copy the small results of <work> (evaluations, losses, summaries, build info) to this folder")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU end-to-end run of every stage (a 2-layer base model, a few steps, a few examples)")
    args = p.parse_args(argv)
    if any(ps < 1 for ps in args.quest_page_sizes):
        p.error(f"--quest-page-sizes must be >= 1; got {args.quest_page_sizes}")
    args.quest_page_sizes = list(dict.fromkeys(args.quest_page_sizes))
    if args.window_share is not None and not 0 < args.window_share < 1:
        p.error(f"--window-share must be in (0, 1) (the window's share of the tokens held); got {args.window_share}")
    shares = {}
    for item in args.window_share_at:
        try:
            cr, share = (float(x) for x in item.split("="))
        except ValueError:
            p.error(f"--window-share-at takes CR=SHARE items such as 2=0.75; got {item!r}")
        if cr not in args.crs or not 0 < share < 1:
            p.error(f"--window-share-at {item!r}: the CR must be one of --crs {args.crs} and the share in (0, 1)")
        shares[cr] = share
    if shares and args.window_share is None:
        p.error("--window-share-at needs --window-share (the share of the other CRs)")
    args.window_share_at = shares
    if args.smoke:
        apply_smoke(args)
    if args.ppl_len is None:
        args.ppl_len = args.seq_len
    return args


def apply_smoke(args):
    """Settings of ``--smoke``: every stage and ablation runs, on a CPU, in about a minute (correctness only)."""
    args.base_config = json.dumps({"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                   "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128, "seq_len": 256,
                                   "batch_size": 4, "warmup_steps": 5, "tokenizer_chars": 300_000,
                                   "max_train_docs": 200, "max_position_embeddings": 512, "data_workers": 0,
                                   **(json.loads(args.base_config) if args.base_config else {})})
    args.base_steps = args.base_steps or 30
    args.steps, args.seq_len, args.batch_size = 6, 256, 2
    args.window, args.ablation_windows = 8, [4, 16]
    args.mix_docs, args.eval_lengths, args.n_per_task = 30, [256], 2
    args.ppl_rows, args.eval_batch, args.prefill_chunk = 2, 4, 64
    args.device = args.device or "cpu"


def baseline_systems(args) -> list[tuple[str, str, dict]]:
    """``(name, policy, PolicyCache options)`` of each training-free baseline, in ``--baselines`` order; Quest
    gives one per ``--quest-page-sizes`` entry (``quest`` for page size 16, ``quest-pN`` otherwise)."""
    out = []
    for b in args.baselines:
        if b != "quest":
            out.append((b, b, {}))
            continue
        for ps in args.quest_page_sizes:
            out.append(("quest" if ps == 16 else f"quest-p{ps}", "quest",
                        {"page_size": ps, "quest_metadata": args.quest_metadata}))
    return out


def run_specs(args):
    from dms.eval.bench import RunSpec, decision_target

    def spec(name, cr, window, *rest):
        target = decision_target(cr, args.ppl_len, window) if args.cr_definition == "memory" else None
        return RunSpec(name, cr, window, *rest, target_cr=target)

    top = max(args.crs)
    specs = [spec(f"dms-cr{c:g}", c, main_window(args, c), "adapter", "adapter", args.lr)
             for c in sorted(args.crs, reverse=True)]
    window = main_window(args, top)
    # Ablations in priority order (a --retrofit-deadline cuts from the end).
    if "qneuron" in args.ablations:
        specs.append(spec(f"dms-cr{top:g}-qneuron", top, window, "q_neuron", "full", args.full_lr))
    if "full" in args.ablations:
        specs.append(spec(f"dms-cr{top:g}-fullft", top, window, "adapter", "full", args.full_lr))
    if "immediate" in args.ablations:
        specs.append(spec(f"dms-cr{top:g}-w0", top, 0, "adapter", "adapter", args.lr))
    if "windows" in args.ablations:
        specs += [spec(f"dms-cr{top:g}-w{w}", top, w, "adapter", "adapter", args.lr)
                  for w in args.ablation_windows if w != window]
    return specs


def main_window(args, cr: float) -> int:
    """The DMS window of the main run at ``cr``: ``--window``, or ``--window-share`` of that run's budget."""
    if args.window_share is None:
        return args.window
    share = args.window_share_at.get(float(cr), args.window_share)
    return max(1, int(round(share * args.ppl_len / cr)))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from dms.base_models import tf32_matmuls

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tf32_matmuls(device.startswith("cuda")):  # TF32 for this run only (main is also called in-process)
        return _main(args, argv, device)


def _main(args, argv, device) -> int:
    import torch

    from dms.base_models import BaseModelConfig, build_base_model, write_retrofit_mix
    from dms.eval import DMSSystem, EvalConfig, EvalData, PolicySystem, evaluate_system
    from dms.eval import bench

    t_start = time.time()
    argl = list(argv if argv is not None else sys.argv[1:])
    # Notes are report text, not settings: leave them out of the recorded command.
    argl = [a for i, a in enumerate(argl) if a != "--note" and (i == 0 or argl[i - 1] != "--note")]
    command = "python scripts/bench_quality.py " + shlex.join(argl)
    progress = not args.no_progress
    work = Path(args.work)
    (work / "eval").mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus)
    base_dir = Path(args.base_model) if args.base_model else work / "base"
    timings = {}
    failures: dict[str, str] = {}
    try:  # checked before the build: a window that cannot reach a CR at --ppl-len fails in seconds, not minutes
        specs = run_specs(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

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
        if args.base_time_budget:
            over["time_budget_s"] = args.base_time_budget
        t = time.time()
        build_base_model(corpus, base_dir, BaseModelConfig(**over), seed=args.seed, device=device, progress=progress)
        timings["build_s"] = time.time() - t
    if not (base_dir / "config.json").is_file():
        print(f"error: no base model in {base_dir}; run the build stage or pass --base-model", file=sys.stderr)
        return 2

    # ---- retrofit -------------------------------------------------------------------------------------
    print("retrofits (nominal CR -> decision CR target): " + ", ".join(
        f"{s.name} {s.cr:g} -> {s.decision_target:.3g}" for s in specs), flush=True)
    runs_dir = work / "runs"
    if "retrofit" in args.stages:
        from dms.training import run_retrofit
        from transformers import AutoTokenizer

        mix = work / "retrofit_mix.jsonl.gz"
        if not mix.is_file():
            tok = AutoTokenizer.from_pretrained(str(base_dir))
            recipe = json.loads((base_dir / "build_info.json").read_text()).get("recipe", {}) \
                if (base_dir / "build_info.json").is_file() else {}
            base_mix = BaseModelConfig(**{k: v for k, v in recipe.items()
                                          if k in BaseModelConfig.__dataclass_fields__}).mix() if recipe else None
            write_retrofit_mix(corpus / "train.jsonl.gz", tok, mix, args.mix_docs, args.seq_len,
                               task_fraction=args.mix_task_fraction, seed=args.seed, mix=base_mix)
        for spec in specs:
            out = runs_dir / spec.name
            if (out / "summary.json").is_file():
                continue
            if args.retrofit_deadline is not None and time.time() - t_start > args.retrofit_deadline:
                print(f"[{spec.name}] skipped: --retrofit-deadline {args.retrofit_deadline:g}s passed", flush=True)
                continue
            t = time.time()
            cfg = bench.retrofit_config(spec, base_dir, mix, out, args.steps, args.seq_len, args.batch_size,
                                        args.attention, args.seed, progress, dtype=args.retrofit_dtype)
            try:
                summary = run_retrofit(cfg, log=print)
            except Exception as e:  # a single-shot GPU run keeps going: the report names what failed
                traceback.print_exc()
                failures[spec.name] = f"retrofit failed: {type(e).__name__}: {e}"
                _free_cuda()
                continue
            timings[f"retrofit_{spec.name}_s"] = time.time() - t
            print(f"[{spec.name}] {time.time() - t:.0f}s eval={json.dumps(summary.get('eval'))}", flush=True)

    # ---- eval -----------------------------------------------------------------------------------------
    ecfg = EvalConfig(lengths=args.eval_lengths, n_per_task=args.n_per_task, ppl_rows=args.ppl_rows,
                      ppl_len=args.ppl_len, batch_size=args.eval_batch, ppl_batch_size=args.ppl_batch,
                      ppl_rows_from=args.ppl_rows_from,
                      prefill_chunk=args.prefill_chunk, seed=args.eval_seed)
    baselines = baseline_systems(args)
    bnames = [name for name, _, _ in baselines]
    results: dict[str, dict] = {}
    for f in sorted((work / "eval").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("eval_config") != json.loads(json.dumps(ecfg.__dict__)):
            continue
        if r.get("policy") == "quest" and r.get("quest_metadata", "ignore") != args.quest_metadata:
            # Rows from before the metadata accounting counted only the selected pages.
            print(f"[eval {r['system']}] cached with quest_metadata={r.get('quest_metadata', 'ignore')}, not "
                  f"{args.quest_metadata}: not used", flush=True)
            continue
        results[r["system"]] = r
    if "eval" in args.stages:
        import dms

        t = time.time()
        base, tok = bench.load_plain(base_dir, device)
        data = EvalData.build(tok, corpus / "validation.jsonl.gz", ecfg)

        def run(system, teacher, fields=None):
            """Evaluate ``system`` unless <work>/eval holds it; ``fields`` (budget-matched rows) are recorded with it,
            and a cached row that shows other values is stale (evaluated again, overwriting only its own file)."""
            cached = results.get(system.name)
            if cached is not None and not args.re_eval:
                if fields is None or bench.row_has_fields(cached, fields):
                    return
                print(f"[eval {system.name}] cached at CR {cached.get('cr')}, now {fields.get('cr')}: evaluating again",
                      flush=True)
            if args.eval_deadline is not None and time.time() - t_start > args.eval_deadline:
                print(f"[eval {system.name}] skipped: --eval-deadline {args.eval_deadline:g}s passed", flush=True)
                return
            try:
                r = evaluate_system(system, teacher, tok, data, ecfg, progress=progress)
            except Exception as e:  # as for retrofits: record it, evaluate the others
                traceback.print_exc()
                failures[system.name] = f"evaluation failed: {type(e).__name__}: {e}"
                _free_cuda()
                return
            r.update(fields or {})
            results[system.name] = r
            (work / "eval" / f"{system.name}.json").write_text(json.dumps(r, indent=1))
            print(f"[eval {system.name}] ppl={r.get('ppl'):.3f} (+{100 * r.get('ppl_increase', 0):.1f}%) "
                  f"kl={r.get('kl'):.4f} memory_cr={r.get('memory_cr')} retrieval={r.get('retrieval_accuracy')} "
                  f"tasks={r.get('task_accuracy')}", flush=True)

        def run_dms(spec):
            exp = runs_dir / spec.name / "export"
            if not exp.is_dir() or (spec.name in results and not args.re_eval):
                return
            model, _ = dms.load(str(exp), device=device, dtype="float32", attention_impl=args.eval_attention)
            run(DMSSystem(model, spec.name), base)
            del model

        def run_matched(cr, spec):
            """Every baseline at the memory CR that the main run of nominal CR ``cr`` measured (its tokens held)."""
            d = results.get(spec.name) if spec is not None else None
            if not d or d.get("memory_cr") is None:
                print(f"[eval matched cr{cr:g}] skipped: no evaluated main DMS run with a memory CR", flush=True)
                return
            fields = bench.matched_fields(spec.name, d, cr)
            for name, policy, opts in baselines:
                run(PolicySystem(base, policy, fields["cr"], name=bench.matched_name(name, cr),
                                 rounding=fields["budget_rounding"], **opts), base, fields)

        # Order: what the summary needs first (full cache, then per CR from the largest: DMS, baselines at the nominal
        # budget, baselines at DMS's budget), ablations last.
        run(PolicySystem(base, "full"), base)
        main = {s.cr: s for s in specs if s.name == f"dms-cr{s.cr:g}"}
        for cr in sorted(args.crs, reverse=True):
            if cr in main:
                run_dms(main[cr])
            for name, policy, opts in baselines:
                run(PolicySystem(base, policy, cr, name=f"{name}@cr{cr:g}", **opts), base)
            if args.matched_baselines:
                run_matched(cr, main.get(cr))
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
            "command": command, "timings_s": {**timings, "total_s": time.time() - t_start},
            "quest_metadata": args.quest_metadata, "quest_page_sizes": args.quest_page_sizes,
            "failures": failures}, indent=1))

    # ---- report ---------------------------------------------------------------------------------------
    if "report" in args.stages:
        import transformers

        run_rows = {s.name: bench.read_losses(runs_dir / s.name) for s in specs}
        main_runs = {s.cr: s.name for s in specs if s.name == f"dms-cr{s.cr:g}"}
        targets = {s.name: s.decision_target for s in specs}
        summary = bench.summarize(results, args.crs, main_runs, bnames, run_rows, targets)
        build_info = json.loads((base_dir / "build_info.json").read_text()) if (base_dir / "build_info.json").is_file() else {}
        meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "python": sys.version.split()[0]},
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command}
        if (work / "run_meta.json").is_file():  # measured in an earlier command (e.g. on the GPU machine)
            measured = json.loads((work / "run_meta.json").read_text())
            timings = measured.pop("timings_s", timings)
            meta = {**measured, **({"report_command": command} if command != measured.get("command") else {})}
        meta["failures"] = {**meta.get("failures", {}), **failures}
        notes = list(args.note) + [f"FAILED {k}: {v}" for k, v in meta["failures"].items()]
        if notes:
            meta["notes"] = notes
        meta["context"] = args.ppl_len
        meta["quest_metadata"] = args.quest_metadata  # the report uses only Quest rows of this accounting
        if args.cr_definition == "memory":
            meta["targets_line"] = (
                f"CR = memory CR at {args.ppl_len:,} tokens for every system. Each DMS retrofit's compression loss "
                f"aims at the decision CR that leaves that memory with its window w, d = (T - w) / (T / CR - w): "
                + ", ".join(f"{s.name} (w {s.window}) {s.decision_target:.3g}" for s in specs) + ".")
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        imgs = []
        if results:
            abl = {s.name: s.cr for s in specs if s.name not in main_runs.values()}
            bench.plot_quality(results, args.crs, main_runs, bnames, docs / "quality_vs_budget.png", meta["command"], abl)
            bench.plot_kv_reads(results, args.crs, main_runs, bnames, docs / "quality_vs_kv_reads.png", meta["command"])
            imgs += ["quality_vs_budget.png", "quality_vs_kv_reads.png"]
        if any(run_rows.values()):
            bench.plot_training({k: v for k, v in run_rows.items() if v}, docs / "quality_training_curves.png", meta["command"])
            imgs.append("quality_training_curves.png")
        order = ["full"] + [main_runs[c] for c in args.crs if c in main_runs]
        order += [f"{b}@cr{c:g}" for c in args.crs for b in bnames]
        order += [bench.matched_name(b, c) for c in args.crs for b in bnames  # only those at DMS's current memory CR
                  if bench.matched_row_valid(results.get(bench.matched_name(b, c)), main_runs.get(c, ""),
                                             results.get(main_runs.get(c, ""), {}), c)]
        order += [s.name for s in specs if s.name not in order]
        runs_meta = {}
        for s in specs:
            sp = runs_dir / s.name / "summary.json"
            runs_meta[s.name] = {"spec": bench.spec_dict(s),
                                 "train_summary": json.loads(sp.read_text()) if sp.is_file() else None,
                                 "steps_to_target_cr": bench.steps_to_cr(run_rows.get(s.name, []), s.decision_target)}
        doc = {"summary": summary, **meta, "base_model": {k: v for k, v in build_info.items() if k != "loss_curve"},
               "retrofit": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
                            "window": args.window if args.window_share is None else
                            {f"{c:g}": main_window(args, c) for c in args.crs},
                            "window_share": args.window_share,
                            "window_share_at": {f"{c:g}": v for c, v in args.window_share_at.items()},
                            "attention": args.attention, "dtype": args.retrofit_dtype,
                            "cr_definition": args.cr_definition, "eval_context": args.ppl_len,
                            "eval_attention": args.eval_attention, "runs": runs_meta},
               "timings_s": timings,
               "rows": [{k: v for k, v in results[n].items() if k != "eval_config"} for n in order if n in results],
               "eval_config": {**ecfg.__dict__, "quest_metadata": args.quest_metadata,
                               "quest_page_sizes": args.quest_page_sizes, "matched_baselines": args.matched_baselines,
                               "matched_budget_rounding": bench.MATCHED_ROUNDING}}
        out_json = Path(args.json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(doc, indent=1) + "\n")
        rel = os.path.relpath(out_json, docs)
        section = bench.markdown_section(results, order, summary, meta, imgs).replace("results/quality.json", rel)
        bench.write_section(docs / "benchmarks.md", section)
        print(json.dumps(summary, indent=1))
    if args.results_copy:
        copy_results(work, base_dir, Path(args.results_copy))
    print(f"total {time.time() - t_start:.0f}s; timings {json.dumps({k: round(v) for k, v in timings.items()})}")
    return 0


def _free_cuda():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_results(work: Path, base_dir: Path, dest: Path):
    """The small files of <work> that the report stage reads (no weights): enough to regenerate the report."""
    import shutil

    files = [*sorted((work / "eval").glob("*.json")), work / "run_meta.json"]
    for run in sorted((work / "runs").glob("*")):
        files += [run / "losses.jsonl", run / "summary.json", run / "config.json"]
    for f in files:
        if f.is_file():
            target = dest / f.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    if (base_dir / "build_info.json").is_file():
        (dest / "base").mkdir(parents=True, exist_ok=True)
        shutil.copy2(base_dir / "build_info.json", dest / "base" / "build_info.json")
        shutil.copy2(base_dir / "config.json", dest / "base" / "config.json")


if __name__ == "__main__":
    sys.exit(main())
