"""DeepSpeed ZeRO-3 specifics of the retrofit: a frozen teacher that stays sharded, per-rank shard
accounting, and the export's gathering of the student (LoRA merged in an unsharded copy).

Under ``accelerate launch`` with a ZeRO-3 config, accelerate registers the DeepSpeed config with
transformers, so ``from_pretrained`` builds the model inside ``deepspeed.zero.Init``: every rank
keeps only its shard of each weight (``p.ds_tensor``) and ``p.data`` is an empty placeholder
until a forward hook gathers it. Two things follow:

- The full fine-tune teacher cannot be ``copy.deepcopy`` of the student: that copies the empty
  placeholders, not the shards (the first forward then fails in DeepSpeed with
  ``torch.cat(): expected a non-empty list of Tensors``). It is loaded again from the base
  checkpoint under the same ``zero.Init``, so it is partitioned like the student; as a submodule of
  the module handed to ``deepspeed.initialize`` its shards are gathered layer by layer for its
  forward and released after, like the student's. It is frozen: its parameters are in no optimizer
  group and not in the ZeRO checkpoint (``exclude_frozen_parameters``); a resume reloads them from
  the base model.
- The export gathers the student's weights to the main process (collective, one module at a
  time). LoRA is merged in a plain CPU copy of the student built outside ZeRO-3 and loaded with the
  gathered weights (peft's merge on the sharded model would merge empty placeholders).
"""
from __future__ import annotations

import contextlib
import copy

import torch


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """True when the module's parameters were partitioned by ``deepspeed.zero.Init`` (ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def frozen_teacher(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """A frozen copy of the (not yet retrofitted) base ``model`` for full fine-tuning, in eval mode.

    ZeRO-3-partitioned base: the base checkpoint is loaded again (collective under ``zero.Init``, so
    every rank holds a shard); otherwise a deep copy.
    """
    if not is_zero3_partitioned(model):
        teacher = copy.deepcopy(model)
    else:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import is_deepspeed_zero3_enabled

        path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if not path or not is_deepspeed_zero3_enabled():
            raise RuntimeError(
                f"trainable='full' under DeepSpeed ZeRO-3: the student is partitioned but the teacher cannot be "
                f"loaded partitioned (base path {path!r}, transformers sees ZeRO-3: {is_deepspeed_zero3_enabled()}); "
                "load the base model with from_pretrained under `accelerate launch` with the ZeRO-3 config")
        dtype = None if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                       trust_remote_code=cfg.model.trust_remote_code)
        if not is_zero3_partitioned(teacher):
            raise RuntimeError(f"the ZeRO-3 teacher loaded from {path!r} is not partitioned (no zero.Init)")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def local_numel(module: torch.nn.Module | None) -> dict:
    """Elements this rank stores for ``module``'s parameters: ``{"numel": full size, "local": held here}``.

    A ZeRO-3 parameter whose full value is not gathered counts its shard (``ds_tensor``, padded to a
    multiple of the world size); a gathered or persistent one, or a plain parameter, counts in full.
    """
    if module is None:
        return {"numel": 0, "local": 0}
    full = local = 0
    for p in module.parameters():
        if hasattr(p, "ds_id"):
            full += int(p.ds_numel)
            local += int(p.ds_tensor.numel()) if p.data.numel() == 0 else int(p.data.numel())
        else:
            full += p.numel()
            local += p.numel()
    return {"numel": full, "local": local}


def param_residency(module, acc) -> list[dict]:
    """Per rank (collective): parameter elements of student and teacher held locally (see ``local_numel``)."""
    mine = {"rank": acc.process_index, "student": local_numel(module.model), "teacher": local_numel(module.teacher)}
    if acc.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


def gathered_student_state(engine, trainable: str) -> dict | None:
    """ZeRO-3, every rank (collective): the student's full weights on the main process, None elsewhere.

    Keys are those of the DistillationModule (``model.*``). The frozen teacher of a full fine-tune is
    left out (it is the base model), so the main process never holds it gathered; LoRA keeps the
    frozen base weights (the merge needs them).
    """
    # the engine's layer-by-layer gather; called directly rather than through accelerate's
    # get_state_dict, which refuses unless stage3_gather_16bit_weights_on_model_save is set
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable == "full")


@contextlib.contextmanager
def _without_zero3_init():
    """Build a model on this process alone: transformers must not use zero.Init (a collective) meanwhile."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_ds.set_hf_deepspeed_config(ref())


def unsharded_lora_student(cfg, base_path: str, state: dict):
    """Main process only: a plain CPU copy of the LoRA student (peft model) holding the gathered ``state``."""
    from transformers import AutoModelForCausalLM

    from .loop import prepare_student

    c = copy.deepcopy(cfg)
    c.model.gradient_checkpointing = False
    dtype = None if c.model.dtype == "auto" else getattr(torch, c.model.dtype)
    with _without_zero3_init():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or "auto",
                                                    trust_remote_code=c.model.trust_remote_code)
        model, _, _, _ = prepare_student(c, base)
    sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"gathered ZeRO-3 weights do not fit the LoRA student: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval()
