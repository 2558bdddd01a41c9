"""The retrofit: logit distillation from the DMS-off teacher + one-sided compression loss.

``run_retrofit(RetrofitConfig)`` does everything the entry script promises: builds (or loads) the
model and data, patches the model, trains with accelerate (one GPU, DDP, DeepSpeed ZeRO-2/3, CPU
processes over gloo), logs losses, tokens/s and MFU to a progress bar and TensorBoard, checkpoints
atomically, resumes exactly, stops cleanly on SIGTERM, evaluates and exports (LoRA merged, ZeRO-3
weights gathered). Launch recipes and the resume contract: docs/scaleout.md.
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
from ..patching import (decoder_stack, dms_disabled, dms_state, enable_gradient_checkpointing, packed_documents,
                        retention_parameters, retrofit)
from ..schedule import CRSchedule
from ..stats import decision_stats, memory_cr_from_mask
from .checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from .config import RetrofitConfig
from .zero3 import frozen_teacher, gathered_student_state, param_residency, unsharded_lora_student


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

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:  # a frozen teacher never trains (no dropout), whatever wraps the module
            self.teacher.eval()
        return self

    def teacher_hidden(self, input_ids, doc_ids):
        with torch.no_grad():
            if self.teacher is not None:
                with packed_documents(self.teacher, doc_ids), dms_disabled(self.teacher):
                    return decoder_stack(self.teacher)(input_ids=input_ids, use_cache=False).last_hidden_state
            ctx = self.model.disable_adapter() if self.lora else _nullcontext()
            with ctx, packed_documents(self.model, doc_ids), dms_disabled(self.model):
                return decoder_stack(self.model)(input_ids=input_ids, use_cache=False).last_hidden_state

    def forward(self, input_ids, doc_ids, target_fraction: float):
        mask = doc_ids >= 0
        t_hidden = self.teacher_hidden(input_ids, doc_ids)
        with packed_documents(self.model, doc_ids):
            s_hidden = decoder_stack(self.model)(input_ids=input_ids, use_cache=False).last_hidden_state
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
    from transformers import AutoConfig

    from ..inference import _quiet_transformers

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    # a DMS checkpoint's retention weights are "unexpected" to the base class: prepare_student loads them
    quiet = _quiet_transformers() if _checkpoint_dms_config(hf_config) is not None else _nullcontext()
    with quiet:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_dtype(cfg.model.dtype) or "auto", trust_remote_code=cfg.model.trust_remote_code)
    return model, tok, path


def prepare_student(cfg: RetrofitConfig, model):
    """Retrofit in place, choose trainable parameters; returns (model, teacher or None, params, lora)."""
    t = cfg.train
    teacher = None
    if t.trainable == "full":
        teacher = frozen_teacher(model, cfg)  # ZeRO-3: loaded partitioned again, not a copy of empty shards
        retrofit(teacher, copy.deepcopy(cfg.dms))  # same attention path; always run with DMS off
    dms_cfg = copy.deepcopy(cfg.dms)
    dms_cfg.eps = float(getattr(model.config, "rms_norm_eps", dms_cfg.eps))
    warm = _checkpoint_dms_config(model.config)  # the base is itself a DMS checkpoint (ours or NVIDIA's)
    if warm is not None:
        if (warm.retention, warm.granularity) != (dms_cfg.retention, dms_cfg.granularity):
            raise ValueError(
                f"{cfg.model.name_or_path} is a DMS checkpoint with retention={warm.retention!r}, granularity="
                f"{warm.granularity!r}; this run asks for retention={dms_cfg.retention!r}, granularity="
                f"{dms_cfg.granularity!r}: pass --retention {warm.retention} --granularity {warm.granularity}")
        # its retention heads were trained with its own logit scale and offset: keep them
        dms_cfg.alpha_scale, dms_cfg.alpha_offset = warm.alpha_scale, warm.alpha_offset
    retrofit(model, dms_cfg)
    if warm is not None and dms_cfg.retention == "adapter" and cfg.model.name_or_path:
        from ..inference import load_retention_weights

        if load_retention_weights(model, cfg.model.name_or_path) == 0:
            raise ValueError(f"{cfg.model.name_or_path} declares DMS adapter retention heads but holds no "
                             "dms_retention / dms_proj_alpha weights")
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
        enable_gradient_checkpointing(model)
    if not params:
        raise ValueError(f"nothing to train with trainable={t.trainable!r} and retention={cfg.dms.retention!r}")
    return model, teacher, params, lora


def _checkpoint_dms_config(hf_config):
    """The DMS settings a loaded base carries (a retrofitted export or NVIDIA's format), else None.

    Continuing from such a checkpoint keeps its retention heads instead of starting them from zero."""
    from ..config import DMSConfig

    if not (isinstance(getattr(hf_config, "dms", None), dict) or getattr(hf_config, "dms_window_size", None) is not None):
        return None
    return DMSConfig.from_hf_config(hf_config)


# Activation checkpointing that also recomputes the retention heads lives in the library now.
enable_layer_checkpointing = enable_gradient_checkpointing


# --------------------------------------------------------------------------------------------------
# State save/restore
# --------------------------------------------------------------------------------------------------
# Every file of a checkpoint is listed with its size and sha256 in the manifest and verified before
# anything is loaded, so a planted or altered file is refused. Trainable weights are safetensors; the
# optimizer state (plain tensors and numbers) is loaded with ``torch.load(weights_only=True)``; RNG and
# trainer state are safetensors + JSON. DeepSpeed writes its own ``*.pt`` files (ZeRO partitions): they
# go through the same manifest, and we load them with ``torch.load`` forced to ``weights_only=True``.
DS_TAG = "deepspeed"


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


def _is_deepspeed(acc) -> bool:
    return acc.distributed_type.name == "DEEPSPEED"


class _weights_only_load:
    """Make ``torch.load`` default to ``weights_only=True`` (DeepSpeed's loader passes False)."""

    def __enter__(self):
        self._orig = torch.load

        def load(*a, **kw):
            kw["weights_only"] = True
            return self._orig(*a, **kw)

        torch.load = load

    def __exit__(self, *a):
        torch.load = self._orig
        return False


def _ds_safe_globals():
    """Plain value types DeepSpeed puts in its checkpoint dicts, allowed for ``weights_only`` loading."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except Exception:  # pragma: no cover - depends on the DeepSpeed version
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except Exception:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except Exception:  # pragma: no cover
        pass
    import argparse
    import collections

    return allowed + [argparse.Namespace, collections.OrderedDict, set]


def save_training_state(acc, folder: Path, model, optimizer, trainer_state: dict):
    """Every rank: write this rank's part of the state into ``folder`` (the temporary checkpoint)."""
    rank = acc.process_index
    if _is_deepspeed(acc):
        # all ranks: ZeRO partitions of the trainable parameters and optimizer; frozen weights come from the base
        model.save_checkpoint(str(folder), tag=DS_TAG, client_state={}, save_latest=False,
                              exclude_frozen_parameters=True)
    elif acc.is_main_process:
        save_file(_trainable_state(acc.unwrap_model(model).model), str(folder / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    tensors, plain = _rng_state()
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))
    (folder / f"rng_rank{rank}.json").write_text(json.dumps(plain))
    if acc.is_main_process:
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))


def read_trainer_state(folder: Path) -> dict:
    """The JSON trainer state of a verified checkpoint (step, sampler position, topology, config)."""
    p = Path(folder) / "trainer_state.json"
    if not p.is_file():
        raise CheckpointError(f"{p} is missing: {folder} is not a retrofit checkpoint")
    return json.loads(p.read_text())


def load_training_state(acc, folder: Path, model, optimizer) -> dict:
    rank = acc.process_index
    if _is_deepspeed(acc):
        import torch.serialization as ser

        with ser.safe_globals(_ds_safe_globals()), _weights_only_load():
            path, _ = model.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=False,
                                            load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}/{DS_TAG}")
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
    if not rng.is_file():
        raise CheckpointError(f"{rng} is missing: the checkpoint was written by fewer processes than this run has")
    _set_rng_state(load_file(str(rng)), json.loads((folder / f"rng_rank{rank}.json").read_text()))
    return read_trainer_state(folder)


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


def _deepspeed_plugin(t, log=print):
    """Under ``accelerate launch`` with a DeepSpeed config file: fill its ``"auto"`` values from the recipe.

    One JSON then serves every batch size; ``train_batch_size`` and ``train_micro_batch_size_per_gpu``
    are always explicit (DeepSpeed cannot infer them since the data loader is not handed to accelerate).
    Returns None when not launched with DeepSpeed.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        return None  # plugin built from the accelerate config's own deepspeed_config fields
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"DeepSpeed config {path!r} cannot be read ({e}); see recipes/deepspeed/*.json") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fill = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * world, "gradient_clipping": t.max_grad_norm}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"DeepSpeed config {path} sets {key}={ds[key]} but the recipe implies {value}; "
                             f"set it to \"auto\" in the JSON (or change the recipe to match)")
    mp = t.mixed_precision if t.mixed_precision != "auto" else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    for key, on in (("bf16", mp == "bf16"), ("fp16", mp == "fp16")):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", "auto") == "auto":
            ds[key]["enabled"] = on
    # The values accelerate would refuse to take from its own config next to a JSON were folded in above.
    fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        return DeepSpeedPlugin(hf_ds_config=ds)
    finally:
        if fields is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields


def _register_heads_for_zero3(module: DistillationModule, acc):
    """ZeRO-3: the LM heads are used by the loss outside their own forward; declare them to the top module."""
    if _zero_stage(acc) != 3:
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    heads = [module.model.get_output_embeddings()]
    if module.teacher is not None:
        heads.append(module.teacher.get_output_embeddings())
    for h in heads:
        for p in h.parameters(recurse=False):
            register_external_parameter(module, p)


class _Preemption:
    """SIGTERM on any rank -> every rank saves the current step and exits 0 (checked once per step)."""

    def __init__(self):
        import signal

        self.flag = False
        self._prev = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def any_rank(self, acc) -> bool:
        if acc.num_processes == 1:
            return self.flag
        f = torch.tensor([1.0 if self.flag else 0.0], device=acc.device)
        return bool(acc.reduce(f, reduction="sum").item() > 0)

    def restore(self):
        import signal

        signal.signal(signal.SIGTERM, self._prev)


def _fault(kind: str, step: int, rank: int, micro: int = -1):
    """Test hook (``DMS_TEST_FAULT=kind:step[:micro]:rank``): kill -9 / SIGTERM this process at a chosen point.

    kinds: ``kill`` (SIGKILL before micro-batch ``micro`` of step ``step``), ``killsave`` (SIGKILL after
    this rank wrote its part of checkpoint ``step``, before it is published), ``term`` (SIGTERM after ``step``).
    """
    spec = os.environ.get("DMS_TEST_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != kind:
        return
    if kind == "kill":
        s, m, r = int(parts[1]), int(parts[2]), int(parts[3])
        hit = (s, m, r) == (step, micro, rank)
    else:
        s, r = int(parts[1]), int(parts[2])
        hit = (s, r) == (step, rank)
    if hit:
        import signal

        os.kill(os.getpid(), signal.SIGKILL if kind in ("kill", "killsave") else signal.SIGTERM)


def model_flops_per_token(model_config, seq_len: int, n_params: int, n_trainable: int) -> float:
    """Model FLOPs per trained token: teacher forward, student forward and backward.

    2N per matmul pass over the weights (N = parameters without embeddings), plus causal attention
    (2 * 2 * layers * seq_len/2 * heads * head_dim per pass); the backward costs one pass for the
    activation gradients, plus one for the weight gradients of trainable matrices.
    """
    L = getattr(model_config, "num_hidden_layers", 0)
    heads = getattr(model_config, "num_attention_heads", 0)
    hd = getattr(model_config, "head_dim", None) or getattr(model_config, "hidden_size", 0) // max(heads, 1)
    attn = 2 * 2 * L * (seq_len / 2) * heads * hd
    dense = 2 * n_params + attn
    return 3 * dense + 2 * n_trainable  # teacher fwd + student fwd + student bwd (activations) + weight grads


def _peak_flops(acc) -> float | None:
    env = os.environ.get("DMS_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if acc.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(acc.device)
    for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0), ("A10", 125.0)):
        if key in name:
            return tflops * 1e12  # dense bf16 tensor-core peak
    return None


def run_retrofit(cfg: RetrofitConfig, log=print) -> dict:
    """Run a retrofit end to end; returns the summary dict (also written to ``<output>/summary.json``).

    Preempted by SIGTERM (on any rank): saves the current step on every rank and returns a summary with
    ``"preempted": True`` (no export); ``--resume auto`` continues exactly.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = cfg.train
    ds_plugin = _deepspeed_plugin(t, log)
    extra: dict = {}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU processes (CI, debugging): accelerate only sets up gloo when told so; without it every
        # process would silently train alone as a world of one.
        if ds_plugin is not None:
            from accelerate.utils import InitProcessGroupKwargs

            extra["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            extra["cpu"] = True
    acc = Accelerator(gradient_accumulation_steps=t.grad_accum,
                      mixed_precision=None if t.mixed_precision == "auto" else t.mixed_precision,
                      deepspeed_plugin=ds_plugin, log_with="tensorboard", project_dir=str(Path(t.output)), **extra)
    if acc.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"accelerate set up {acc.num_processes} process(es) but WORLD_SIZE is "
                         f"{os.environ.get('WORLD_SIZE')}: launch with `accelerate launch` or torchrun and a backend "
                         "this machine has")
    preempt = _Preemption()
    try:
        return _run(cfg, acc, preempt, log, tqdm, set_seed)
    finally:
        preempt.restore()


def _run(cfg, acc, preempt, log, tqdm, set_seed) -> dict:
    from accelerate.utils import gather_object

    t = cfg.train
    out, resume_dir = _prepare_output(cfg, acc)
    set_seed(t.seed)
    model, tok, base_path = build_model_and_tokenizer(cfg, acc.is_main_process)
    model, teacher, params, lora = prepare_student(cfg, model)
    module = DistillationModule(model, teacher, t.kl_chunk, t.kl_direction, lora)
    _register_heads_for_zero3(module, acc)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    n_trainable = sum(p.numel() for p in params)

    data = build_packed_dataset(cfg.data, tok, progress=acc.is_main_process)
    n_eval = min(max(t.eval_batches * t.batch_size, 0), len(data) // 5)
    train_ds = torch.utils.data.Subset(data, range(len(data) - n_eval))
    eval_ds = torch.utils.data.Subset(data, range(len(data) - n_eval, len(data)))
    sampler = ResumableSampler(len(train_ds), t.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                               seed=t.seed)
    loader = build_dataloader(train_ds, t.batch_size, sampler)
    fingerprint = data_fingerprint(cfg.data, tok, len(data))
    topology = {"world_size": acc.num_processes, "micro_batch": t.batch_size, "grad_accum": t.grad_accum,
                "distributed_type": acc.distributed_type.name,
                "zero_stage": _zero_stage(acc), "trainable": t.trainable, "data_fingerprint": fingerprint}
    if resume_dir is not None:  # refuse a different topology before DeepSpeed or the sampler fail obscurely
        _check_topology(read_trainer_state(resume_dir).get("topology", {}), topology, resume_dir)

    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    module, optimizer = acc.prepare(module, optimizer)
    schedule = CRSchedule(t.cr, t.cr_warmup_steps)

    # A DataLoader iterator draws a base seed when it starts; from a private generator, so that it does
    # not consume the global RNG that drives the Gumbel noise (a resumed run must continue it exactly).
    loader.generator = torch.Generator().manual_seed(t.seed)
    step = 0
    if resume_dir is not None:
        state = load_training_state(acc, resume_dir, module, optimizer)
        step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        log(f"resumed from {resume_dir} at step {step}")
    elif t.resume == "auto":
        log("no checkpoint found: starting a fresh run")
    it = iter(loader)

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        _truncate_log(out / "losses.jsonl", step)  # rows past the checkpoint came from the killed attempt
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
        _fault("killsave", step_done, acc.process_index)
        acc.wait_for_everyone()  # every rank's part is on disk before the main process publishes
        if acc.is_main_process:
            manager.publish(tmp, step_done, {"step": step_done, "topology": topology})  # prunes after `latest`
        acc.wait_for_everyone()

    bar = tqdm(total=t.steps, initial=step, disable=not (acc.is_main_process and t.progress), desc="retrofit",
               dynamic_ncols=True)
    history = []
    module.train()
    flops_tok = model_flops_per_token(acc.unwrap_model(module).model.config, cfg.data.seq_len, n_params, n_trainable)
    peak = _peak_flops(acc)
    t0 = time.time()
    t_window, tok_window = time.time(), 0
    tokens = 0
    preempted = False
    while step < t.steps:
        target = schedule.target_fraction(step)
        samples = []
        loss_sum = torch.zeros((), device=acc.device)
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(step, cfg)
        for micro in range(t.grad_accum):
            _fault("kill", step, acc.process_index, micro)
            try:
                batch = next(it)
            except StopIteration:  # the sampler is infinite; kept for safety
                it = iter(loader)
                batch = next(it)
            samples.extend(int(i) for i in batch["index"])
            n_tok = int((batch["doc_ids"] >= 0).sum())  # on the host copy: no device sync
            ids = batch["input_ids"].to(acc.device)
            docs = batch["doc_ids"].to(acc.device)
            with acc.accumulate(module):
                kl, comp, frac, records = module(ids, docs, target)
                loss = kl + t.compression_weight * comp
                acc.backward(loss)
                if acc.sync_gradients and t.max_grad_norm > 0 and not _is_deepspeed(acc):
                    acc.clip_grad_norm_(params, t.max_grad_norm)  # DeepSpeed clips itself (gradient_clipping)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum = loss_sum + loss.detach().float() / t.grad_accum
            tokens += n_tok * acc.num_processes
            tok_window += n_tok * acc.num_processes
        step += 1
        stats = decision_stats(records)
        step_loss = acc.reduce(loss_sum, reduction="mean") if acc.num_processes > 1 else loss_sum
        per_rank = gather_object(samples) if acc.num_processes > 1 else samples
        per_rank = [per_rank[r * len(samples):(r + 1) * len(samples)] for r in range(acc.num_processes)]
        # one device->host transfer for the logged scalars (each float() would be a sync of its own)
        step_loss, rank0_loss, kl_v, comp_v = torch.stack(
            [step_loss.float(), loss_sum, kl.detach().float(), comp.detach().float()]).tolist()
        row = {"step": step, "loss": step_loss, "rank0_loss": rank0_loss, "kl": kl_v,
               "compression_loss": comp_v, "target_cr": schedule.cr(step - 1),
               "decision_cr": stats["decision_cr"], "lr": _lr_at(step - 1, cfg),
               "elapsed_s": time.time() - t0, "tokens": tokens, "samples": per_rank}
        history.append(row)
        if acc.is_main_process:
            with open(out / "losses.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        now = time.time()
        tps = tok_window / max(now - t_window, 1e-9)
        mfu = tps * flops_tok / (peak * acc.num_processes) if peak else None
        post = {"loss": f"{row['loss']:.4f}", "kl": f"{row['kl']:.4f}", "target_cr": f"{row['target_cr']:.2f}",
                "cr": f"{row['decision_cr']:.2f}", "tok/s": f"{tps:.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        bar.set_postfix(**post)
        if step % t.log_every == 0 or step == t.steps:
            scalars = {f"train/{k}": v for k, v in row.items() if k not in ("step", "samples", "elapsed_s", "tokens")}
            scalars["perf/tokens_per_s"] = tps
            scalars["perf/tokens_per_s_per_device"] = tps / acc.num_processes
            if mfu is not None:
                scalars["perf/mfu"] = mfu
            for i, c in enumerate(stats["decision_cr_per_layer"]):
                scalars[f"cr_per_layer/layer_{i:02d}"] = c
            acc.log(scalars, step=step)
            t_window, tok_window = now, 0
        _fault("term", step, acc.process_index)
        stop = preempt.any_rank(acc)
        if stop or step % t.save_every == 0 or step == t.steps:
            checkpoint(step)
        if stop:
            log(f"SIGTERM received: saved step {step}; continue with --resume auto")
            preempted = True
            break
    bar.close()
    train_seconds = time.time() - t0
    if preempted:
        summary = {"preempted": True, "steps": step, "checkpoint": str(manager.root / f"step-{step:06d}")}
        acc.wait_for_everyone()
        acc.end_training()  # last: it may tear down the process group
        return summary

    eval_batches = [_collate([eval_ds[i] for i in range(s, min(s + t.batch_size, len(eval_ds)))])
                    for s in range(0, len(eval_ds), t.batch_size)]
    unwrapped = acc.unwrap_model(module)
    with _gathered_heads(unwrapped, acc):
        metrics = evaluate_batches(unwrapped, eval_batches, cfg.dms.window) if eval_batches else {}
    if metrics:
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    summary = {"base_model": base_path, "steps": step, "target_cr": t.cr, "window": cfg.dms.window,
               "final_train": {k: v for k, v in history[-1].items() if k != "samples"} if history else None,
               "eval": metrics, "train_seconds": train_seconds, "tokens_per_s": tokens / max(train_seconds, 1e-9),
               "data": cfg.data.source or "built-in default corpus", "trainable": t.trainable,
               "world_size": acc.num_processes, "zero_stage": _zero_stage(acc)}
    summary["param_residency"] = param_residency(unwrapped, acc)  # collective; per rank, elements held there
    full_state = None
    if _zero_stage(acc) == 3:  # collective: every rank takes part in gathering the partitioned weights
        full_state = gathered_student_state(module, t.trainable)
    if acc.is_main_process:
        export_dir = export(unwrapped, tok, out / "export", cfg, summary, lora, full_state)
        summary["export"] = str(export_dir)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()
    acc.end_training()  # last: it may tear down the process group
    return summary


def _gathered_heads(module, acc):
    if _zero_stage(acc) != 3:
        return _nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    heads = [module.model.get_output_embeddings()] + (
        [module.teacher.get_output_embeddings()] if module.teacher is not None else [])
    return GatheredParameters([p for h in heads for p in h.parameters(recurse=False)], modifier_rank=None)


def _truncate_log(path: Path, step: int):
    """Keep only rows of steps <= ``step`` (a resumed run rewrites the rest); atomic replace."""
    if not path.is_file():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip()]
    keep = []
    for l in rows:
        try:
            if json.loads(l)["step"] <= step:
                keep.append(l)
        except (json.JSONDecodeError, KeyError):  # a line cut by kill -9 mid-write
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _zero_stage(acc) -> int:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def _check_topology(saved: dict, now: dict, folder: Path):
    diffs = {k: (saved.get(k), now[k]) for k in now if k in saved and saved.get(k) != now[k]}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        hint = []
        if "world_size" in diffs or "zero_stage" in diffs or "distributed_type" in diffs:
            hint.append(f"relaunch with --num_processes {saved.get('world_size')} and the same accelerate/DeepSpeed "
                        f"config (ZeRO stage {saved.get('zero_stage')})")
        if "micro_batch" in diffs or "grad_accum" in diffs:
            hint.append(f"use --batch-size {saved.get('micro_batch')} --grad-accum {saved.get('grad_accum')}")
        if "data_fingerprint" in diffs:
            hint.append("use the same data source, split, seq_len, max_documents and tokenizer")
        if "trainable" in diffs:
            hint.append(f"use --trainable {saved.get('trainable')}")
        raise CheckpointError(
            f"cannot resume {folder} exactly: {detail}. To continue this run: {'; '.join(hint)}. "
            "To change the topology instead, export the model from the last checkpoint (finish or SIGTERM the run "
            "under the old topology) and start a new run with --model <that export> and another --output: the "
            "export's retention heads are kept (add --cr-warmup-steps 0 to keep the target CR from the start)")


def _flat_hparams(cfg: RetrofitConfig) -> dict:
    flat = {}
    for sec, d in cfg.to_dict().items():
        for k, v in d.items():
            if isinstance(v, (int, float, str, bool)):
                flat[f"{sec}.{k}"] = v
    return flat


def export(module: DistillationModule, tokenizer, folder: Path, cfg: RetrofitConfig, summary: dict, lora: bool,
           full_state: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) with DMS settings in config.json, the tokenizer and a run summary.

    Written to a temporary folder and renamed, so a crash never leaves a half export in place.
    """
    model = module.model
    if lora and full_state is not None:  # ZeRO-3: merge in a plain copy holding the gathered weights
        model, full_state = unsharded_lora_student(cfg, summary["base_model"], full_state), None
    if lora:
        model = model.merge_and_unload()
    tmp = folder.parent / (folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    state = dms_state(model)
    state.config.write_to_hf_config(model.config)
    model.config._attn_implementation_autoset = False
    if full_state is not None:  # ZeRO-3: weights gathered from all ranks, keys of the DistillationModule
        sd = {k[len("model."):]: v for k, v in full_state.items() if k.startswith("model.")}
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=sd)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "dms_run_summary.json").write_text(json.dumps({**summary, "config": cfg.to_dict()}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder
