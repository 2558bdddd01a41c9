"""Reference base models: a BPE tokenizer and a small GQA causal LM pretrained on the shared corpus.

No model hub is reachable, so retrofit quality is measured on base models we pretrain ourselves.
:func:`build_base_model` trains, from the corpus train split and a seed:

1. a byte-level BPE tokenizer (digits split one per token, so numbers are copied digit by digit);
2. a Llama or Qwen3 model (grouped-query attention) on rows of ``seq_len`` tokens, a mix of plain corpus
   text and *retrieval documents* (:meth:`dms.eval.tasks.TaskBuilder.pretraining_document`: corpus
   filler with planted key-value facts recalled later), so that in-context retrieval is learned and
   eviction damage becomes measurable;

and exports a normal Hugging Face checkpoint (``save_pretrained`` + tokenizer + ``build_info.json``
with validation loss, seconds and the recipe). Deterministic given the seed up to GPU floating-point
non-determinism (data order, initialisation and the task mix are seeded). With ``time_budget_s`` the number
of steps is chosen from the measured step time (recorded as ``steps_planned``); passing that number as
``steps`` without a budget replays the same schedule.

Default recipe (the one the quality benchmark uses, sized for about 200 s of an H100): Llama, hidden 512,
8 layers, 8 query / 4 KV heads of dim 64, SwiGLU 1536, vocab 8192, tied embeddings: 29.4M parameters
(25.2M outside the embedding). Training FLOPs per token: 6 * 29.4M = 176M for the weights plus
3 * 4 * 8 layers * 2048 (mean causal context of a 4,096-token row) * 512 = 101M for attention, i.e.
about 2.8e8; a 205 s budget buys about 2.5e8 tokens at 35% of the H100's 989 TFLOP/s, and 1e8 at the
~14% that so small a model more plausibly reaches (the 6.6M model of the first run reached 7%).
Head dim 64 and 4 KV heads (4 distinct key spaces per layer instead of 2 of dim 32) give the attention
circuits that look a key up among similar facts room to form; the first run's 6.6M model (head dim 32,
2 KV heads) answered another key's value in a third of the multi-key prompts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .eval.tasks import PretrainMix, TaskBuilder, read_corpus, token_stream

FAMILIES = ("llama", "qwen3")
EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class BaseModelConfig:
    """Shape and pretraining recipe of a reference base model.

    Attributes:
        family: ``llama`` or ``qwen3`` (both GQA).
        vocab_size: BPE vocabulary (special tokens included).
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: model shape.
        max_position_embeddings: context the config declares (>= ``seq_len``).
        seq_len, batch_size, steps: pretraining rows ``[batch_size, seq_len]``, optimizer steps.
        lr, warmup_steps, weight_decay: AdamW, linear warm-up then cosine decay to 10%.
        task_fraction: share of rows made of retrieval documents (the rest is plain corpus text).
        mix_weights, mix_min_keys, mix_max_keys, mix_max_questions, mix_max_hops: how retrieval documents are
            drawn (:class:`dms.eval.tasks.PretrainMix`).
        tokenizer_chars: corpus characters the tokenizer is trained on.
        max_train_docs: corpus documents used (None: all).
        max_seconds: safety stop for the training loop (the build records the steps actually run).
        time_budget_s: if set, the step count is fitted to this many seconds of training: steps
            ``calib_start..calib_end`` are timed and the cosine schedule is laid over
            ``min(steps, steps that fit)`` (``steps_planned`` in ``build_info.json``). The steps timed lie inside
            the warm-up, whose learning rates do not depend on the total, so the build is replayed exactly by
            ``steps=steps_planned`` without a budget. Unlike ``max_seconds`` it never cuts the schedule short.
        data_workers: DataLoader worker processes assembling rows (the batch order depends on this number).
        save_dtype: dtype of the exported weights.
    """

    family: str = "llama"
    vocab_size: int = 8192
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 1536
    max_position_embeddings: int = 4096
    seq_len: int = 4096
    batch_size: int = 8
    steps: int = 8000
    lr: float = 1.5e-3
    warmup_steps: int = 200
    weight_decay: float = 0.05
    # The reference base of docs/benchmarks.md "Quality" (session 5): 470 s on an H100 with these reached retrieval
    # 0.9375 on 16 examples per task, vs 0.875 with 0.6 / (0.15, 0.5, 0.35) (digit-copy errors).
    task_fraction: float = 0.75
    mix_weights: tuple = (0.2, 0.6, 0.2)
    mix_min_keys: int = 2
    mix_max_keys: int = 10
    mix_max_questions: int = 4
    mix_max_hops: int = 3
    tokenizer_chars: int = 8_000_000
    max_train_docs: int | None = None
    max_seconds: float | None = None
    time_budget_s: float | None = None
    calib_start: int = 10
    calib_end: int = 40
    save_dtype: str = "bfloat16"
    rope_theta: float = 10000.0
    data_workers: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings", "seq_len", "batch_size", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 byte symbols + specials + merges); got {self.vocab_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_position_embeddings {self.max_position_embeddings}")
        if not 0 <= self.task_fraction <= 1:
            raise ValueError(f"task_fraction must be in [0, 1]; got {self.task_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if isinstance(self.data_workers, bool) or not isinstance(self.data_workers, int) or self.data_workers < 0:
            raise ValueError(f"data_workers must be an integer >= 0; got {self.data_workers!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype must be float32/bfloat16/float16; got {self.save_dtype!r}")
        self.mix_weights = self.mix().weights  # validates the mix fields; a tuple of floats
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds (or None); got {self.time_budget_s}")
        if not 0 <= self.calib_start < self.calib_end:
            raise ValueError(f"need 0 <= calib_start < calib_end; got {self.calib_start}, {self.calib_end}")

    def mix(self) -> PretrainMix:
        """The retrieval-document mix these fields describe."""
        return PretrainMix(weights=tuple(self.mix_weights), min_keys=self.mix_min_keys, max_keys=self.mix_max_keys,
                           max_questions=self.mix_max_questions, max_hops=self.mix_max_hops)


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE with single-digit number tokens; EOS/BOS ``<|endoftext|>``, pad ``<|pad|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None,
                                   model_max_length=max_length)


def model_config(cfg: BaseModelConfig, tokenizer):
    """The transformers config for ``cfg`` (Llama or Qwen3, tied embeddings)."""
    import transformers

    cls = transformers.LlamaConfig if cfg.family == "llama" else transformers.Qwen3Config
    return cls(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
               rope_theta=cfg.rope_theta, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)


class MixedRows:
    """Pretraining rows ``[seq_len]``: plain corpus slices or packed retrieval documents (seeded)."""

    def __init__(self, builder: TaskBuilder, stream: torch.Tensor, seq_len: int, task_fraction: float, seed: int,
                 eos_id: int, mix: PretrainMix | None = None):
        self.builder, self.stream, self.L = builder, stream, seq_len
        self.task_fraction = task_fraction
        self.mix = mix or PretrainMix()
        self.rng = random.Random(seed)
        self.eos = eos_id

    def row(self) -> list[int]:
        rng = self.rng
        if rng.random() >= self.task_fraction:
            s = rng.randrange(0, self.stream.numel() - self.L)
            return self.stream[s:s + self.L].tolist()
        out: list[int] = []
        short = min(256, self.L)
        while len(out) < self.L:
            # Document lengths spread from short to the full row, so recall distances cover [0, seq_len).
            # The last document is shortened to the room left, so that its questions and answers (at its end)
            # are not cut off; a room too small for a document is filled with plain text.
            room = self.L - len(out)
            if room < short:
                s = rng.randrange(0, self.stream.numel() - room)
                out += self.stream[s:s + room].tolist()
                break
            n = min(rng.randint(short, self.L), room - 1)
            out += self.builder.pretraining_document(rng, n, self.mix) + [self.eos]
        return out[:self.L]

    def batch(self, b: int) -> torch.Tensor:
        return torch.tensor([self.row() for _ in range(b)], dtype=torch.long)


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless ``[batch, seq_len]`` batches; worker ``w`` draws from its own seeded :class:`MixedRows`.

    A DataLoader takes batches from its workers in a fixed round-robin order, so the sequence of batches
    is a function of the seed and the number of workers only.
    """

    def __init__(self, builder, stream, seq_len, task_fraction, seed, eos_id, batch, mix=None):
        self.args = (builder, stream, seq_len, task_fraction)
        self.seed, self.eos, self.batch, self.mix = seed, eos_id, batch, mix

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rows = MixedRows(*self.args, seed=self.seed * 1009 + wid, eos_id=self.eos, mix=self.mix)
        while True:
            yield rows.batch(self.batch)


def _lr_at(step: int, cfg: BaseModelConfig, total: int | None = None) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``0.1 * lr`` at step ``total``."""
    total = cfg.steps if total is None else total
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int, rows: int, batch: int = 8) -> float:
    """Mean next-token loss of ``model`` over ``rows`` non-overlapping ``[seq_len]`` rows of ``stream``."""
    n = min(rows, (stream.numel() - 1) // seq_len)
    if n < 1:
        raise ValueError(f"validation stream of {stream.numel()} tokens is shorter than seq_len {seq_len}")
    dev = next(model.parameters()).device
    data = stream[:n * seq_len].view(n, seq_len)
    tot = 0.0
    for chunk in data.split(batch):
        chunk = chunk.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=chunk).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), chunk[:, 1:].flatten(),
                                                 reduction="sum")
        tot += float(loss)
    return tot / (n * (seq_len - 1))


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True):
    """TF32 for fp32 matmuls and convolutions inside the block only; the caller's settings come back after it
    (a library call must not leave process-wide numerics changed)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def build_base_model(corpus_dir: str | Path, out: str | Path, cfg: BaseModelConfig | None = None, seed: int = 0,
                     device: str | None = None, progress: bool = True, log=print) -> dict:
    """Train tokenizer + model from ``corpus_dir/train.jsonl.gz`` and export to ``out``; returns build info.

    ``corpus_dir`` must hold ``train.jsonl.gz`` and ``validation.jsonl.gz`` (the shared corpus layout).
    The validation loss is measured on plain validation text (``[seq_len]`` rows). On CUDA the fp32 master
    weights' matmuls run in TF32 during the build only (:func:`tf32_matmuls`).
    """
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tf32_matmuls(dev.startswith("cuda")):
        return _build_base_model(corpus_dir, out, cfg, seed, dev, progress, log)


def _build_base_model(corpus_dir, out, cfg, seed, device, progress, log) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    cfg = cfg or BaseModelConfig()
    corpus_dir, out = Path(corpus_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} exists and is not empty; choose another --out or delete it")
    t0 = time.time()
    train_texts = read_corpus(corpus_dir / "train.jsonl.gz", cfg.max_train_docs)
    val_texts = read_corpus(corpus_dir / "validation.jsonl.gz")
    # Tokenizer on a fixed, seed-independent sample (every k-th document up to tokenizer_chars).
    sample, n = [], 0
    for t in train_texts[::3]:
        sample.append(t)
        n += len(t)
        if n >= cfg.tokenizer_chars:
            break
    tok = train_tokenizer(sample, cfg.vocab_size, cfg.max_position_embeddings)
    stream = token_stream(tok, train_texts)
    val_stream = token_stream(tok, val_texts)
    t_tok = time.time() - t0
    log(f"tokenizer: vocab {len(tok)}, train stream {stream.numel():,} tokens, validation {val_stream.numel():,} "
        f"({t_tok:.0f}s)")
    builder = TaskBuilder(tok, stream, seed=seed)
    # Retrieval documents are assembled in Python; worker processes keep the GPU fed.
    loader = torch.utils.data.DataLoader(
        _BatchStream(builder, stream, cfg.seq_len, cfg.task_fraction, seed, tok.eos_token_id, cfg.batch_size,
                     cfg.mix()),
        batch_size=None, num_workers=cfg.data_workers, prefetch_factor=4 if cfg.data_workers else None,
        pin_memory=device.startswith("cuda"))
    batches = iter(loader)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg, tok), attn_implementation="sdpa",
                                             dtype=torch.float32).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))
    losses, t_train = [], time.time()
    bar = tqdm(total=cfg.steps, desc="pretraining base model", disable=not progress, dynamic_ncols=True)
    planned = cfg.steps  # the schedule's length; a time budget fits it to the measured step time
    t_calib = None
    steps_done = 0
    while steps_done < planned:
        step = steps_done
        if cfg.time_budget_s is not None and step in (cfg.calib_start, cfg.calib_end):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            now = time.time()
            if step == cfg.calib_start:
                t_calib = now
            else:
                per_step = (now - t_calib) / (cfg.calib_end - cfg.calib_start)
                left = cfg.time_budget_s - (now - t_train)
                planned = max(step + 1, min(cfg.steps, step + int(left / per_step)))
                bar.total = planned
                log(f"time budget {cfg.time_budget_s:g}s: {per_step * 1000:.1f} ms/step "
                    f"({cfg.batch_size * cfg.seq_len / per_step:,.0f} tokens/s) -> {planned} steps")
        ids = next(batches).to(device, non_blocking=True)
        lr = _lr_at(step, cfg, planned)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done += 1
        bar.update(1)
        if step % 25 == 0 or steps_done == planned:
            losses.append((step, float(loss.detach())))  # syncs the GPU only every 25 steps
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            if not progress and step % 200 == 0:
                log(f"pretraining step {step}/{planned} loss {losses[-1][1]:.3f} lr {lr:.2e} "
                    f"({time.time() - t_train:.0f}s)")
        if cfg.max_seconds is not None and time.time() - t_train > cfg.max_seconds:
            log(f"max_seconds={cfg.max_seconds} reached after {steps_done} of {planned} steps; stopping early")
            break
    bar.close()
    train_seconds = time.time() - t_train
    model.eval()
    val = eval_loss(model, val_stream, cfg.seq_len, rows=32)
    counts = torch.bincount(stream, minlength=len(tok)).double() + 1
    unigram = float(-(counts / counts.sum()).log()[val_stream].mean())

    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, cfg.save_dtype))
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"recipe": dataclasses.asdict(cfg), "seed": seed, "steps_done": steps_done, "steps_planned": planned,
            "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t0, 1),
            "val_loss": round(val, 4), "unigram_val_loss": round(unigram, 4),
            "final_train_loss": losses[-1][1] if losses else None, "loss_curve": losses,
            "params": sum(p.numel() for p in model.parameters()), "train_tokens": int(stream.numel()),
            "tokens_seen": steps_done * cfg.batch_size * cfg.seq_len,
            "tokens_per_s": round(steps_done * cfg.batch_size * cfg.seq_len / max(train_seconds, 1e-9)),
            "device": _device_name(device),
            "torch": torch.__version__}
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"base model: {info['params']:,} params, {steps_done} steps in {train_seconds:.0f}s, val loss {val:.3f} "
        f"(unigram {unigram:.3f}) -> {out}")
    return info


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def write_retrofit_mix(corpus_file: str | Path, tokenizer, out_file: str | Path, n_docs: int, doc_tokens: int,
                       task_fraction: float = 0.5, seed: int = 0, max_corpus_docs: int | None = 800,
                       mix: PretrainMix | None = None) -> Path:
    """Write a ``.jsonl.gz`` retrofit corpus: plain corpus documents and decoded retrieval documents.

    The retrofit should see the distribution the base model was trained on (including recall of planted
    facts, drawn with ``mix``, default :class:`PretrainMix`), else its retention heads never learn which tokens
    retrieval needs. The builder's seed differs from the pretraining one; facts are random either way.
    """
    import gzip

    texts = read_corpus(corpus_file, max_corpus_docs)
    stream = token_stream(tokenizer, texts)
    builder = TaskBuilder(tokenizer, stream, seed=seed + 7919)
    rng = random.Random(seed)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out_file, "wt", encoding="utf-8") as f:
        for i in range(n_docs):
            if rng.random() < task_fraction:
                ids = builder.pretraining_document(rng, rng.randint(doc_tokens // 4, doc_tokens), mix)
            else:
                s = rng.randrange(0, stream.numel() - doc_tokens)
                ids = stream[s:s + doc_tokens].tolist()
            f.write(json.dumps({"text": tokenizer.decode(ids)}) + "\n")
    return out_file
