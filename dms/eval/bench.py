"""Building blocks of the quality benchmark (scripts/bench_quality.py): retrofit runs, summary, plots, table."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def load_plain(path: str | Path, device: str, dtype=torch.float32):
    """A plain (not retrofitted) causal LM and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, tok


def full_cache_accuracy(model_dir, val_file, lengths, n: int, device: str | None = None, batch_size: int = 8) -> dict:
    """Task accuracy of a plain base model with its full cache (the sanity check of a base model build)."""
    from .suite import EvalConfig, EvalData, PolicySystem, run_tasks

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_plain(model_dir, device)
    cfg = EvalConfig(lengths=list(lengths), n_per_task=n, ppl_rows=0, batch_size=batch_size)
    data = EvalData.build(tok, val_file, cfg)
    r = run_tasks(PolicySystem(model, "full"), tok, data.examples, cfg)
    r.pop("answers")
    return r


def decision_target(memory_cr: float, context: int, window: int) -> float:
    """The decision CR whose evictions leave memory CR ``memory_cr`` at the end of a ``context``-token row.

    DESIGN.md: a row of ``T`` tokens holds its last ``window`` tokens plus the kept share ``1 / d`` of the
    ``T - window`` older ones, so memory CR ``= T / (w + (T - w) / d)`` and ``d = (T - w) / (T / CR - w)``
    (``d = CR`` for window 0). Raises ``ValueError`` when the window alone exceeds the budget ``T / CR``.
    """
    if not memory_cr >= 1:
        raise ValueError(f"memory CR must be >= 1; got {memory_cr}")
    if context < 1 or window < 0:
        raise ValueError(f"need context >= 1 and window >= 0; got context {context}, window {window}")
    budget = context / memory_cr
    if window >= budget:
        raise ValueError(f"window {window} keeps more than the budget {budget:g} tokens of memory CR {memory_cr:g} at "
                         f"{context} tokens (memory CR <= T / window = {context / max(window, 1):g}); use a window "
                         f"< {budget:g} or evaluate longer rows")
    if window == 0:
        return float(memory_cr)
    return (context - window) / (budget - window)


@dataclass
class RunSpec:
    """One retrofit of the benchmark.

    ``cr`` is the run's nominal compression ratio (what it is compared at: the memory CR, or the decision CR
    with ``--cr-definition decision``); ``target_cr`` the decision CR its compression loss aims at (None: ``cr``).
    """

    name: str
    cr: float
    window: int
    retention: str = "adapter"
    trainable: str = "adapter"
    lr: float = 3e-3
    target_cr: float | None = None

    @property
    def decision_target(self) -> float:
        return self.cr if self.target_cr is None else self.target_cr


def retrofit_config(spec: RunSpec, base_dir, data_file, out_dir, steps: int, seq_len: int, batch_size: int,
                    attention_impl: str, seed: int, progress: bool, dtype: str = "float32"):
    from ..training import RetrofitConfig

    return RetrofitConfig.from_dict({
        "model": {"name_or_path": str(base_dir), "dtype": dtype},
        "data": {"source": str(data_file), "seq_len": seq_len},
        "dms": {"window": spec.window, "retention": spec.retention, "attention_impl": attention_impl},
        "train": {"steps": steps, "cr": spec.decision_target, "lr": spec.lr, "batch_size": batch_size,
                  "output": str(out_dir),
                  "overwrite": True, "save_every": steps, "log_every": 10, "eval_batches": 2,
                  "trainable": spec.trainable, "seed": seed, "progress": progress},
    })


def read_losses(run_dir) -> list[dict]:
    p = Path(run_dir) / "losses.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def steps_to_cr(rows: list[dict], target: float, tol: float = 0.95) -> int | None:
    """First training step whose (noisy, per-batch) decision CR reaches ``tol * target``; None if never."""
    for r in rows:
        if r.get("decision_cr", 0) >= tol * target:
            return int(r["step"])
    return None


def _frac(a, b):
    return None if a is None or b in (None, 0) else a / b


MATCHED_ROUNDING = "ceil"  # PolicySystem rounding of the budget-matched baselines (never fewer tokens than DMS)


def matched_name(baseline: str, cr: float) -> str:
    """System name of ``baseline`` evaluated at the memory CR that the main DMS run of nominal CR ``cr`` achieved
    (``sliding_window@cr2-matched``); never equal to a nominal name (``sliding_window@cr2``)."""
    return f"{baseline}@cr{cr:g}-matched"


def matched_fields(dms_name: str, dms_row: dict, cr: float) -> dict:
    """What a budget-matched baseline row records besides its evaluation, and what a cached one must still show to
    be reused: the DMS run it is matched to, that run's nominal CR, and (``cr``) the memory CR that run measured."""
    return {"matched_to": dms_name, "nominal_cr": float(cr), "cr": dms_row.get("memory_cr"),
            "budget_rounding": MATCHED_ROUNDING}


def row_has_fields(row: dict | None, fields: dict) -> bool:
    """``row`` records every one of ``fields`` (see :func:`matched_fields`): ``cr`` to a relative 1e-12, the rest
    exactly. The one staleness rule for budget-matched rows (the report's and scripts/bench_quality.py's cache)."""
    if not row:
        return False
    return (all(row.get(k) == v for k, v in fields.items() if k != "cr")
            and (fields.get("cr") is None) == (row.get("cr") is None)
            and (fields.get("cr") is None or math.isclose(row["cr"], fields["cr"], rel_tol=1e-12)))


def matched_row_valid(row: dict | None, dms_name: str, dms_row: dict, cr: float) -> bool:
    """True when ``row`` (a cached ``<baseline>@crC-matched`` evaluation) was run at the memory CR that ``dms_row``
    reports now (False when the DMS run was re-evaluated since, or is missing)."""
    if not dms_row or dms_row.get("memory_cr") is None:
        return False
    return row_has_fields(row, matched_fields(dms_name, dms_row, cr))


def paired_ppl_margin(a: dict | None, b: dict | None) -> tuple[float, float | None, int] | None:
    """System ``a`` against system ``b`` on the same perplexity rows, paired by row (their ``row_nll``).

    Returns ``(ppl_a / ppl_b - 1, standard error, rows)``: the first is exact (rows have equal length, so a
    perplexity is exp of the mean row NLL); the standard error is that of the mean per-row NLL difference, which
    is the first figure's to first order (None for a single row). None when either lacks rows or they differ in
    number (evaluated on different rows).
    """
    x, y = (a or {}).get("row_nll"), (b or {}).get("row_nll")
    if not x or not y or len(x) != len(y):
        return None
    d = [p - q for p, q in zip(x, y)]
    n = len(d)
    m = sum(d) / n
    se = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1) / n) if n > 1 else None
    return math.expm1(m), se, n


RETRIEVAL_TASKS = ("passkey", "multikey")  # what retrieval_accuracy averages (dms.eval.suite.run_tasks)


def paired_retrieval_margin(a: dict | None, b: dict | None, base: float | None) -> tuple[float, float, int] | None:
    """System ``a``'s retrieval accuracy minus system ``b``'s on the same task examples, paired by example (their
    ``correct_by_task``), as a fraction of the base's accuracy ``base`` (the unit of the report's retrieval ratios).

    Returns ``(margin, standard error, examples)``. Retrieval accuracy is the mean over the retrieval tasks of each
    task's accuracy, so the margin is the mean over tasks of the per-example mean difference, and its variance is
    the sum over tasks of (sample variance of the differences / examples) over (tasks squared); exact for one prompt
    length per task (or the same number of examples at each). None when either lacks the examples, they differ in
    number, or ``base`` is missing or 0.
    """
    x, y = (a or {}).get("correct_by_task") or {}, (b or {}).get("correct_by_task") or {}
    tasks = [t for t in RETRIEVAL_TASKS if x.get(t) and y.get(t)]
    if not base or not tasks or any(len(x[t]) != len(y[t]) for t in tasks) \
            or any(t in x or t in y for t in RETRIEVAL_TASKS if t not in tasks):
        return None
    m = var = 0.0
    n = 0
    for t in tasks:
        d = [p - q for p, q in zip(x[t], y[t])]
        k = len(d)
        mt = sum(d) / k
        m += mt
        var += (sum((v - mt) ** 2 for v in d) / (k - 1) / k) if k > 1 else 0.0
        n += k
    T = len(tasks)
    return m / T / base, math.sqrt(var) / T / base, n


def summarize(results: dict[str, dict], crs: list[float], main_runs: dict[float, str], baselines: list[str],
              run_rows: dict[str, list[dict]], targets: dict[str, float] | None = None) -> dict:
    """The summary object of docs/results/quality.json (fractions, not percents).

    ``targets`` maps a run name to the decision CR its retrofit aimed at (default: its nominal CR);
    ``steps_to_crX`` is the first step whose decision CR reached 95% of it.

    Nominal comparison (``best_baseline_*_crX``, ``dms_beats_every_baseline_crX``): the baselines ``<b>@crX`` hold
    ``context / X`` tokens. Budget-matched comparison (the same keys with ``_matched``): the baselines
    ``<b>@crX-matched`` (:func:`matched_name`) were run at the memory CR that the main DMS run of CR X measured,
    ``matched_budget_crX`` (only rows run at its current value count, :func:`matched_row_valid`);
    ``dms_beats_every_baseline_crX_matched`` is None when no such row exists.

    ``ppl_margin_crX(_matched)`` is DMS's perplexity over that of the best baseline by perplexity, minus 1, paired
    by row (:func:`paired_ppl_margin`; below 0: DMS better), and ``ppl_margin_se_crX(_matched)`` its standard error
    over the ``ppl_rows`` rows: how far the perplexity verdict is from noise. ``retrieval_margin_crX(_matched)``
    and ``retrieval_margin_se_crX(_matched)`` do the same for retrieval against the best baseline by retrieval,
    paired by task example (:func:`paired_retrieval_margin`, in units of the base's accuracy; above 0: DMS better).
    """
    targets = targets or {}
    base = results.get("full", {})
    base_ret = base.get("retrieval_accuracy")

    def dms(cr):
        return results.get(main_runs.get(cr, ""), {})

    def rows(cr, matched):
        if not matched:
            return [(b, results[f"{b}@cr{cr:g}"]) for b in baselines if f"{b}@cr{cr:g}" in results]
        name, d = main_runs.get(cr, ""), dms(cr)
        return [(b, results[matched_name(b, cr)]) for b in baselines
                if matched_row_valid(results.get(matched_name(b, cr)), name, d, cr)]

    def best_baseline(cr, key, higher, matched=False):
        vals = [(r.get(key), b) for b, r in rows(cr, matched)]
        vals = [v for v in vals if v[0] is not None]
        if not vals:
            return None, None
        return (max if higher else min)(vals)

    def beats(d, rs):
        return [d.get("ppl_increase", math.inf) <= r.get("ppl_increase", math.inf)
                and (d.get("retrieval_accuracy") or 0) >= (r.get("retrieval_accuracy") or 0) for _, r in rs]

    s = {}
    for cr in crs:
        tag = f"cr{cr:g}"
        d = dms(cr)
        s[f"ppl_increase_{tag}"] = d.get("ppl_increase")
        s[f"retrieval_ratio_{tag}"] = _frac(d.get("retrieval_accuracy"), base_ret)
        nominal = rows(cr, False)
        bp, bpn = best_baseline(cr, "ppl_increase", higher=False)
        br, brn = best_baseline(cr, "retrieval_accuracy", higher=True)
        s[f"best_baseline_ppl_increase_{tag}"] = bp
        s[f"best_baseline_ppl_increase_{tag}_policy"] = bpn
        _put_paired(s, "ppl_margin", tag, paired_ppl_margin(d, dict(nominal).get(bpn)))
        s[f"best_baseline_retrieval_ratio_{tag}"] = _frac(br, base_ret)
        s[f"best_baseline_retrieval_ratio_{tag}_policy"] = brn
        _put_paired(s, "retrieval_margin", tag, paired_retrieval_margin(d, dict(nominal).get(brn), base_ret))
        s[f"dms_memory_cr_{tag}"] = d.get("memory_cr")
        s[f"dms_decision_cr_{tag}"] = d.get("decision_cr")
        won = beats(d, nominal) if d else []
        s[f"dms_beats_every_baseline_{tag}"] = bool(won) and all(won)
        if main_runs.get(cr) in run_rows:
            s[f"steps_to_{tag}"] = steps_to_cr(run_rows[main_runs[cr]], targets.get(main_runs[cr], cr))
        matched = rows(cr, True)
        bp, bpn = best_baseline(cr, "ppl_increase", higher=False, matched=True)
        br, brn = best_baseline(cr, "retrieval_accuracy", higher=True, matched=True)
        s[f"best_baseline_ppl_increase_{tag}_matched"] = bp
        s[f"best_baseline_ppl_increase_{tag}_matched_policy"] = bpn
        _put_paired(s, "ppl_margin", tag + "_matched", paired_ppl_margin(d, dict(matched).get(bpn)))
        s[f"best_baseline_retrieval_ratio_{tag}_matched"] = _frac(br, base_ret)
        s[f"best_baseline_retrieval_ratio_{tag}_matched_policy"] = brn
        _put_paired(s, "retrieval_margin", tag + "_matched", paired_retrieval_margin(d, dict(matched).get(brn), base_ret))
        s[f"matched_budget_{tag}"] = matched[0][1]["cr"] if matched else None
        s[f"dms_beats_every_baseline_{tag}_matched"] = all(beats(d, matched)) if matched else None
    s["base_retrieval_accuracy"] = base_ret
    s["base_ppl"] = base.get("ppl")
    if base.get("row_nll"):
        s["ppl_rows"] = len(base["row_nll"])
    return s


def _put_paired(s: dict, key: str, tag: str, paired: tuple | None):
    """``<key>_<tag>`` and ``<key>_se_<tag>`` of :func:`summarize` from a ``paired_*_margin`` result (nothing when
    it is None: rows or examples missing)."""
    if paired is not None:
        s[f"{key}_{tag}"], s[f"{key}_se_{tag}"] = paired[0], paired[1]


def _series(results, prefix_fn, crs, key):
    xs, ys = [], []
    for cr in crs:
        r = results.get(prefix_fn(cr))
        if r is not None and r.get(key) is not None:
            xs.append(cr)
            ys.append(r[key])
    return xs, ys


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path, command: str):
    """Title the figure with the command that made it, write the PNG, free the figure."""
    import textwrap

    import matplotlib.pyplot as plt

    fig.suptitle("\n".join(textwrap.wrap(command, 180)), fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_quality(results: dict, crs: list[float], main_runs: dict[float, str], baselines: list[str], out_png: Path,
                 command: str, ablations: dict[str, float] | None = None):
    """Accuracy and perplexity increase vs KV compression (budget = context / CR), DMS vs every baseline; the
    budget-matched baseline rows (:func:`matched_name`) as hollow squares at the CR they were run at."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("retrieval_accuracy", "retrieval accuracy (passkey + multi-key)"),
              ("mean_accuracy", "mean task accuracy (incl. variable tracking)"),
              ("ppl_increase", "perplexity increase vs base (fraction)")]
    base = results.get("full", {})
    for ax, (key, title) in zip(axes, panels):
        xs, ys = _series(results, lambda c: main_runs.get(c, ""), crs, key)
        if xs:
            ax.plot(xs, ys, "o-", lw=2.5, color="black", label="DMS (retrofit)")
        any_matched = False
        for b in baselines:
            xs, ys = _series(results, lambda c, b=b: f"{b}@cr{c:g}", crs, key)
            color = ax.plot(xs, ys, "s--", label=b)[0].get_color() if xs else None
            mx, my = [], []  # budget-matched: at the memory CR the DMS run achieved
            for c in crs:
                r = results.get(matched_name(b, c))
                if (matched_row_valid(r, main_runs.get(c, ""), results.get(main_runs.get(c, ""), {}), c)
                        and r.get(key) is not None):
                    mx.append(r["cr"])
                    my.append(r[key])
            if mx:
                ax.plot(mx, my, "s", mfc="none", color=color, label=None if xs else f"{b} (matched)")
                any_matched = True
        if any_matched:
            ax.plot([], [], "s", mfc="none", color="gray", label="hollow: baseline at DMS's achieved memory CR")
        for name, cr in (ablations or {}).items():
            r = results.get(name)
            if r is not None and r.get(key) is not None:
                ax.plot([cr], [r[key]], "x", ms=9, mew=2, label=f"{name} (ablation)")
        if key != "ppl_increase" and base.get(key) is not None:
            ax.axhline(base[key], color="gray", ls=":", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xticks(crs, [f"{c:g}" for c in crs])
        ax.set_xlabel("compression ratio (KV budget = context / CR)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, out_png, command)


def plot_kv_reads(results: dict, crs: list[float], main_runs: dict, baselines: list[str], out_png: Path, command: str):
    """Retrieval accuracy vs KV entries read during generation (the axis Quest is compared on)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = {"DMS": [results.get(main_runs.get(c, "")) for c in crs]}
    for b in baselines:
        pts[b] = [results.get(f"{b}@cr{c:g}") for c in crs]
    pts["full cache"] = [results.get("full")]
    for name, rs in pts.items():
        rs = [r for r in rs if r and r.get("decode_kv_reads") is not None and r.get("retrieval_accuracy") is not None]
        if rs:
            ax.plot([r["decode_kv_reads"] for r in rs], [r["retrieval_accuracy"] for r in rs],
                    "o-" if name == "DMS" else "s--", label=name, lw=2.5 if name == "DMS" else 1)
    ax.set_xscale("log")
    ax.set_xlabel("KV entries read while generating answers (per KV head, all layers)")
    ax.set_ylabel("retrieval accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out_png, command)


def plot_training(run_rows: dict[str, list[dict]], out_png: Path, command: str):
    """Training curves per retrofit run: decision CR (achieved vs target) and KL."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, rows in run_rows.items():
        if not rows:
            continue
        st = [r["step"] for r in rows]
        line, = axes[0].plot(st, [r["decision_cr"] for r in rows], lw=1, label=name)
        axes[0].plot(st, [r["target_cr"] for r in rows], ls=":", color=line.get_color())
        axes[1].plot(st, [r["kl"] for r in rows], lw=1, label=name)
    axes[0].set_title("decision CR per step (dotted: target schedule)", fontsize=10)
    axes[0].set_yscale("log", base=2)
    axes[1].set_title("distillation KL per step", fontsize=10)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, out_png, command)


def _fmt(v, pct=False, digits=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if pct:
        return f"{100 * v:+.1f}%"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown_section(results: dict, order: list[str], summary: dict, meta: dict, images: list[str]) -> str:
    """The "Quality" section of docs/benchmarks.md."""
    lines = ["## Quality", "", f"Command: `{meta['command']}`  ", f"Device: {meta['device']}; "
             f"torch {meta['versions'].get('torch')}, transformers {meta['versions'].get('transformers')}; {meta['date']}.  ",
             "Raw rows and summary: [results/quality.json](results/quality.json).  "]
    if meta.get("report_command"):
        lines.append(f"Table, plots and JSON regenerated from that run's cached results (`<work>`) with: "
                     f"`{meta['report_command']}`  ")
    ctx = meta.get("context", 2048)
    lines += ["",
             "Budget for training-free baselines: tokens held per KV head = context / CR. DMS rows show the CR the "
             "retrofit *achieved* (decision CR = 1/(1 - evicted fraction); memory CR = tokens seen / tokens held at the "
             f"end of the {ctx:,}-token perplexity rows, window included). Quest keeps every token and limits only the "
             "reads (compare it on the KV-reads column)" + _quest_note(meta.get("quest_metadata", "count")), ""]
    if any(n.endswith("-matched") and n in results for n in order):
        lines += ["Rows `<baseline>@crC-matched` are the budget-matched comparison: the baseline runs at the memory "
                  "CR that dms-crC *achieved* (not at C), holding that run's mean tokens per row, layer and KV head "
                  "rounded up (ceil(context / memory CR)): never fewer tokens than DMS, at most one more.", ""]
    if meta.get("targets_line"):
        lines += [meta["targets_line"], ""]
    lines += [
             "| system | decision CR | memory CR | ppl | ppl increase | KL | passkey | multi-key | var. tracking | "
             "retrieval | KV reads (gen) | peak held / row |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in order:
        r = results.get(name)
        if r is None:
            continue
        ta = r.get("task_accuracy", {})
        lines.append(
            f"| {name} | {_fmt(r.get('decision_cr'))} | {_fmt(r.get('memory_cr'))} | {_fmt(r.get('ppl'))} | "
            f"{_fmt(r.get('ppl_increase'), pct=True)} | {_fmt(r.get('kl'))} | {_fmt(ta.get('passkey'))} | "
            f"{_fmt(ta.get('multikey'))} | {_fmt(ta.get('variable_tracking'))} | {_fmt(r.get('retrieval_accuracy'))} | "
            f"{_fmt(r.get('decode_kv_reads'))} | {_fmt(r.get('peak_tokens_held_per_row'))} |")
    lines += [""] + margins_table(summary, ctx)
    lines += ["", "Summary (fractions): " + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in summary.items()
                                                      if not k.endswith("_policy")), ""]
    lines += ["Targets:", ""] + [f"- {t}" for t in targets(summary)] + [""]
    lines += [f"Note: {n}  " for n in meta.get("notes", [])] + ([""] if meta.get("notes") else [])
    lines += [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _tags(summary: dict) -> list[str]:
    """``cr2``, ``cr4``, ... of the main CRs in ``summary``, in its order."""
    pre = "dms_beats_every_baseline_"
    return [k[len(pre):] for k in summary if k.startswith(pre) and not k.endswith("_matched")]


def margins_table(summary: dict, context: int) -> list[str]:
    """Markdown lines: DMS against the best baseline at each main CR, at the nominal budget (``context // CR``
    tokens) and, where it was measured, at the budget-matched one (DMS's own memory CR, tokens rounded up)."""
    from .suite import policy_budget

    def best(v, name):
        return "-" if v is None else f"{_fmt(v)} ({name})"

    def margin(a, b):
        return "-" if a is None or b is None else f"{a - b:+.3g}"

    out = ["DMS against the best training-free baseline (fractions; margin = DMS minus that baseline: below 0 is "
           "better for perplexity increase, above 0 for retrieval). *Nominal*: the baselines hold context / CR tokens "
           "per KV head. *Matched*: they run at the memory CR that the DMS row achieved, i.e. its tokens held "
           "(rounded up).", "",
           "*Paired ppl*: DMS's perplexity over that baseline's, minus 1, on the same rows, with its standard error over "
           "the rows (a margin within about two standard errors of 0 is a tie within noise). Where the evaluation kept "
           "each example's result, the retrieval margin carries its standard error too (+- se, paired by example).", "",
           "| CR | budget of the baselines | DMS ppl increase | best baseline ppl increase | ppl margin | "
           "paired ppl (+- se) | DMS retrieval ratio | best baseline retrieval ratio | retrieval margin | "
           "DMS beats every baseline |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag in _tags(summary):
        cr = float(tag[2:])
        dp, dr = summary.get(f"ppl_increase_{tag}"), summary.get(f"retrieval_ratio_{tag}")
        budgets = [("", f"nominal: CR {cr:g}, {policy_budget(context, cr):,} tokens")]
        m = summary.get(f"matched_budget_{tag}")
        if m is not None:
            budgets.append(("_matched", f"matched: CR {m:.2f} (DMS's), "
                                        f"{policy_budget(context, m, MATCHED_ROUNDING):,} tokens"))
        for sfx, label in budgets:
            bp = summary.get(f"best_baseline_ppl_increase_{tag}{sfx}")
            br = summary.get(f"best_baseline_retrieval_ratio_{tag}{sfx}")
            pm, pse = summary.get(f"ppl_margin_{tag}{sfx}"), summary.get(f"ppl_margin_se_{tag}{sfx}")
            paired = "-" if pm is None else f"{pm:+.3g}" + ("" if pse is None else f" +- {pse:.2g}")
            out.append(f"| {cr:g} | {label} | {_fmt(dp)} | "
                       f"{best(bp, summary.get(f'best_baseline_ppl_increase_{tag}{sfx}_policy'))} | {margin(dp, bp)} | "
                       f"{paired} | {_fmt(dr)} | {best(br, summary.get(f'best_baseline_retrieval_ratio_{tag}{sfx}_policy'))} | "
                       f"{margin(dr, br)}{_se(summary.get(f'retrieval_margin_se_{tag}{sfx}'))} | "
                       f"{_fmt(summary.get(f'dms_beats_every_baseline_{tag}{sfx}'))} |")
    return out


def _se(v) -> str:
    return "" if v is None else f" +- {v:.2g}"


def _quest_note(accounting: str) -> str:
    """The end of the table note: how Quest's KV reads are counted (``PolicyCache(quest_metadata=...)``)."""
    if accounting == "ignore":
        return (": its reads count only the selected pages (budget / page size pages), not the per-page key "
                "max/min metadata it scores them with (`--quest-metadata ignore`).")
    return ("; its reads include its page metadata (the per-page key max/min vectors: one token-equivalent per "
            "page), and its page selection is sized to the same reads budget (metadata + pages <= context / CR "
            "tokens per KV head). `quest` uses pages of 16 tokens, `quest-pN` pages of N.")


def targets(summary: dict) -> list[str]:
    """The issue's quality targets, each marked met / MISSED with the measured value."""
    def chk(name, key, ok):
        v = summary.get(key)
        if v is None:
            return f"{name}: not measured"
        return f"{name}: {'met' if ok(v) else 'MISSED'} ({_fmt(v)})"

    out = [chk("base model retrieval at full cache >= 0.90", "base_retrieval_accuracy", lambda v: v >= 0.9),
           chk("DMS ppl increase <= 3% at CR 4", "ppl_increase_cr4", lambda v: v <= 0.03),
           chk("DMS ppl increase <= 8% at CR 8", "ppl_increase_cr8", lambda v: v <= 0.08),
           chk("DMS retrieval at CR 8 >= 90% of base", "retrieval_ratio_cr8", lambda v: v >= 0.9),
           chk("CR 8 reached within 1,000 steps", "steps_to_cr8", lambda v: v <= 1000)]
    for tag in sorted(_tags(summary)):
        k = f"dms_beats_every_baseline_{tag}"
        out.append(f"DMS beats every baseline (ppl and retrieval) at {tag.upper()}, nominal budget (context / CR): "
                   f"{'met' if summary[k] else 'MISSED'}")
        if k + "_matched" in summary:
            v, m = summary[k + "_matched"], summary.get(f"matched_budget_{tag}")
            out.append(f"DMS beats every baseline (ppl and retrieval) at {tag.upper()}, budget-matched (baselines at "
                       f"DMS's memory CR {'-' if m is None else f'{m:.2f}'}): "
                       + ("not measured" if v is None else "met" if v else "MISSED"))
    return out


def write_section(md_path: Path, section: str, title: str = "## Quality"):
    """Replace (or append) the ``title`` section of ``md_path``, leaving other sections untouched."""
    text = md_path.read_text() if md_path.is_file() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.strip() == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(new)


def spec_dict(spec: RunSpec) -> dict:
    return asdict(spec)
