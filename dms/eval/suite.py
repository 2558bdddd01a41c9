"""The evaluation suite: perplexity/KL to the teacher, compression ratios, generation accuracy and KV traffic.

A *system* is a model plus the way its KV cache is managed:

- :class:`DMSSystem`: a retrofitted model (``dms.load``); perplexity under the hard inference mask
  (evict iff ``l > 0``, exactly what :class:`dms.DMSCache` keeps), generation through a ``DMSCache``;
- :class:`PolicySystem`: a plain model with a training-free policy from :mod:`dms.eval.baselines`
  at ``budget = context // CR`` (``CR`` may be fractional; ``rounding="ceil"`` rounds up instead, for
  baselines matched to the tokens a DMS run held).

:func:`evaluate_system` returns one JSON-able dict: ``ppl``, ``teacher_ppl``, ``ppl_increase`` (fraction),
``kl`` (teacher || system, nats/token), ``decision_cr`` and ``memory_cr`` (overall, per layer, per head:
always named), task accuracies, ``peak_tokens_held`` and ``decode_kv_reads`` (KV entries of one KV head
read during generation, summed over layers, rows and steps; Quest's include its page metadata, one
token-equivalent per page, reported also as ``quest_metadata_reads``, with its ``page_size`` and ``quest_metadata``
accounting). A policy system with ``rounding="ceil"`` also records ``budget_rounding`` and ``budget_tokens`` (its
budget at the ``ppl_len`` perplexity rows).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .baselines import POLICIES, PolicyCache, prepare_policy_model
from .tasks import TASKS, Example, TaskBuilder, answer_correct, read_corpus, token_stream


PPL_ROW_SOURCES = ("stream", "documents")


@dataclass
class EvalConfig:
    """What :func:`evaluate_system` measures.

    Attributes:
        lengths: prompt lengths (tokens) of the generation tasks.
        n_per_task: examples per (task, length).
        depths: passkey needle depths (fractions of the filler), cycled over the examples.
        n_keys: facts in a multi-key recall prompt; hops: variable-tracking chain links.
        ppl_rows, ppl_len: validation rows ``[ppl_len]`` for perplexity and KL (at most ``ppl_rows``; a number
            larger than the split holds takes every row it has).
        ppl_rows_from: where perplexity rows come from. ``stream`` (default): the validation documents joined
            with EOS and cut into consecutive rows, so a row may span several documents (standard packed
            perplexity). ``documents``: consecutive ``ppl_len`` slices that lie inside one document (documents
            shorter than ``ppl_len`` give none), so all far context a cache policy drops is the same document's:
            the long-context perplexity of PG-19-style evaluations.
        batch_size: rows per forward (task prompts; perplexity rows too unless ``ppl_batch_size`` is set).
        ppl_batch_size: perplexity rows per forward (None: ``batch_size``); the eager DMS reference builds
            ``[B, H, T, T]`` fp32 scores, so long rows want a smaller batch than generation does.
        prefill_chunk: prompt tokens per cache call during generation (the same for every system, so peak
            tokens held compare).
        max_new_tokens: greedy tokens generated per answer.
        seed: task seed (prompts, needles, values).
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    n_per_task: int = 16
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    n_keys: int = 4
    hops: int = 2
    ppl_rows: int = 8
    ppl_len: int = 2048
    ppl_rows_from: str = "stream"
    batch_size: int = 8
    ppl_batch_size: int | None = None
    prefill_chunk: int = 256
    max_new_tokens: int = 8
    seed: int = 1234

    def __post_init__(self):
        for name in ("n_per_task", "ppl_len", "batch_size", "prefill_chunk", "max_new_tokens", "n_keys"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        if self.ppl_batch_size is not None and (isinstance(self.ppl_batch_size, bool)
                                                or not isinstance(self.ppl_batch_size, int) or self.ppl_batch_size < 1):
            raise ValueError(f"ppl_batch_size must be an integer >= 1 or None; got {self.ppl_batch_size!r}")
        if self.ppl_rows_from not in PPL_ROW_SOURCES:
            raise ValueError(f"ppl_rows_from must be one of {PPL_ROW_SOURCES}; got {self.ppl_rows_from!r}")
        if self.ppl_rows < 0 or self.hops < 0:
            raise ValueError(f"ppl_rows and hops must be >= 0; got {self.ppl_rows}, {self.hops}")
        if not self.lengths or any(int(L) < 64 for L in self.lengths):
            raise ValueError(f"lengths must be a non-empty list of prompt lengths >= 64 tokens; got {self.lengths}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1]; got {self.depths}")


@dataclass
class EvalData:
    """Validation rows for perplexity and task examples, shared by every system of one comparison."""

    rows: torch.Tensor  # [N, ppl_len]
    examples: list[Example]

    @classmethod
    def build(cls, tokenizer, corpus_file, cfg: EvalConfig, max_docs: int | None = None) -> "EvalData":
        texts = read_corpus(corpus_file, max_docs)
        stream = token_stream(tokenizer, texts)
        if cfg.ppl_rows_from == "documents":
            rows = document_rows(tokenizer, texts, cfg.ppl_len, cfg.ppl_rows)
            if cfg.ppl_rows and rows.shape[0] < 1:
                raise ValueError(f"no document of {corpus_file} has ppl_len={cfg.ppl_len} tokens; use shorter rows or "
                                 f"ppl_rows_from='stream'")
        else:
            n = min(cfg.ppl_rows, (stream.numel() - 1) // cfg.ppl_len)
            if cfg.ppl_rows and n < 1:
                raise ValueError(f"{corpus_file} has {stream.numel()} tokens, fewer than ppl_len={cfg.ppl_len}")
            rows = stream[: n * cfg.ppl_len].view(n, cfg.ppl_len) if n else torch.zeros(0, cfg.ppl_len, dtype=torch.long)
        builder = TaskBuilder(tokenizer, stream, seed=cfg.seed)
        examples = builder.suite([int(L) for L in cfg.lengths], cfg.n_per_task, cfg.depths, cfg.n_keys, cfg.hops)
        return cls(rows, examples)


def document_rows(tokenizer, texts: list[str], length: int, limit: int) -> torch.Tensor:
    """``[N, length]`` int64: consecutive ``length``-token slices of each document (no special tokens), in document
    order, at most ``limit``; a document's tail shorter than ``length`` is left out, so no row crosses a document
    boundary."""
    out: list[list[int]] = []
    for i in range(0, len(texts), 64):
        if len(out) >= limit:
            break
        for ids in tokenizer(texts[i:i + 64], add_special_tokens=False, return_attention_mask=False)["input_ids"]:
            out += [ids[s:s + length] for s in range(0, len(ids) - length + 1, length)]
    out = out[:limit]
    return torch.tensor(out, dtype=torch.long) if out else torch.zeros(0, length, dtype=torch.long)


BUDGET_ROUNDING = ("floor", "ceil")


def policy_budget(context: int, cr: float, rounding: str = "floor") -> int:
    """Tokens held per ``(row, KV head)`` by a training-free policy at CR ``cr`` for ``context`` tokens:
    ``max(1, context // cr)`` (``"floor"``) or ``max(1, ceil(context / cr - 1e-6))`` (``"ceil"``; see
    :class:`PolicySystem`)."""
    if rounding == "ceil":
        return max(1, math.ceil(context / cr - 1e-6))
    if rounding == "floor":
        return max(1, int(context // cr))
    raise ValueError(f"unknown budget rounding {rounding!r}; choose one of {BUDGET_ROUNDING}")


class PolicySystem:
    """A plain model with a training-free KV policy at a budget of ``context / cr`` tokens (``full``: no eviction).

    ``cr`` may be any real number >= 1 (e.g. the memory CR a DMS run achieved, 2.18). The budget, tokens held per
    ``(row, KV head)`` for a ``context``-token prompt or perplexity row, is an integer, rounded as ``rounding`` says:

    - ``"floor"`` (default, the nominal comparison): ``max(1, context // cr)``; for ``cr = 2, 4, 8`` and power-of-two
      contexts exactly ``context / cr``.
    - ``"ceil"`` (the budget-matched comparison of scripts/bench_quality.py): ``ceil(context / cr)``, computed as
      ``ceil(context / cr - 1e-6)`` so that float noise in ``cr = T / held`` does not add a token. With ``cr`` the
      memory CR a DMS run measured on ``T``-token rows (``T / cr`` = the mean tokens it held per row, layer and KV
      head), the baseline holds that mean rounded up: never fewer tokens than DMS, at most one more.

    ``opts`` go to :class:`dms.eval.baselines.PolicyCache` (e.g. ``page_size``, ``quest_metadata``); for Quest
    the resolved ``page_size`` and ``quest_metadata`` accounting are kept in ``quest_settings`` (recorded in results).
    """

    def __init__(self, model, policy: str, cr: float = 1.0, name: str | None = None, rounding: str = "floor", **opts):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        if not cr >= 1:
            raise ValueError(f"cr must be >= 1; got {cr}")
        if rounding not in BUDGET_ROUNDING:
            raise ValueError(f"unknown budget rounding {rounding!r}; choose one of {BUDGET_ROUNDING}")
        probe = PolicyCache(0, policy, 1 << 30, **opts)  # checks opts now rather than at the first evaluation
        self.quest_settings = ({"page_size": probe.page_size, "quest_metadata": probe.quest_metadata}
                               if policy == "quest" else None)
        self.model = prepare_policy_model(model)
        self.policy, self.cr, self.opts, self.rounding = policy, float(cr), opts, rounding
        self.name = name or (policy if policy == "full" else f"{policy}@cr{cr:g}")

    def budget(self, context: int) -> int | None:
        """Tokens held per ``(row, KV head)`` for ``context`` tokens (None for ``full``); see the class docstring."""
        return None if self.policy == "full" else policy_budget(context, self.cr, self.rounding)

    def new_cache(self, context: int, dense_prefill: bool = False) -> PolicyCache:
        c = PolicyCache(self.model.config.num_hidden_layers, self.policy, self.budget(context), **self.opts)
        c.dense_prefill = dense_prefill
        return c

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, dict]:
        cache = self.new_cache(ids.shape[1])
        outs = []
        for s in range(0, ids.shape[1], chunk):
            outs.append(self.model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits.float())
        st = cache.stats()
        return torch.cat(outs, 1), {"held": st["tokens_held"], "seen": st["tokens_seen"]}


class DMSSystem:
    """A DMS-retrofitted model: hard decisions, no noise (DESIGN.md inference semantics)."""

    def __init__(self, model, name: str = "dms"):
        from ..patching import dms_state

        self.model, self.name = model, name
        self.state = dms_state(model)
        self.window = self.state.config.window

    def new_cache(self, context: int, dense_prefill: bool = False):
        from ..cache import DMSCache

        return DMSCache(self.model)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, dict]:
        logits = self.model(input_ids=ids, use_cache=False).logits.float()
        return logits, dict(self.state.records)


@torch.no_grad()
def greedy_generate(model, ids: torch.Tensor, cache, max_new_tokens: int, prefill_chunk: int) -> torch.Tensor:
    """Prefill ``ids [B, T]`` in chunks through ``cache``, then decode greedily; returns ``[B, max_new_tokens]``."""
    out = None
    for s in range(0, ids.shape[1], prefill_chunk):
        out = model(input_ids=ids[:, s:s + prefill_chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)
    toks = [nxt]
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
        toks.append(nxt)
    return torch.stack(toks, 1)


def _dms_cache_traffic(cache, n_prefill_calls: int, batch: int) -> dict:
    """KV reads during decoding and peak tokens held for a :class:`dms.DMSCache` (per KV head, all layers)."""
    reads = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        hkv = layer.keys.shape[1]
        h = layer.held_history
        # Each decode call reads what the previous call left held plus its own new key.
        reads += sum(h[i - 1] + batch * hkv for i in range(n_prefill_calls, len(h)))
    st = cache.stats()
    return {"decode_kv_reads": reads, "peak_tokens_held": st.get("peak_tokens_held", 0),
            "memory_cr": st.get("memory_cr", 1.0), "tokens_held": st.get("tokens_held", 0),
            "tokens_seen": st.get("tokens_seen", 0)}


class _DecisionTally:
    """Accumulates per-layer/per-head evictions (decision CR) and end-of-row holdings (memory CR)."""

    def __init__(self, window: int):
        self.window = window
        self.ev: dict[int, torch.Tensor] = {}
        self.cnt: dict[int, float] = {}
        self.held: dict[int, torch.Tensor] = {}
        self.seen = 0.0

    def add(self, records: dict, T: int, B: int):
        for li, r in records.items():
            ev = r["evicted"].detach().float().cpu()
            self.ev[li] = self.ev.get(li, 0) + ev
            self.cnt[li] = self.cnt.get(li, 0.0) + float(r["count"])
            mask = r["evict_mask"]  # [B, T, Hkv], index k = decision about key k
            pos = torch.arange(T, device=mask.device)
            in_window = (T - pos) <= self.window  # as the cache prunes: no later query can see it
            held = (in_window[None, :, None] | ~mask).sum(dim=(0, 1)).float().cpu()  # [Hkv]
            self.held[li] = self.held.get(li, 0) + held
        self.seen += B * T

    def result(self) -> dict:
        layers = sorted(self.ev)
        if not layers:
            return {}

        def dcr(frac):
            return 1.0 / max(1.0 - float(frac), 1e-9)

        per_head_d = [[dcr(f) for f in (self.ev[li] / max(self.cnt[li], 1.0)).tolist()] for li in layers]
        per_layer_d = [dcr(float(self.ev[li].mean()) / max(self.cnt[li], 1.0)) for li in layers]
        tot_ev = sum(float(self.ev[li].sum()) for li in layers)
        tot_n = sum(self.cnt[li] * self.ev[li].numel() for li in layers)
        per_head_m = [(self.seen / self.held[li].clamp(min=1)).tolist() for li in layers]
        per_layer_m = [self.seen * self.held[li].numel() / max(float(self.held[li].sum()), 1.0) for li in layers]
        tot_held = sum(float(self.held[li].sum()) for li in layers)
        tot_seen = self.seen * sum(self.held[li].numel() for li in layers)
        return {"decision_cr": dcr(tot_ev / max(tot_n, 1.0)), "decision_cr_per_layer": per_layer_d,
                "decision_cr_per_head": per_head_d, "memory_cr": tot_seen / max(tot_held, 1.0),
                "memory_cr_per_layer": per_layer_m, "memory_cr_per_head": per_head_m}


@torch.no_grad()
def perplexity_and_kl(system, teacher, rows: torch.Tensor, cfg: EvalConfig, progress=None) -> dict:
    """Perplexity of ``system`` and of the teacher, KL(teacher || system) per token, and the achieved CRs; also
    each row's mean NLL (``row_nll``, ``row_nll_teacher``, in row order) for paired comparisons between systems."""
    dev = next(system.model.parameters()).device
    system.model.eval()
    teacher.eval()
    nll_s = nll_t = kl = 0.0
    n_tok = 0
    row_s: list[float] = []
    row_t: list[float] = []
    tally = _DecisionTally(system.window) if isinstance(system, DMSSystem) else None
    held = seen = 0
    bs = cfg.ppl_batch_size or cfg.batch_size
    for s in range(0, rows.shape[0], bs):
        ids = rows[s:s + bs].to(dev)
        B, T = ids.shape
        t_logits = teacher(input_ids=ids, use_cache=False).logits.float()
        s_logits, info = system.logits(ids, cfg.prefill_chunk)
        tl = torch.log_softmax(t_logits[:, :-1], -1)
        sl = torch.log_softmax(s_logits[:, :-1], -1)
        tgt = ids[:, 1:, None]
        # summed NLL of each row, fetched once: the totals and the per-row means both come from it
        rt = (-tl.gather(-1, tgt).squeeze(-1).sum(-1)).tolist()
        rs = (-sl.gather(-1, tgt).squeeze(-1).sum(-1)).tolist()
        nll_t += sum(rt)
        nll_s += sum(rs)
        row_t += [v / tgt.shape[1] for v in rt]
        row_s += [v / tgt.shape[1] for v in rs]
        kl += float((tl.exp() * (tl - sl)).sum())
        n_tok += tgt.numel()
        if tally is not None:
            tally.add(info, T, B)
        else:
            held += info["held"]
            seen += info["seen"]
        if progress is not None:
            progress.update(1)
    out = {"ppl": math.exp(nll_s / max(n_tok, 1)), "teacher_ppl": math.exp(nll_t / max(n_tok, 1)),
           "kl": kl / max(n_tok, 1), "ppl_tokens": n_tok,
           # Mean NLL per row, in row order (the same rows for every system), for paired comparisons
           # (dms.eval.bench.paired_ppl_margin).
           "row_nll": row_s, "row_nll_teacher": row_t}
    out["ppl_increase"] = out["ppl"] / out["teacher_ppl"] - 1.0
    if tally is not None:
        out.update(tally.result())
    else:
        nl = system.model.config.num_hidden_layers
        out["memory_cr"] = seen * nl * _num_kv(system.model) / max(held, 1) if held else 1.0
        out["decision_cr"] = None  # training-free policies make no per-token decisions
    return out


def _num_kv(model) -> int:
    c = model.config
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


@torch.no_grad()
def run_tasks(system, tokenizer, examples: list[Example], cfg: EvalConfig, progress=None) -> dict:
    """Greedy answers for every example; accuracy per task and length, KV traffic during generation."""
    dev = next(system.model.parameters()).device
    system.model.eval()
    groups: dict[tuple[str, int], list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.task, len(ex.input_ids)), []).append(ex)
    per, rows = {}, []
    reads = peak = 0
    held = seen = 0
    quest = {}  # Quest: page-metadata reads and over-budget queries, summed like the reads
    for (task, L), exs in sorted(groups.items()):
        correct = 0
        for s in range(0, len(exs), cfg.batch_size):
            batch = exs[s:s + cfg.batch_size]
            ids = torch.tensor([e.input_ids for e in batch], dtype=torch.long, device=dev)
            cache = system.new_cache(L, dense_prefill=True)
            gen = greedy_generate(system.model, ids, cache, cfg.max_new_tokens, cfg.prefill_chunk)
            if isinstance(system, DMSSystem):
                st = _dms_cache_traffic(cache, math.ceil(L / cfg.prefill_chunk), len(batch))
            else:
                st = cache.stats()
            reads += st["decode_kv_reads"]
            for k in ("quest_metadata_reads", "quest_over_budget_queries"):
                if k in st:
                    quest[k] = quest.get(k, 0) + st[k]
            peak = max(peak, st["peak_tokens_held"] / len(batch))
            held += st["tokens_held"]
            seen += st["tokens_seen"]
            for e, g in zip(batch, gen.tolist()):
                text = tokenizer.decode(g, skip_special_tokens=True)
                ok = answer_correct(text, e.answer)
                correct += ok
                rows.append({"task": task, "length": L, "answer": e.answer, "generated": text, "correct": bool(ok),
                             **e.meta})
            if progress is not None:
                progress.update(1)
        per[f"{task}@{L}"] = correct / len(exs)
    acc = {t: _mean([v for k, v in per.items() if k.startswith(t + "@")]) for t in TASKS}
    # 1/0 per example and task, in example order (the same examples for every system): for paired comparisons
    # (dms.eval.bench.paired_retrieval_margin).
    by_task = {t: [int(r["correct"]) for r in rows if r["task"] == t] for t in TASKS}
    retrieval = _mean([acc[t] for t in ("passkey", "multikey") if acc.get(t) is not None])
    layers = system.model.config.num_hidden_layers
    return {"accuracy": per, "task_accuracy": acc, "retrieval_accuracy": retrieval,
            "mean_accuracy": _mean([a for a in acc.values() if a is not None]),
            "decode_kv_reads": reads, **quest, "peak_tokens_held_per_row": peak,
            "generation_memory_cr": seen * layers * _num_kv(system.model) / max(held, 1),
            "correct_by_task": {t: v for t, v in by_task.items() if v}, "answers": rows}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def evaluate_system(system, teacher, tokenizer, data: EvalData, cfg: EvalConfig, progress: bool = True,
                    keep_answers: bool = False) -> dict:
    """Everything :mod:`dms.eval` measures for one system, as a JSON-able dict (see module docstring)."""
    from tqdm.auto import tqdm

    n_ppl = math.ceil(data.rows.shape[0] / (cfg.ppl_batch_size or cfg.batch_size))
    groups: dict = {}
    for ex in data.examples:
        groups[(ex.task, len(ex.input_ids))] = groups.get((ex.task, len(ex.input_ids)), 0) + 1
    n_gen = sum(math.ceil(v / cfg.batch_size) for v in groups.values())
    bar = tqdm(total=n_ppl + n_gen, desc=f"eval {system.name}", disable=not progress, dynamic_ncols=True)
    res = {"system": system.name}
    if isinstance(system, PolicySystem):
        res.update({"policy": system.policy, "cr": system.cr, **(system.quest_settings or {})})
        if system.rounding != "floor":  # rows of the default rounding keep their older layout
            res.update({"budget_rounding": system.rounding, "budget_tokens": system.budget(cfg.ppl_len)})
    else:
        res.update({"policy": "dms", "window": system.window})
    if data.rows.shape[0]:
        res.update(perplexity_and_kl(system, teacher, data.rows, cfg, bar))
    if data.examples:
        t = run_tasks(system, tokenizer, data.examples, cfg, bar)
        if not keep_answers:
            t.pop("answers")
        res.update(t)
    bar.close()
    res["eval_config"] = asdict(cfg)
    return res
