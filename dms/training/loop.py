"""The retrofit: logit distillation from the DMS-off teacher + one-sided compression loss.

``run_retrofit(RetrofitConfig)`` does everything the entry script promises: builds (or loads) the
model and data, patches the model, trains with accelerate (one GPU, DDP or DeepSpeed), logs to a
progress bar and TensorBoard, checkpoints atomically, resumes, evaluates and exports.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data import ResumableSampler, build_dataloader, build_packed_dataset, data_fingerprint
from ..losses import chunked_distillation_kl, compression_loss
from ..patching import decoder_stack, dms_disabled, dms_state, packed_documents, retention_parameters, retrofit
from ..schedule import CRSchedule
from ..stats import decision_stats, memory_cr_from_mask
from .checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from .config import RetrofitConfig


# --------------------------------------------------------------------------------------------------
# Model + teacher
# --------------------------------------------------------------------------------------------------
class DistillationModule(torch.nn.Module):
    """Student (the retrofitted model) and teacher in one module, so DDP/DeepSpeed wrap one forward.

    The teacher is the same model with DMS off (adapter-only and LoRA training: no second copy of the
    weights), or a frozen copy of the original model for full fine-tuning.
    """

    def __init__(self, model, teacher=None, kl_chunk: int = 1024, kl_direction: str = "forward", lora: bool = False):
        super().__init__()
        self.model = model
        self.teacher = teacher  # registered only for full fine-tuning; frozen
        self.kl_chunk = kl_chunk
        self.kl_direction = kl_direction
        self.lora = lora

    def teacher_hidden(self, input_ids, doc_ids):
        with torch.no_grad():
            if self.teacher is not None:
                with packed_documents(self.teacher, doc_ids), dms_disabled(self.teacher):
                    return decoder_stack(self.teacher)(input_ids=input_ids).last_hidden_state
            ctx = self.model.disable_adapter() if self.lora else _nullcontext()
            with ctx, packed_documents(self.model, doc_ids), dms_disabled(self.model):
                return decoder_stack(self.model)(input_ids=input_ids).last_hidden_state

    def forward(self, input_ids, doc_ids, target_fraction: float):
        mask = doc_ids >= 0
        t_hidden = self.teacher_hidden(input_ids, doc_ids)
        with packed_documents(self.model, doc_ids):
            s_hidden = decoder_stack(self.model)(input_ids=input_ids).last_hidden_state
        state = dms_state(self.model)
        lm_head = self.model.get_output_embeddings()
        t_head = self.teacher.get_output_embeddings() if self.teacher is not None else None
        kl = chunked_distillation_kl(s_hidden, t_hidden, lm_head, mask, self.kl_chunk, self.kl_direction, t_head)
        comp, frac = compression_loss(state.records, target_fraction)
        return kl, comp, frac, state.records


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _dtype(name: str):
    return None if name == "auto" else getattr(torch, name)


def build_model_and_tokenizer(cfg: RetrofitConfig, is_main: bool = True):
    """Load the base model (or the built-in default), attach a pad token, return (model, tokenizer, path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.model.name_or_path
    if path is None:
        from ..default_model import build_default_base_model

        path = str(build_default_base_model(progress=is_main))
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token is None:  # many base tokenizers ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_dtype(cfg.model.dtype) or "auto", trust_remote_code=cfg.model.trust_remote_code)
    return model, tok, path


def prepare_student(cfg: RetrofitConfig, model):
    """Retrofit in place, choose trainable parameters; returns (model, teacher or None, params, lora)."""
    t = cfg.train
    teacher = None
    if t.trainable == "full":
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
        retrofit(teacher, copy.deepcopy(cfg.dms))  # same attention path; always run with DMS off
    dms_cfg = copy.deepcopy(cfg.dms)
    dms_cfg.eps = float(getattr(model.config, "rms_norm_eps", dms_cfg.eps))
    retrofit(model, dms_cfg)
    model.requires_grad_(False)
    lora = False
    if t.trainable == "adapter":
        params = retention_parameters(model)
    elif t.trainable == "full":
        model.requires_grad_(True)
        params = [p for p in model.parameters()]
    else:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          modules_to_save=None)
        model = get_peft_model(model, lcfg)
        model._dms_state = dms_state(model)
        for n, p in model.named_parameters():
            if "dms_retention" in n:
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        lora = True
    for p in params:
        p.requires_grad_(True)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if not params:
        raise ValueError(f"nothing to train with trainable={t.trainable!r} and retention={cfg.dms.retention!r}")
    return model, teacher, params, lora


# --------------------------------------------------------------------------------------------------
# State save/restore (single process and DDP; DeepSpeed goes through accelerator.save_state)
# --------------------------------------------------------------------------------------------------
def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict):
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, st, g = plain["python"]
    random.setstate((v, tuple(st), g))
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_training_state(acc, folder: Path, model, optimizer, trainer_state: dict):
    rank = acc.process_index
    if acc.distributed_type.name == "DEEPSPEED":
        acc.save_state(str(folder), safe_serialization=True)
    elif acc.is_main_process:
        save_file(_trainable_state(acc.unwrap_model(model).model), str(folder / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    tensors, plain = _rng_state()
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))
    (folder / f"rng_rank{rank}.json").write_text(json.dumps(plain))
    if acc.is_main_process:
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))


def load_training_state(acc, folder: Path, model, optimizer) -> dict:
    rank = acc.process_index
    if acc.distributed_type.name == "DEEPSPEED":
        acc.load_state(str(folder))
    else:
        inner = acc.unwrap_model(model).model
        state = load_file(str(folder / "trainable.safetensors"))
        params = dict(inner.named_parameters())
        for n, t in state.items():
            if n not in params:
                raise CheckpointError(f"{folder}/trainable.safetensors has {n!r}, which this model does not have")
            params[n].data.copy_(t.to(params[n].device, params[n].dtype))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = folder / f"rng_rank{rank}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(str(rng)), json.loads((folder / f"rng_rank{rank}.json").read_text()))
    return json.loads((folder / "trainer_state.json").read_text())


# --------------------------------------------------------------------------------------------------
# Evaluation under inference semantics (hard decisions, no noise)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_batches(module: DistillationModule, batches, window: int) -> dict:
    """Student/teacher perplexity, KL and CRs on packed batches with the hard inference mask."""
    model = module.model
    was_training = model.training
    model.eval()
    nll_s = nll_t = kl_sum = 0.0
    n_tok = 0
    held = seen = 0.0
    ev = n_dec = 0.0
    dev = next(model.parameters()).device
    try:
        for b in batches:
            ids, docs = b["input_ids"].to(dev), b["doc_ids"].to(dev)
            th = module.teacher_hidden(ids, docs)
            with packed_documents(model, docs):
                sh = decoder_stack(model)(input_ids=ids).last_hidden_state
            records = dms_state(model).records
            head = model.get_output_embeddings()
            t_head = module.teacher.get_output_embeddings() if module.teacher is not None else head
            tgt_ok = (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)  # next token in the same document
            for i in range(ids.shape[0]):
                sl = torch.log_softmax(head(sh[i, :-1]).float(), -1)
                tl = torch.log_softmax(t_head(th[i, :-1]).float(), -1)
                tgt = ids[i, 1:]
                m = tgt_ok[i]
                nll_s += float(-(sl.gather(-1, tgt[:, None])[:, 0])[m].sum())
                nll_t += float(-(tl.gather(-1, tgt[:, None])[:, 0])[m].sum())
                kl_sum += float((tl.exp() * (tl - sl)).sum(-1)[m].sum())
                n_tok += int(m.sum())
            for r in records.values():
                ev += float(r["evicted"].sum())
                n_dec += float(r["count"]) * r["evicted"].numel()
                mask = r.get("evict_mask")
                if mask is not None:
                    valid = docs >= 0
                    cr = memory_cr_from_mask(mask, valid, window)
                    s = float(valid.sum()) * mask.shape[-1]
                    seen += s
                    held += s / cr
    finally:
        model.train(was_training)
    frac = ev / max(n_dec, 1.0)
    return {
        "student_ppl": math.exp(nll_s / max(n_tok, 1)),
        "teacher_ppl": math.exp(nll_t / max(n_tok, 1)),
        "kl": kl_sum / max(n_tok, 1),
        "decision_cr": 1.0 / max(1.0 - frac, 1e-9),
        "memory_cr": seen / max(held, 1.0),
        "eval_tokens": n_tok,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def _prepare_output(cfg: RetrofitConfig, acc) -> tuple[Path, Path | None]:
    out = Path(cfg.train.output)
    t = cfg.train
    manager = CheckpointManager(out / "checkpoints", t.keep_last, acc.is_main_process)
    resume_dir = None
    if t.resume not in (None, "", "auto"):
        resume_dir = Path(t.resume)
        verify_checkpoint(resume_dir)
    elif t.resume == "auto":
        resume_dir = manager.latest_complete()
    elif out.exists() and any(out.iterdir()):
        if not t.overwrite:
            raise ValueError(
                f"output folder {out} already exists and is not empty; pass --resume auto to continue that run, "
                "--overwrite to replace it, or choose another --output")
        if acc.is_main_process:
            shutil.rmtree(out)
    acc.wait_for_everyone()
    return out, resume_dir


def _lr_at(step: int, cfg) -> float:
    w = cfg.train.lr_warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / max(w, 1))


def run_retrofit(cfg: RetrofitConfig, log=print) -> dict:
    """Run a retrofit end to end; returns the summary dict (also written to ``<output>/summary.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = cfg.train
    acc = Accelerator(gradient_accumulation_steps=t.grad_accum, mixed_precision=t.mixed_precision,
                      log_with="tensorboard", project_dir=str(Path(t.output)))
    out, resume_dir = _prepare_output(cfg, acc)
    set_seed(t.seed)
    model, tok, base_path = build_model_and_tokenizer(cfg, acc.is_main_process)
    model, teacher, params, lora = prepare_student(cfg, model)
    module = DistillationModule(model, teacher, t.kl_chunk, t.kl_direction, lora)

    data = build_packed_dataset(cfg.data, tok, progress=acc.is_main_process)
    n_eval = min(max(t.eval_batches * t.batch_size, 0), len(data) // 5)
    train_ds = torch.utils.data.Subset(data, range(len(data) - n_eval))
    eval_ds = torch.utils.data.Subset(data, range(len(data) - n_eval, len(data)))
    sampler = ResumableSampler(len(train_ds), t.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                               seed=t.seed)
    loader = build_dataloader(train_ds, t.batch_size, sampler)
    fingerprint = data_fingerprint(cfg.data, tok, len(data))

    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    module, optimizer = acc.prepare(module, optimizer)
    schedule = CRSchedule(t.cr, t.cr_warmup_steps)
    topology = {"world_size": acc.num_processes, "micro_batch": t.batch_size, "grad_accum": t.grad_accum,
                "distributed_type": acc.distributed_type.name,
                "zero_stage": _zero_stage(acc), "data_fingerprint": fingerprint}

    # A DataLoader iterator draws a base seed when it starts; from a private generator, so that it does
    # not consume the global RNG that drives the Gumbel noise (a resumed run must continue it exactly).
    loader.generator = torch.Generator().manual_seed(t.seed)
    it = iter(loader)
    step = 0
    if resume_dir is not None:
        state = load_training_state(acc, resume_dir, module, optimizer)
        _check_topology(state.get("topology", {}), topology, resume_dir)
        step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        log(f"resumed from {resume_dir} at step {step}")
    elif t.resume == "auto":
        log("no checkpoint found: starting a fresh run")

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    acc.init_trackers("tensorboard", config=_flat_hparams(cfg))
    manager = CheckpointManager(out / "checkpoints", t.keep_last, acc.is_main_process)

    def checkpoint(step_done: int):
        tmp = manager.tmp_dir(step_done, nonce="r")  # same name on every rank (shared filesystem)
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        trainer_state = {"step": step_done, "sampler": sampler.state_dict(), "topology": topology,
                         "config": cfg.to_dict(), "schedule": {"cr": schedule.cr(step_done)}}
        save_training_state(acc, tmp, module, optimizer, trainer_state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            manager.publish(tmp, step_done, {"step": step_done})
        acc.wait_for_everyone()

    bar = tqdm(total=t.steps, initial=step, disable=not (acc.is_main_process and t.progress), desc="retrofit",
               dynamic_ncols=True)
    history = []
    module.train()
    t0 = time.time()
    tokens = 0
    while step < t.steps:
        target = schedule.target_fraction(step)
        samples = []
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(step, cfg)
        for micro in range(t.grad_accum):
            try:
                batch = next(it)
            except StopIteration:  # the sampler is infinite; kept for safety
                it = iter(loader)
                batch = next(it)
            samples.extend(int(i) for i in batch["index"])
            ids = batch["input_ids"].to(acc.device)
            docs = batch["doc_ids"].to(acc.device)
            with acc.accumulate(module):
                kl, comp, frac, records = module(ids, docs, target)
                loss = kl + t.compression_weight * comp
                acc.backward(loss)
                if acc.sync_gradients and t.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += int((docs >= 0).sum()) * acc.num_processes
        step += 1
        stats = decision_stats(records)
        row = {"step": step, "loss": float(loss.detach()), "kl": float(kl.detach()), "compression_loss": float(comp.detach()),
               "target_cr": schedule.cr(step - 1), "decision_cr": stats["decision_cr"], "lr": _lr_at(step - 1, cfg),
               "samples": samples}
        history.append(row)
        if acc.is_main_process:
            with open(out / "losses.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.4f}", target_cr=f"{row['target_cr']:.2f}",
                        cr=f"{row['decision_cr']:.2f}")
        if step % t.log_every == 0 or step == t.steps:
            scalars = {f"train/{k}": v for k, v in row.items() if k not in ("step", "samples")}
            scalars["train/tokens_per_s"] = tokens / max(time.time() - t0, 1e-9)
            for i, c in enumerate(stats["decision_cr_per_layer"]):
                scalars[f"cr_per_layer/layer_{i:02d}"] = c
            acc.log(scalars, step=step)
        if step % t.save_every == 0 or step == t.steps:
            checkpoint(step)
    bar.close()

    eval_batches = [_collate([eval_ds[i] for i in range(s, min(s + t.batch_size, len(eval_ds)))])
                    for s in range(0, len(eval_ds), t.batch_size)]
    unwrapped = acc.unwrap_model(module)
    metrics = evaluate_batches(unwrapped, eval_batches, cfg.dms.window) if eval_batches else {}
    if metrics:
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    acc.end_training()
    summary = {"base_model": base_path, "steps": step, "target_cr": t.cr, "window": cfg.dms.window,
               "final_train": history[-1] if history else None, "eval": metrics,
               "train_seconds": time.time() - t0, "data": cfg.data.source or "built-in default corpus",
               "trainable": t.trainable}
    if acc.is_main_process:
        export_dir = export(unwrapped, tok, out / "export", cfg, summary, lora)
        summary["export"] = str(export_dir)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()
    return summary


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _zero_stage(acc) -> int:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def _check_topology(saved: dict, now: dict, folder: Path):
    diffs = {k: (saved.get(k), now[k]) for k in now if k in saved and saved.get(k) != now[k]}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diffs.items())
        raise CheckpointError(
            f"cannot resume {folder} exactly: {detail}. Resume with the same number of processes, micro-batch, "
            "gradient accumulation, ZeRO stage and data, or start a new run from the exported model")


def _flat_hparams(cfg: RetrofitConfig) -> dict:
    flat = {}
    for sec, d in cfg.to_dict().items():
        for k, v in d.items():
            if isinstance(v, (int, float, str, bool)):
                flat[f"{sec}.{k}"] = v
    return flat


def export(module: DistillationModule, tokenizer, folder: Path, cfg: RetrofitConfig, summary: dict, lora: bool) -> Path:
    """``save_pretrained`` (safetensors) with DMS settings in config.json, the tokenizer and a run summary.

    Written to a temporary folder and renamed, so a crash never leaves a half export in place.
    """
    model = module.model
    if lora:
        model = model.merge_and_unload()
    tmp = folder.parent / (folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    state = dms_state(model)
    state.config.write_to_hf_config(model.config)
    model.config._attn_implementation_autoset = False
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "dms_run_summary.json").write_text(json.dumps({**summary, "config": cfg.to_dict()}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder
