#!/usr/bin/env python3
"""Retrofit a Hugging Face causal LM with DMS.

    accelerate launch train/retrofit.py --cr 8                                  # built-in tiny default, offline
    accelerate launch train/retrofit.py --model Qwen/Qwen3-8B --data allenai/c4 --cr 8 --output runs/qwen3-8b-cr8
    accelerate launch train/retrofit.py --recipe recipes/qwen3_8b_cr8.yaml --resume auto
    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 8 train/retrofit.py \
        --recipe recipes/qwen3_8b_cr8.yaml --resume auto                          # see docs/scaleout.md

Options come from a YAML recipe (--recipe), overridden by the flags below. The work lives in
dms.training; this script only turns argv into a RetrofitConfig and prints the outcome.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

# flag -> (recipe section, key, type)
FLAGS = {
    "--model": ("model", "name_or_path", str),
    "--dtype": ("model", "dtype", str),
    "--gradient-checkpointing": ("model", "gradient_checkpointing", "flag"),
    "--data": ("data", "source", str),
    "--text-field": ("data", "text_field", str),
    "--split": ("data", "split", str),
    "--chat-template": ("data", "chat_template", "flag"),
    "--seq-len": ("data", "seq_len", int),
    "--max-documents": ("data", "max_documents", int),
    "--window": ("dms", "window", int),
    "--tau": ("dms", "tau", float),
    "--retention": ("dms", "retention", str),
    "--granularity": ("dms", "granularity", str),
    "--attention": ("dms", "attention_impl", str),
    "--cr": ("train", "cr", str),  # parsed in TrainConfig, so a bad value gets the toolkit's message
    "--cr-warmup-steps": ("train", "cr_warmup_steps", int),
    "--steps": ("train", "steps", int),
    "--lr": ("train", "lr", float),
    "--batch-size": ("train", "batch_size", int),
    "--grad-accum": ("train", "grad_accum", int),
    "--trainable": ("train", "trainable", str),
    "--lora-r": ("train", "lora_r", int),
    "--lora-alpha": ("train", "lora_alpha", int),
    "--max-grad-norm": ("train", "max_grad_norm", float),
    "--eval-batches": ("train", "eval_batches", int),
    "--mixed-precision": ("train", "mixed_precision", str),
    "--kl-direction": ("train", "kl_direction", str),
    "--compression-weight": ("train", "compression_weight", float),
    "--seed": ("train", "seed", int),
    "--output": ("train", "output", str),
    "--resume": ("train", "resume", str),
    "--overwrite": ("train", "overwrite", "flag"),
    "--save-every": ("train", "save_every", int),
    "--keep-last": ("train", "keep_last", int),
    "--log-every": ("train", "log_every", int),
    "--no-progress": ("train", "progress", "noflag"),
}

# The built-in default is a tiny model on standard-library text: short sequences need a small window
# (memory CR can never exceed about seq_len / window) and a few hundred steps reach CR 8 on a CPU.
DEFAULT_RUN = {"data": {"seq_len": 256}, "dms": {"window": 16},
               "train": {"steps": 300, "batch_size": 4, "lr": 3e-3, "output": "runs/default-cr8", "log_every": 10,
                         "save_every": 100}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe with sections model/data/dms/train (flags override it)")
    for flag, (sec, key, typ) in FLAGS.items():
        if typ == "flag":
            p.add_argument(flag, action="store_true", default=None, help=f"{sec}.{key}")
        elif typ == "noflag":
            p.add_argument(flag, action="store_false", default=None, dest=key, help=f"{sec}.{key} = false")
        else:
            p.add_argument(flag, type=typ, default=None, help=f"{sec}.{key}")
    return p.parse_args(argv)


def build_config(args):
    from dms.training import RetrofitConfig, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else {}
    builtin = not (recipe.get("model") or {}).get("name_or_path") and args.model is None
    merged = {s: dict(v) for s, v in (DEFAULT_RUN if builtin else {}).items()}
    for sec, d in recipe.items():
        merged.setdefault(sec, {}).update(d or {})
    for flag, (sec, key, typ) in FLAGS.items():
        dest = key if typ == "noflag" else flag[2:].replace("-", "_")
        val = getattr(args, dest)
        if val is not None:
            merged.setdefault(sec, {})[key] = val
    return RetrofitConfig.from_dict(merged), builtin


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, builtin = build_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dms.training import run_retrofit

    if builtin:
        from dms.default_model import DEFAULT_MODEL_HELP

        print(DEFAULT_MODEL_HELP)
    try:
        summary = run_retrofit(cfg)
    except ValueError as e:  # bad input: say what and how to fix it; nothing written is touched
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("preempted"):  # SIGTERM: every rank saved this step; exit 0 so the scheduler requeues
        print(f"preempted: saved step {summary['steps']} to {summary['checkpoint']}; relaunch with --resume auto")
        return 0
    if "export" in summary:
        ev = summary.get("eval") or {}
        print(f"\nDone: {summary['steps']} steps, target CR {summary['target_cr']:g}, window {summary['window']}.")
        if ev:
            print(f"  achieved decision CR {ev['decision_cr']:.2f}, memory CR {ev['memory_cr']:.2f} "
                  f"(held-out, inference semantics)")
            print(f"  perplexity student {ev['student_ppl']:.3f} vs teacher {ev['teacher_ppl']:.3f}, "
                  f"KL(teacher||student) {ev['kl']:.4f}")
        print(f"  exported to {summary['export']}")
        print(f"  generate: python scripts/generate.py {summary['export']} --prompt 'The module'")
        if builtin:
            print("  (this ran on the built-in tiny default; point it at a real model with --model and --data)")
    return 0


def leave(code: int):
    """Exit with ``code``. In a multi-process job (``WORLD_SIZE`` > 1) every rank leaves through ``os._exit`` once
    its streams are flushed, skipping the interpreter's teardown. There, after the run had finished, written its
    checkpoint and export and torn down its process group, a rank now and then aborted in a library's C++
    destructors ("terminate called without an active exception", SIGABRT; seen twice in the CI runs of sessions
    9-10, in two different multi-process tests, ZeRO-3 and plain DDP), so that a finished job exited non-zero.
    Everything of ours is on disk by then (files written and closed, trackers finished by ``end_training``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    leave(main())
