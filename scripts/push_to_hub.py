#!/usr/bin/env python3
"""Upload a retrofitted model to the Hugging Face Hub: one commit, private by default.

    python scripts/push_to_hub.py runs/qwen3-8b-cr8 --repo me/Qwen3-8B-DMS-CR8            # private repo
    python scripts/push_to_hub.py runs/qwen3-8b-cr8 --repo me/Qwen3-8B-DMS-CR8 --dry-run out/   # no network

RUN_DIR is a retrofit run folder (its ``export/`` is uploaded) or an export folder itself. What goes up:
the safetensors weights, ``config.json`` with the DMS settings, the tokenizer, ``generation_config.json``
if present, and a generated ``README.md`` model card (base model, compression ratio, window, steps,
training data, evaluation table when the run has one). ``--dry-run DIR`` writes exactly that folder
and uploads nothing. The token comes from ``--token``, ``HF_TOKEN`` or the cached login; it is never
printed or written, and the upload is refused if it appears in any file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ALLOWED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
           "chat_template.jinja", "model.safetensors.index.json")
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def find_export(run_dir: Path) -> tuple[Path, dict]:
    """The export folder and the run summary (``{}`` if none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder; pass a retrofit run folder (with export/) or an export folder")
    export = run_dir / "export" if (run_dir / "export" / "config.json").is_file() else run_dir
    if not (export / "config.json").is_file():
        raise ValueError(f"{run_dir} holds no exported model (no config.json here or in export/); finish the run "
                         "(or resume it with --resume auto) so that it exports")
    cfg = json.loads((export / "config.json").read_text())
    if "dms" not in cfg and not any(k.startswith("dms_") for k in cfg):
        raise ValueError(f"{export}/config.json has no DMS settings: this is not a retrofitted model")
    unsafe = [p.name for p in export.iterdir() if p.suffix in UNSAFE_SUFFIXES]
    if unsafe:
        raise ValueError(f"{export} holds pickle-format files {unsafe}; only safetensors weights are uploaded. "
                         "Re-export the run (dms.training export writes safetensors) or remove them")
    if not list(export.glob("*.safetensors")):
        raise ValueError(f"{export} has no *.safetensors weights")
    summary = {}
    for cand in (run_dir / "summary.json", export / "dms_run_summary.json"):
        if cand.is_file():
            summary = json.loads(cand.read_text())
            break
    return export, summary


def _hub_id(name) -> str | None:
    """A hub model id (``org/name``) or None for a local path / the built-in default."""
    if not isinstance(name, str) or not name or os.path.exists(name) or name.startswith(("/", ".", "~")):
        return None
    return name if name.count("/") == 1 else None


def model_card(repo: str, cfg: dict, summary: dict) -> str:
    dms = cfg.get("dms") or {k[4:]: v for k, v in cfg.items() if k.startswith("dms_")}
    run_cfg = summary.get("config") or {}
    base_name = (run_cfg.get("model") or {}).get("name_or_path") or summary.get("base_model")
    base = _hub_id(base_name)
    window = dms.get("window", dms.get("window_size", summary.get("window")))
    cr = summary.get("target_cr", (run_cfg.get("train") or {}).get("cr"))
    data = summary.get("data") or (run_cfg.get("data") or {}).get("source") or "built-in default corpus"
    if isinstance(data, str) and os.path.isabs(data):
        data = f"local files ({Path(data).name})"
    front = ["---", "library_name: transformers", "tags:", "- dms", "- kv-cache-compression", "- dynamic-memory-sparsification"]
    if base:
        front += [f"base_model: {base}", "base_model_relation: finetune"]
    front.append("---")
    lines = front + [
        "", f"# {repo.split('/')[-1]}", "",
        f"{base or base_name or 'A causal LM'} retrofitted with Dynamic Memory Sparsification (DMS, arXiv 2506.05345): "
        "the model learns which KV-cache entries to evict while it generates, and the evicted memory is freed.", "",
        "| setting | value |", "| --- | --- |",
        f"| base model | {base or base_name or 'unknown'} |",
        f"| target compression ratio (decision CR) | {cr} |",
        f"| eviction window | {window} |",
        f"| retention | {dms.get('retention', 'adapter')} ({dms.get('granularity', 'head')}) |",
        f"| training steps | {summary.get('steps', 'unknown')} |",
        f"| trainable | {summary.get('trainable', (run_cfg.get('train') or {}).get('trainable', 'adapter'))} |",
        f"| training data | {data} |",
    ]
    ev = summary.get("eval") or {}
    if ev:
        lines += ["", "## Evaluation (held-out packed rows, inference semantics)", "", "| metric | value |", "| --- | --- |"]
        names = {"decision_cr": "decision CR", "memory_cr": "memory CR", "student_ppl": "perplexity (DMS)",
                 "teacher_ppl": "perplexity (base)", "kl": "KL(base || DMS)", "eval_tokens": "tokens"}
        for k, label in names.items():
            if k in ev:
                v = ev[k]
                lines.append(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
    lines += ["", "## Use", "", "```python", "import dms", "", f'model, tokenizer = dms.load("{repo}")',
              'out = model.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=64)', "```", "",
              "`model.generate` runs with a DMS cache that drops evicted keys; a memory CR near the target needs "
              "sequences much longer than the window.", ""]
    return "\n".join(lines)


def stage(run_dir: Path, repo: str, out: Path) -> Path:
    """Write exactly the folder that would be uploaded into ``out`` (must not exist or be empty)."""
    export, summary = find_export(Path(run_dir))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose an empty or new folder for --dry-run")
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(export.iterdir()):
        if p.is_file() and (p.suffix == ".safetensors" or p.name in ALLOWED):
            shutil.copy2(p, out / p.name)
    cfg = json.loads((export / "config.json").read_text())
    (out / "README.md").write_text(model_card(repo, cfg, summary))
    return out


def _check_no_secret(folder: Path, token: str | None):
    if not token:
        return
    needle = token.encode()
    for p in folder.rglob("*"):
        if p.is_file() and needle in p.read_bytes():
            raise ValueError(f"{p.name} contains the Hub token; refusing to upload it")


def push(run_dir: Path, repo: str, token: str | None, private: bool = True, api=None,
         message: str | None = None) -> str:
    """Create the repo (private unless asked) and upload the staged folder in one commit; returns its URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="dms-push-") as tmp:
        folder = stage(run_dir, repo, Path(tmp) / "upload")
        _check_no_secret(folder, token)
        api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                                 commit_message=message or "Upload DMS-retrofitted model")
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="retrofit run folder (with export/) or an export folder")
    p.add_argument("--repo", required=True, help="Hub repository id, e.g. me/Qwen3-8B-DMS-CR8")
    p.add_argument("--public", action="store_true", help="create a public repository (default: private)")
    p.add_argument("--dry-run", type=Path, metavar="DIR", help="write the folder that would be uploaded to DIR; no network")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login); never printed")
    p.add_argument("--message", default=None, help="commit message")
    a = p.parse_args(argv)
    if a.repo.count("/") > 1 or not a.repo.strip("/"):
        print(f"error: --repo must look like 'namespace/name' or 'name'; got {a.repo!r}", file=sys.stderr)
        return 2
    token = a.token or os.environ.get("HF_TOKEN")
    try:
        if a.dry_run:
            out = stage(a.run_dir, a.repo, a.dry_run)
            _check_no_secret(out, token)
            print(f"dry run: wrote {out} ({', '.join(sorted(x.name for x in out.iterdir()))}); nothing uploaded")
            return 0
        url = push(a.run_dir, a.repo, token, private=not a.public, message=a.message)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"uploaded to {a.repo} ({'public' if a.public else 'private'}): {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
