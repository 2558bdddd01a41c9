#!/usr/bin/env python3
"""Generate text from a DMS checkpoint with a live-pruning KV cache, and print KV statistics.

    python scripts/generate.py runs/default-cr8/export --prompt "The module"
    python scripts/generate.py CKPT --prompt-file prompts.txt --max-new-tokens 256 --sample --temperature 0.7
    python scripts/generate.py CKPT --chat            # multi-turn: each turn continues the same cache
    python scripts/generate.py CKPT --prompt-file p.txt --fast   # lean loop, CUDA-graph decode steps (dms.graphs)
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="folder written by train/retrofit.py (export/) or a released DMS checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file with one prompt per line (batched)")
    src.add_argument("--chat", action="store_true", help="interactive multi-turn on stdin, one cache for all turns")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--window", type=int, default=None, help="override the checkpoint's DMS window")
    p.add_argument("--cache", default="auto", choices=("auto", "paged", "reference"),
                   help="KV cache: paged (Triton page store), reference (pure PyTorch); auto = paged on CUDA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: checkpoint's)")
    p.add_argument("--fast", action="store_true",
                   help="dms.graphs.fast_generate: paged cache, decode steps replayed as CUDA graphs on CUDA "
                        "(greedy or sampling; not with --num-beams, --num-return-sequences or --chat)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="model.generate() with one-token steps replayed as CUDA graphs (dms.graphs."
                        "enable_graph_decoding); works with every generation mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import dms
    from dms.paged_cache import make_cache

    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1; got {args.max_new_tokens}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok = dms.load(args.checkpoint, device=device, dtype=args.dtype, window=args.window, cache=args.cache,
                              cuda_graphs=args.cuda_graphs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.fast and (args.num_beams > 1 or args.num_return_sequences > 1 or args.chat or args.cache == "reference"):
        print("error: --fast decodes with the paged cache, greedy or sampling, one sequence per prompt; drop "
              "--num-beams / --num-return-sequences / --chat / --cache reference, or drop --fast", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.pad_token_id,
                      num_return_sequences=args.num_return_sequences, num_beams=args.num_beams)
    if args.sample:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)

    if args.chat:
        cache = make_cache(model, args.cache)
        history = None
        print("multi-turn: type a message, empty line to stop", file=sys.stderr)
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line:
                break
            new = tok(line, return_tensors="pt").input_ids.to(device)
            ids = new if history is None else torch.cat([history, new], dim=1)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **gen_kwargs)
            print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            history = out[:1]
            print(json.dumps(_kv_line(cache)), file=sys.stderr)
        return 0

    prompts = [args.prompt or ""]
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts = [l.rstrip("\n") for l in f if l.strip()]
    tok.padding_side = "left"  # new tokens follow every prompt directly; padding is never cached
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    if args.fast:
        from dms.graphs import fast_generate

        res = fast_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=args.max_new_tokens,
                            do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                            pad_token_id=tok.pad_token_id)
        out, cache = res.sequences, res.cache
    else:
        cache = make_cache(model, args.cache)
        out = model.generate(**enc, past_key_values=cache, **gen_kwargs)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    kv = _kv_line(cache)
    if args.json:
        print(json.dumps({"outputs": texts, "kv": kv}))
    else:
        for t in texts:
            print(t)
            print("-" * 40)
        print(json.dumps(kv), file=sys.stderr)
    return 0


def _kv_line(cache) -> dict:
    s = cache.stats()
    return {k: s[k] for k in ("tokens_seen", "tokens_held", "memory_cr", "bytes_held", "bytes_dense", "peak_tokens_held")
            if k in s}


if __name__ == "__main__":
    sys.exit(main())
