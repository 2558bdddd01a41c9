"""Scale-out benchmark helpers (``python -m dms.training.bench ...``); results in docs/results/scaleout.json.

    python -m dms.training.bench make-base runs/bench/qwen3-0.6b-shapes     # random Qwen3-0.6B shapes + data
    python -m dms.training.bench step-time runs/bench/qwen3-0.6b-shapes     # 1 GPU: DMS vs plain distillation
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


def step_time(base: Path, seq_len: int = 2048, batch: int = 4, steps: int = 10, warmup: int = 3,
              impls=("auto", "flex", "eager")) -> dict:
    """One GPU, one process: ms per optimizer step of the DMS retrofit vs plain logit distillation.

    Same model (all weights trainable, bf16, AdamW), same packed batch. "distill" runs the student with
    DMS off (dense SDPA attention, no retention heads); "dms" is the retrofit step (retention heads,
    Gumbel noise, soft eviction mask through the chosen attention kernel). Teacher: the same model with
    DMS off, under no_grad, in both.
    """
    from transformers import AutoModelForCausalLM

    from ..config import DMSConfig
    from ..losses import chunked_distillation_kl, compression_loss
    from ..patching import decoder_stack, dms_disabled, packed_documents, dms_state, retrofit

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
        head = model.get_output_embeddings()

        def one(mode):
            with torch.no_grad(), packed_documents(model, docs), dms_disabled(model):
                th = decoder_stack(model)(input_ids=ids).last_hidden_state
            with packed_documents(model, docs):
                if mode == "distill":
                    with dms_disabled(model):
                        sh = decoder_stack(model)(input_ids=ids).last_hidden_state
                    loss = chunked_distillation_kl(sh, th, head, docs >= 0, 1024, "forward")
                else:
                    sh = decoder_stack(model)(input_ids=ids).last_hidden_state
                    kl = chunked_distillation_kl(sh, th, head, docs >= 0, 1024, "forward")
                    comp, _ = compression_loss(dms_state(model).records, 0.5)
                    loss = kl + comp
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        row = {"attention_impl": impl, "attention_ran": _attention_name(impl)}
        try:
            for mode in ("distill", "dms", "distill", "dms"):  # interleaved, twice: warm-up effects cancel
                for _ in range(warmup):
                    one(mode)
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    one(mode)
                sync()
                row.setdefault(f"{mode}_ms", []).append(1000 * (time.perf_counter() - t0) / steps)
            row = {**row, **{k: min(v) for k, v in row.items() if k.endswith("_ms")}}
            row["ratio_dms_vs_distill"] = row["dms_ms"] / row["distill_ms"]
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        except Exception as e:  # record which kernel failed and go on with the next one
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return {"seq_len": seq_len, "batch": batch, "steps": steps, "rows": rows, "device": name}


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
        print(json.dumps(step_time(a.base, a.seq_len, a.batch, a.steps, impls=tuple(a.impls.split(",")))))
    elif a.cmd == "throughput":
        print(json.dumps(throughput(a.run, a.skip)))
    else:
        print(json.dumps(curve_diff(a.ref, a.got)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
