"""The built-in offline default: a tiny Llama (GQA) pretrained on standard-library docstrings.

``accelerate launch train/retrofit.py --cr 8`` without ``--model``/``--data`` must run on a bare
CPU machine with no model hub. This module supplies both missing pieces from what every Python
installation ships:

- :func:`default_corpus_texts`: English documentation text, the docstrings of the standard
  library (plus the language-reference topics of ``pydoc_data``), deterministic and deduplicated.
- :func:`build_default_base_model`: trains a byte-level BPE tokenizer and a small
  ``LlamaForCausalLM`` on that text for a fixed number of steps and caches the checkpoint
  (``save_pretrained`` safetensors + tokenizer + ``build_info.json``). Built once, then a cache hit.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_HELP",
    "DEFAULT_STEPS",
    "DefaultModelConfig",
    "default_corpus_texts",
    "default_model_dir",
    "build_default_base_model",
    "is_complete_build",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_HELP = """\
No --model given: using the built-in tiny default base model.
It is a ~1.3M-parameter Llama (GQA: 4 query heads, 2 KV heads) pretrained for a few minutes on
the docstrings of the Python standard library, built offline on first use and cached in
~/.cache/dms/default-base-v1-seed<seed> (root overridable with DMS_CACHE_DIR). It exists so the
retrofit runs end to end on any machine; its text quality is not meaningful.
To retrofit a real model, name it and a dataset, e.g.
    accelerate launch train/retrofit.py --model Qwen/Qwen3-8B --data <hub dataset or local .jsonl/.parquet/.txt> --cr 8
"""

# Fixed pretraining length, so a build is deterministic given the seed. Sized by a sweep on
# 2 pinned Xeon cores: 240 steps of [16, 256] with the default shape took 111 s and reached val
# loss 5.22 vs 6.53 for the unigram baseline; 300 steps of a 192-wide model (batch 8) took 100 s
# for val 5.37; lr 8e-3 or 1e-2 trained worse. Must stay within ~3 minutes on a 2-core CPU.
DEFAULT_STEPS = 240

_CACHE_VERSION = "v1"
_EOS = "<|endoftext|>"
_PAD = "<|pad|>"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "build_info.json")
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------
# Run in a fresh interpreter (``python -I``) so that importing ~400 stdlib modules leaves no side
# effects (atexit hooks, signal handlers, memory) in the training process and the result does not
# depend on what the caller already imported. Prints one JSON list of [module, [entries...]].
_COLLECTOR = r'''
import contextlib, importlib, inspect, io, json, pkgutil, sys, warnings
SKIP = set(sys.argv[1].split(","))
def quiet_import(name):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(name)
def doc_of(obj):
    try:
        d = obj.__doc__
    except Exception:
        return ""
    return inspect.cleandoc(d) if isinstance(d, str) else ""
out = []
for name in sorted(sys.stdlib_module_names):
    if name.startswith("_") or name in SKIP:
        continue
    try:
        mod = quiet_import(name)
    except BaseException:
        continue
    mods = [mod]
    if hasattr(mod, "__path__"):
        try:
            infos = sorted(pkgutil.walk_packages(mod.__path__, name + ".", onerror=lambda n: None), key=lambda i: i.name)
        except BaseException:
            infos = []
        for info in infos:
            parts = info.name.split(".")[1:]
            if any(p.startswith("_") or p in SKIP or p in ("test", "tests", "idle_test") for p in parts):
                continue
            try:
                mods.append(quiet_import(info.name))
            except BaseException:
                pass
    for m in mods:
        entries = []
        d = doc_of(m)
        if d:
            entries.append(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            members = sorted(vars(m).items())
            for key, obj in members:
                if key.startswith("_") or getattr(obj, "__module__", None) != m.__name__:
                    continue
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                d = doc_of(obj)
                if d:
                    entries.append(key + "\n" + d)
                if inspect.isclass(obj):
                    for mk, mv in sorted(vars(obj).items()):
                        if mk.startswith("_"):
                            continue
                        f = mv.__func__ if isinstance(mv, (staticmethod, classmethod)) else mv
                        if inspect.isroutine(f) or isinstance(f, property):
                            d = doc_of(f)
                            if d:
                                entries.append(key + "." + mk + "\n" + d)
        out.append([m.__name__, entries])
try:
    import pydoc_data.topics as topics
    for key in sorted(topics.topics):
        out.append(["pydoc_data.topics." + key, [topics.topics[key].strip()]])
except BaseException:
    pass
sys.stdout.write(json.dumps(out))
'''

# Modules never imported: side effects on import (antigravity opens a browser, this prints),
# GUI toolkits, interactive-terminal state (readline), Windows-only modules, shims that
# setuptools rewires (distutils), tools that are slow/noisy to import, and the repetitive
# machine-generated codec docstrings (encodings).
_SKIP_MODULES = (
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline", "distutils",
    "lib2to3", "ensurepip", "venv", "msilib", "winreg", "winsound", "msvcrt", "nt", "site",
    "test", "sitecustomize", "usercustomize", "encodings", "pydoc_data", "webbrowser",
)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DOC_CHARS = 6000


@functools.lru_cache(maxsize=1)
def _collect_stdlib_docs() -> tuple[tuple[str, tuple[str, ...]], ...]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _COLLECTOR, ",".join(_SKIP_MODULES)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"collecting standard-library docstrings failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return tuple((name, tuple(entries)) for name, entries in json.loads(proc.stdout))


def default_corpus_texts(max_chars: int | None = None) -> list[str]:
    """English documentation text shipped with every Python: standard-library docstrings.

    One document per module (its docstring, then ``name\\n<doc>`` for each public class,
    function and method defined there), cut at entry boundaries into documents of at most
    ~6000 characters; then the ``pydoc_data`` language-reference topics. Modules in sorted order,
    members sorted by name, exact duplicate entries dropped, memory addresses stripped, so the
    result is identical on every call on a given Python installation.

    Args:
        max_chars: stop once this many characters are collected (the last document is cut).

    Returns:
        list of non-empty document strings.
    """
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be None or an integer >= 1; got {max_chars!r}")
    seen: set[str] = set()
    docs: list[str] = []
    for _name, entries in _collect_stdlib_docs():
        chunk: list[str] = []
        size = 0
        for entry in entries:
            entry = _ADDRESS.sub("", entry).strip()
            if not entry or entry in seen:
                continue
            seen.add(entry)
            if chunk and size + len(entry) > _MAX_DOC_CHARS:
                docs.append("\n\n".join(chunk))
                chunk, size = [], 0
            chunk.append(entry)
            size += len(entry) + 2
        if chunk:
            docs.append("\n\n".join(chunk))
    if not docs:
        raise RuntimeError("no standard-library docstrings found (python -OO strips them); run without -OO")
    if max_chars is not None:
        out, total = [], 0
        for doc in docs:
            if total >= max_chars:
                break
            doc = doc[: max_chars - total]
            out.append(doc)
            total += len(doc)
        docs = out
    return docs


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass
class DefaultModelConfig:
    """Shape and pretraining recipe of the default base model (defaults = the cached ``v1`` build).

    Attributes:
        vocab_size: byte-level BPE vocabulary (special tokens included).
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: Llama shape
            (``hidden_size == num_heads * head_dim``; GQA needs ``num_heads % num_kv_heads == 0``).
        max_position_embeddings: RoPE positions the config declares (training uses ``seq_len``).
        seq_len, batch_size: pretraining rows ``[batch_size, seq_len]`` per step.
        lr, warmup_steps, weight_decay: AdamW with linear warm-up then cosine decay to 10%.
        max_corpus_chars: cap on corpus characters (None: all of it).
        val_fraction: share of documents held out for the validation loss.
        eval_rows: validation rows (of ``seq_len`` tokens) evaluated at the end.
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 5e-3
    warmup_steps: int = 24
    weight_decay: float = 0.01
    max_corpus_chars: int | None = None
    val_fraction: float = 0.02
    eval_rows: int = 64

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings", "seq_len", "batch_size", "eval_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 byte symbols + special tokens + merges); got {self.vocab_size}")
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must equal num_heads x head_dim "
                f"({self.num_heads} x {self.head_dim} = {self.num_heads * self.head_dim})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.seq_len < 2 or self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len must be in [2, max_position_embeddings={self.max_position_embeddings}]; got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1); got {self.weight_decay}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5); got {self.val_fraction}")
        if self.max_corpus_chars is not None and (
            isinstance(self.max_corpus_chars, bool) or not isinstance(self.max_corpus_chars, int) or self.max_corpus_chars < 1000
        ):
            raise ValueError(f"max_corpus_chars must be None or an integer >= 1000; got {self.max_corpus_chars!r}")


def _spec(config: DefaultModelConfig, seed: int, steps: int) -> dict:
    return {"version": _CACHE_VERSION, "seed": seed, "steps": steps, **dataclasses.asdict(config)}


def default_model_dir(seed: int = 0, steps: int = DEFAULT_STEPS, config: DefaultModelConfig | None = None) -> Path:
    """Cache folder of a build: ``$DMS_CACHE_DIR`` (default ``~/.cache/dms``) /
    ``default-base-v1-seed{seed}``, plus a short hash suffix when steps/config differ from the defaults."""
    config = config or DefaultModelConfig()
    root = Path(os.environ.get("DMS_CACHE_DIR") or Path.home() / ".cache" / "dms").expanduser()
    name = f"default-base-{_CACHE_VERSION}-seed{seed}"
    if steps != DEFAULT_STEPS or config != DefaultModelConfig():
        digest = hashlib.sha256(json.dumps(_spec(config, seed, steps), sort_keys=True).encode()).hexdigest()[:10]
        name += f"-{digest}"
    return root / name


def is_complete_build(path: str | os.PathLike) -> bool:
    """True if ``path`` holds every file of a finished build (``build_info.json`` is written last)."""
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() for f in _REQUIRED_FILES)


def _train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[_EOS, _PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=_EOS, eos_token=_EOS, pad_token=_PAD, unk_token=None,
        model_max_length=max_length,
    )
    wrapped.chat_template = _CHAT_TEMPLATE
    return wrapped


def _encode_docs(tokenizer, docs: list[str]) -> list[list[int]]:
    enc = tokenizer(docs, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in enc if ids]


def _lr_at(step: int, steps: int, config: DefaultModelConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


def build_default_base_model(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    progress: bool = True,
    config: DefaultModelConfig | None = None,
) -> Path:
    """Build (or find in the cache) the default tiny base model and return its folder.

    The folder holds ``config.json`` + ``model.safetensors`` (a ``LlamaForCausalLM``), the
    tokenizer files (byte-level BPE, ``eos``/``bos`` = ``<|endoftext|>``, ``pad`` = ``<|pad|>``)
    and ``build_info.json`` (steps, seconds, train/val loss, unigram val loss, params, corpus
    size). Training is a fixed number of steps from ``seed``, so a build is reproducible on a
    given machine. Written to a temporary sibling folder and renamed into place, so an
    interrupted build is never mistaken for a finished one.

    Args:
        cache_dir: target folder; default :func:`default_model_dir` (``$DMS_CACHE_DIR`` or
            ``~/.cache/dms``, then ``default-base-v1-seed{seed}``).
        seed: seeds initialisation and batch sampling.
        steps: optimizer steps of pretraining (``[batch_size, seq_len]`` tokens each).
        progress: show a tqdm bar.
        config: model shape and recipe (tests pass a tiny one).

    Raises:
        ValueError: bad arguments, or an explicit ``cache_dir`` exists but is not a complete
            build of the same recipe (delete it or choose another folder). The automatic cache
            folder is instead rebuilt and swapped in when it is stale or damaged.
    """
    config = config or DefaultModelConfig()
    if not isinstance(config, DefaultModelConfig):
        raise ValueError(f"config must be a DefaultModelConfig; got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    auto = cache_dir is None
    target = default_model_dir(seed, steps, config) if auto else Path(cache_dir).expanduser()
    spec = _spec(config, seed, steps)

    stale = False
    if target.exists():
        if is_complete_build(target) and _spec_of(target) == spec:
            return target
        if not auto:
            if is_complete_build(target):
                _check_spec(target, spec)  # raises, naming the differing fields
            missing = [f for f in _REQUIRED_FILES if not (target / f).is_file()]
            raise ValueError(
                f"{target} exists but is not a complete default-model build (missing {missing}); "
                f"delete it or pass another cache_dir / DMS_CACHE_DIR"
            )
        # Our own cache folder holding an older recipe or a damaged build: rebuild and swap.
        logger.warning("default model cache %s is stale or incomplete; rebuilding it", target)
        stale = True

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build_into(tmp, spec, config, seed, steps, progress)
        if stale and target.exists():
            trash = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass  # a concurrent process swapped it already; the rename below sorts it out
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first: use theirs.
            if is_complete_build(target) and _spec_of(target) == spec:
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _spec_of(target: Path) -> dict | None:
    try:
        return json.loads((target / "build_info.json").read_text()).get("spec")
    except (OSError, ValueError, AttributeError):
        return None


def _check_spec(target: Path, spec: dict) -> None:
    found = _spec_of(target)
    if found != spec:
        diff = {k: (found.get(k) if isinstance(found, dict) else None, v) for k, v in spec.items()
                if not isinstance(found, dict) or found.get(k) != v}
        raise ValueError(
            f"{target} holds a default-model build of another recipe (field: (found, asked) = {diff}); "
            f"delete it or pass another cache_dir"
        )


def _build_into(out: Path, spec: dict, config: DefaultModelConfig, seed: int, steps: int, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    t_start = time.time()
    docs = default_corpus_texts(config.max_corpus_chars)
    corpus_chars = sum(len(d) for d in docs)
    # Hold out every k-th document (fixed, independent of the seed) for validation.
    every = max(2, round(1 / config.val_fraction))
    val_docs = [d for i, d in enumerate(docs) if i % every == every // 2]
    train_docs = [d for i, d in enumerate(docs) if i % every != every // 2]
    if not val_docs:
        val_docs, train_docs = train_docs[-1:], train_docs[:-1]

    tokenizer = _train_tokenizer(train_docs, config.vocab_size, config.max_position_embeddings)
    train_stream = torch.tensor([t for ids in _encode_docs(tokenizer, train_docs) for t in ids], dtype=torch.long)
    val_stream = torch.tensor([t for ids in _encode_docs(tokenizer, val_docs) for t in ids], dtype=torch.long)
    L = config.seq_len
    if train_stream.numel() < L + 1:
        raise ValueError(f"corpus too small: {train_stream.numel()} training tokens < seq_len + 1 = {L + 1}; raise max_corpus_chars")

    vocab = len(tokenizer)
    llama_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    threads_before = torch.get_num_threads()
    torch.set_num_threads(_available_cpus())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(llama_config)
            model.train()
            gen = torch.Generator().manual_seed(seed)
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
            no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=config.lr, betas=(0.9, 0.95),
            )
            n_starts = train_stream.numel() - L
            losses: list[float] = []
            t_train = time.time()
            bar = tqdm(range(steps), desc="pretraining default base model", disable=not progress, leave=False)
            for step in bar:
                starts = torch.randint(0, n_starts, (config.batch_size,), generator=gen)
                rows = torch.stack([train_stream[s : s + L] for s in starts.tolist()])
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, steps, config)
                loss = model(input_ids=rows, labels=rows).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
            train_seconds = time.time() - t_train

            model.eval()
            val_loss = _eval_loss(model, val_stream, L, config.eval_rows)
    finally:
        torch.set_num_threads(threads_before)

    # Unigram baseline: cross-entropy of the validation tokens under the training token
    # frequencies (add-one smoothed); the model must beat it clearly.
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    unigram_val = float(-logp[val_stream].mean())

    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)  # safetensors (the only format transformers 5 writes)
    tokenizer.save_pretrained(out)
    tail = losses[-min(20, len(losses)):]
    info = {
        "spec": spec,
        "steps": steps,
        "seconds": round(train_seconds, 2),
        "total_seconds": round(time.time() - t_start, 2),
        "threads": _available_cpus(),
        "train_loss": round(sum(tail) / len(tail), 4),
        "val_loss": round(val_loss, 4),
        "unigram_val_loss": round(unigram_val, 4),
        "params": sum(p.numel() for p in model.parameters()),
        "corpus_chars": corpus_chars,
        "corpus_documents": len(docs),
        "train_tokens": int(train_stream.numel()),
        "val_tokens": int(val_stream.numel()),
        "tokens_seen": steps * config.batch_size * L,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    # Written last: its presence marks the build complete (see is_complete_build).
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info(
        "default base model: %d params, %d steps in %.0fs, val loss %.3f (unigram %.3f)",
        info["params"], steps, train_seconds, val_loss, unigram_val,
    )


def _eval_loss(model, stream, seq_len: int, max_rows: int) -> float:
    """Mean next-token loss over non-overlapping ``[seq_len]`` rows of ``stream``."""
    import torch

    n = min(max_rows, max(1, (stream.numel() - 1) // seq_len))
    L = min(seq_len, stream.numel())
    rows = torch.stack([stream[i * L : (i + 1) * L] for i in range(n)])
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in rows.split(16):
            loss = model(input_ids=chunk, labels=chunk).loss
            total += float(loss) * chunk.shape[0]
            count += chunk.shape[0]
    return total / count
