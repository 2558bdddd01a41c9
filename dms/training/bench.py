"""Scale-out benchmark helpers (``python -m dms.training.bench ...``); results in docs/results/scaleout.json.

    python -m dms.training.bench make-base runs/bench/qwen3-0.6b-shapes     # random Qwen3-0.6B shapes + data
    python -m dms.training.bench step-time runs/bench/qwen3-0.6b-shapes     # 1 GPU: DMS vs plain distillation
    python -m dms.training.bench profile-ops                                # CPU: ops per step, DMS extras by source
    python -m dms.training.bench throughput RUN_DIR [--skip 3]               # tokens/s from losses.jsonl
    python -m dms.training.bench curve-diff REF_RUN RESUMED_RUN              # max |loss diff| per step
    python -m dms.training.bench summarize OUT.json PIECES...                # merge the pieces

The model has Qwen3-0.6B's shapes (28 layers, hidden 1024, 16 query / 8 KV heads of 128, vocabulary
151936, tied embeddings) with random weights from ``Qwen3Config``: no hub access. The corpus is
random words through a word-level tokenizer: timing and loss continuity do not depend on the text.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

QWEN3_0P6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def make_base(out: Path, n_docs: int = 1500, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    out.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(8000)]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = Qwen3Config(**QWEN3_0P6B, eos_token_id=1, pad_token_id=1, bos_token_id=1)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(seed)
    with open(out / "data.jsonl", "w") as f:
        for _ in range(n_docs):
            n = int(torch.randint(200, 900, (1,), generator=g))
            ids = torch.randint(0, len(words), (n,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n")
    return out


def _attention_name(impl: str) -> str:
    from ..attention import triton_available

    if impl != "auto":
        return impl
    return "triton" if torch.cuda.is_available() and triton_available() else "eager"


MODES = ("distill", "dms", "distill_kernel", "dms_noterm")
MODE_DOC = {
    "distill": "plain logit distillation: student with DMS off (SDPA with a document mask, no retention heads)",
    "dms": "the retrofit step: retention heads, Gumbel noise, soft eviction mask through the attention kernel, "
           "compression loss",
    "distill_kernel": "distill, but the student's attention is our Triton kernel with the DMS term compiled out "
                      "(_has_dms=False): the kernel swap alone",
    "dms_noterm": "dms, but the kernel's DMS term compiled out: heads, noise, decisions and compression loss run, "
                  "the kernel ignores log_keep",
}


class _StepRunner:
    """One optimizer step of plain distillation or of the DMS retrofit on one model and one batch.

    Mirrors ``DistillationModule.forward`` + the loop's backward/step: teacher = the same model with DMS
    off under no_grad, chunked fp32 KL (chunk 1024), AdamW over every weight. ``mode`` is one of
    :data:`MODES`; ``kernel`` the DMS training kernel callable (only for the ``*_kernel``/``noterm`` modes).
    """

    def __init__(self, model, ids, docs, opt, kernel=None):
        from .. import attention as A

        self.model, self.ids, self.docs, self.opt, self.kernel, self.A = model, ids, docs, opt, kernel, A
        self.head = model.get_output_embeddings()
        self.pre = getattr(kernel, "precompute_doc_bounds", None)
        if kernel is not None:
            def noterm(q, k, v, lk, w, d=None, sc=None, **kw):
                return kernel(q, k, v, lk, w, d, sc, _has_dms=False, **kw)

            if self.pre is not None:  # same per-forward document bounds as the "dms" mode
                noterm.precompute_doc_bounds = self.pre
            A.register_train_kernel("_bench_noterm", noterm)

    def _kernel_dense(self):
        """DMS-off attention through our kernel, DMS term off (same documents; window irrelevant)."""
        kernel, docs = self.kernel, self.docs
        kw = {"doc_bounds": self.pre(docs)} if self.pre is not None else {}  # once per step, as in "dms"

        def dense(query, key, value, scaling, doc_ids=None, key_valid=None, mask=None):
            lk = torch.zeros(query.shape[0], key.shape[1], query.shape[2], device=query.device)
            o, _ = kernel(query, key, value, lk, 0, docs, scaling, _has_dms=False, **kw)
            return o.transpose(1, 2)

        return dense

    def __call__(self, mode: str):
        from ..losses import chunked_distillation_kl, compression_loss
        from ..patching import decoder_stack, dms_disabled, dms_state, packed_documents

        model, ids, docs, A = self.model, self.ids, self.docs, self.A
        stack = decoder_stack(model)
        with torch.no_grad(), packed_documents(model, docs), dms_disabled(model):
            th = stack(input_ids=ids, use_cache=False).last_hidden_state
        state = dms_state(model)
        with packed_documents(model, docs):
            if mode in ("distill", "distill_kernel"):
                dense = A.dense_attention
                if mode == "distill_kernel":
                    A.dense_attention = self._kernel_dense()
                try:
                    with dms_disabled(model):
                        sh = stack(input_ids=ids, use_cache=False).last_hidden_state
                finally:
                    A.dense_attention = dense
                loss = chunked_distillation_kl(sh, th, self.head, docs >= 0, 1024, "forward")
            else:
                impl = state.config.attention_impl
                if mode == "dms_noterm":
                    state.config.attention_impl = "_bench_noterm"
                try:
                    sh = stack(input_ids=ids, use_cache=False).last_hidden_state
                finally:
                    state.config.attention_impl = impl
                kl = chunked_distillation_kl(sh, th, self.head, docs >= 0, 1024, "forward")
                comp, _ = compression_loss(state.records, 0.5)
                loss = kl + comp
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _gpu_profile(run, mode) -> dict:
    """One profiled step: CUDA kernels launched, their summed time, and the step's wall time under the profiler.

    Summed kernel time far below the step time means the GPU waits on the host (launch-bound step).
    """
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(mode)
        torch.cuda.synchronize()
    wall = 1000 * (time.perf_counter() - t0)
    n, busy = 0, 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n += 1
            busy += e.time_range.elapsed_us()
    return {"cuda_kernels": n, "gpu_kernel_ms": busy / 1000, "profiled_wall_ms": wall}


def step_time(base: Path, seq_len: int = 2048, batch: int = 4, steps: int = 10, warmup: int = 3,
              impls=("auto", "flex", "eager"), modes=("distill", "dms"), rounds: int = 2,
              profile: bool = False) -> dict:
    """One GPU, one process: ms per optimizer step of the DMS retrofit vs plain logit distillation.

    Same model (all weights trainable, bf16, AdamW), same packed batch (two documents per row). Modes
    (:data:`MODE_DOC`): ``distill`` (the baseline: SDPA with a document mask, as transformers runs a
    packed batch), ``dms``, and with the Triton kernel ``distill_kernel`` / ``dms_noterm``, which split the
    ratio into the kernel swap and the DMS work. Teacher: the same model with DMS off, under no_grad, in
    every mode. Modes are interleaved and repeated ``rounds`` times; the minimum per mode is kept.
    """
    from transformers import AutoModelForCausalLM

    from ..config import DMSConfig
    from ..patching import retrofit

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, min(8000, vocab),  (batch, seq_len), generator=g).to(dev)
    docs = torch.zeros(batch, seq_len, dtype=torch.int32)
    docs[:, seq_len // 2:] = 1  # two packed documents per row
    docs = docs.to(dev)
    rows = []
    for impl in impls:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).to(dev)
        retrofit(model, DMSConfig(window=256, attention_impl=impl))
        model.train()
        model.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        ran = _attention_name(impl)
        kernel = None
        if ran == "triton":
            from dms_kernels.train_attention import dms_attention as kernel
        row_modes = [m for m in modes if kernel is not None or m in ("distill", "dms")]
        run = _StepRunner(model, ids, docs, opt, kernel)
        row = {"attention_impl": impl, "attention_ran": ran, "modes": row_modes}
        try:
            for _ in range(rounds):  # interleaved and repeated: warm-up and clock effects cancel
                for mode in row_modes:
                    for _ in range(warmup):
                        run(mode)
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        run(mode)
                    sync()
                    row.setdefault(f"{mode}_ms_rounds", []).append(1000 * (time.perf_counter() - t0) / steps)
            for mode in row_modes:
                row[f"{mode}_ms"] = min(row[f"{mode}_ms_rounds"])
            ratio = lambda a, b: row[f"{a}_ms"] / row[f"{b}_ms"] if f"{a}_ms" in row and f"{b}_ms" in row else None
            row["ratio_dms_vs_distill"] = ratio("dms", "distill")
            row["ratio_distill_kernel_vs_distill"] = ratio("distill_kernel", "distill")  # kernel swap alone
            row["ratio_dms_vs_distill_kernel"] = ratio("dms", "distill_kernel")  # DMS at equal kernel
            row["ratio_dms_noterm_vs_distill_kernel"] = ratio("dms_noterm", "distill_kernel")  # heads/noise/loss
            row["ratio_dms_vs_dms_noterm"] = ratio("dms", "dms_noterm")  # the kernel's DMS term
            row = {k: v for k, v in row.items() if v is not None}
            if profile and dev.type == "cuda":
                try:
                    row["profile"] = {m: _gpu_profile(run, m) for m in row_modes}
                except Exception as e:  # the timings above stand without it
                    row["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        except Exception as e:  # record which kernel failed and go on with the next one
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, opt, run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    import transformers

    return {"seq_len": seq_len, "batch": batch, "steps": steps, "rounds": rounds, "window": 256,
            "trainable": "all weights", "dtype": "bfloat16", "mode_doc": {m: MODE_DOC[m] for m in modes},
            "rows": rows, "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def profile_ops(layers: int = 4, seq_len: int = 128, batch: int = 2, steps: int = 5) -> dict:
    """CPU: ATen ops per optimizer step of each mode on a tiny Qwen3, and the DMS step's extra ops by source.

    The DMS kernel is a stub (one op forward, one backward, like a fused kernel launch), so that the
    counts show everything *around* the attention kernel: on a GPU each op is at least one kernel
    launch, and at retrofit sizes the step waits on those launches. ``distill_kernel`` routes the
    student's DMS-off attention through the same stub (the comparison at equal kernel).
    """
    import collections

    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, Qwen3Config

    from .. import attention as A
    from ..config import DMSConfig
    from ..patching import retrofit

    class Stub(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, lk):
            ctx.shapes = (q, k, v, lk)
            return torch.empty_like(q), torch.empty(q.shape[:3])

        @staticmethod
        def backward(ctx, do, dlse):
            return tuple(torch.empty_like(t) for t in ctx.shapes)

    def stub(q, k, v, lk, window, doc_ids=None, scale=None, _has_dms=True):
        return Stub.apply(q, k, v, lk)

    A.register_train_kernel("_stub", stub)
    cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    dcfg = DMSConfig(window=16)
    dcfg.attention_impl = "_stub"
    retrofit(model, dcfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)  # as on GPU: one op per step, not per tensor
    ids = torch.randint(2, 512, (batch, seq_len))
    docs = torch.zeros(batch, seq_len, dtype=torch.int32)
    docs[:, seq_len // 2:] = 1
    run = _StepRunner(model, ids, docs, opt, stub)
    out = {"layers": layers, "seq_len": seq_len, "batch": batch, "modes": {}}
    by_src = {}
    for mode in ("distill", "distill_kernel", "dms"):
        for _ in range(2):
            run(mode)
        t0 = time.perf_counter()
        for _ in range(steps):
            run(mode)
        ms = 1000 * (time.perf_counter() - t0) / steps
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            run(mode)
        top, src = 0, collections.Counter()
        for e in prof.events():  # top-level ATen ops (not the ones an op calls), by nearest library frame
            if not e.name.startswith("aten::"):
                continue
            p, nested, where = e.cpu_parent, False, None
            while p is not None:
                if p.name.startswith("aten::"):
                    nested = True
                    break
                nm = p.name  # python frames: "dms/heads.py(109): forward" (path relative to sys.path)
                if where is None and (nm.startswith(("dms/", "kernels/")) or "/dms/" in nm or "/kernels/" in nm):
                    where = nm.rsplit("/main/", 1)[-1]
                p = p.cpu_parent
            if not nested:
                top += 1
                src[where or "model / autograd engine / optimizer"] += 1
        out["modes"][mode] = {"top_level_aten_ops": top, "cpu_ms": ms}
        by_src[mode] = src
    d, b = by_src["distill_kernel"], by_src["dms"]
    out["dms_extra_ops_by_source"] = {k: b.get(k, 0) - d.get(k, 0) for k in sorted(set(d) | set(b))
                                      if b.get(k, 0) != d.get(k, 0)}
    out["dms_extra_ops_per_layer"] = (out["modes"]["dms"]["top_level_aten_ops"]
                                      - out["modes"]["distill_kernel"]["top_level_aten_ops"]) / layers
    return out


def throughput(run: Path, skip: int = 3) -> dict:
    rows = [json.loads(l) for l in (run / "losses.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    a, b = rows[skip - 1], rows[-1]
    # elapsed/tokens restart in a resumed process: only use rows of one process (monotone elapsed)
    tps = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {"run": str(run), "tokens_per_s": tps, "steps_timed": b["step"] - a["step"],
            "s_per_step": (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]),
            "world_size": s.get("world_size"), "zero_stage": s.get("zero_stage")}


def curve_diff(ref: Path, got: Path) -> dict:
    load = lambda p: {json.loads(l)["step"]: json.loads(l) for l in (p / "losses.jsonl").read_text().splitlines() if l.strip()}
    a, b = load(ref), load(got)
    common = sorted(set(a) & set(b))
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) for s in common]
    return {"steps": common, "max_abs_diff": max(diffs), "ref_loss": [a[s]["loss"] for s in common],
            "resumed_loss": [b[s]["loss"] for s in common], "same_samples": all(a[s]["samples"] == b[s]["samples"] for s in common)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make-base").add_argument("out", type=Path)
    st = sub.add_parser("step-time")
    st.add_argument("base", type=Path)
    st.add_argument("--seq-len", type=int, default=2048)
    st.add_argument("--batch", type=int, default=4)
    st.add_argument("--steps", type=int, default=10)
    st.add_argument("--impls", default="auto,flex,eager")
    st.add_argument("--modes", default="distill,dms", help=f"comma list of {MODES}")
    st.add_argument("--rounds", type=int, default=2)
    st.add_argument("--warmup", type=int, default=3)
    st.add_argument("--profile", action="store_true",
                    help="one extra profiled step per mode (CUDA kernels launched, GPU busy time)")
    st.add_argument("--out", type=Path, help="also write the JSON here")
    po = sub.add_parser("profile-ops")
    po.add_argument("--layers", type=int, default=4)
    po.add_argument("--seq-len", type=int, default=128)
    th = sub.add_parser("throughput")
    th.add_argument("run", type=Path)
    th.add_argument("--skip", type=int, default=3)
    cd = sub.add_parser("curve-diff")
    cd.add_argument("ref", type=Path)
    cd.add_argument("got", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "make-base":
        print(make_base(a.out))
    elif a.cmd == "step-time":
        modes = tuple(a.modes.split(","))
        bad = [m for m in modes if m not in MODES]
        if bad:
            p.error(f"unknown modes {bad}; choose from {MODES}")
        res = step_time(a.base, a.seq_len, a.batch, a.steps, a.warmup, impls=tuple(a.impls.split(",")), modes=modes,
                        rounds=a.rounds, profile=a.profile)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res, indent=1))
        print(json.dumps(res))
    elif a.cmd == "profile-ops":
        print(json.dumps(profile_ops(a.layers, a.seq_len), indent=1))
    elif a.cmd == "throughput":
        print(json.dumps(throughput(a.run, a.skip)))
    else:
        print(json.dumps(curve_diff(a.ref, a.got)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
