"""Training modes (LoRA, full fine-tune), atomic saves under a crash, pruning, DeepSpeed config filling (1 process)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import dms
from dms.training import CheckpointError, CheckpointManager, RetrofitConfig, run_retrofit, verify_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_base_factory):
    return tiny_base_factory(tmp_path_factory.mktemp("so-base"), n_docs=30)


def _cfg(base, out, **train):
    t = dict(steps=4, cr=4, cr_warmup_steps=3, lr=5e-2, batch_size=2, save_every=2, keep_last=2, log_every=1,
             output=str(out), progress=False, eval_batches=1, lora_r=4)
    t.update(train)
    return RetrofitConfig.from_dict({"model": {"name_or_path": str(base / "model")},
                                     "data": {"source": str(base / "data.jsonl"), "seq_len": 48},
                                     "dms": {"window": 4}, "train": t})


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "losses.jsonl").read_text().splitlines())}


def _quiet(*a):
    pass


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_mode_trains_resumes_exactly_and_exports_clean(base, tmp_path, mode):
    full = run_retrofit(_cfg(base, tmp_path / "a", trainable=mode), log=_quiet)
    run_retrofit(_cfg(base, tmp_path / "b", trainable=mode, steps=2), log=_quiet)
    run_retrofit(_cfg(base, tmp_path / "b", trainable=mode, resume="auto"), log=_quiet)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)

    # the teacher is the untouched base model (LoRA: adapters disabled + DMS off; full: a frozen copy)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(base / "model"))
    export = Path(full["export"])
    from safetensors.torch import load_file

    sd = load_file(str(export / "model.safetensors"))
    assert not [k for k in sd if "lora" in k or "base_layer" in k], "LoRA must be merged into plain weights"
    assert any("dms_retention" in k for k in sd)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sd[q], plain.state_dict()[q]), "the merged/fine-tuned weights differ from the base"
    assert full["eval"]["teacher_ppl"] == pytest.approx(_teacher_ppl_of_base(base, plain), rel=1e-5)
    model, tok = dms.load(str(export))
    out = model.generate(**tok(["w1 w2 w3 w4"], return_tensors="pt"), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == 8


_PPL = {}


def _teacher_ppl_of_base(base, plain):
    """Teacher perplexity from an adapter-mode run (whose teacher is the base model with DMS off)."""
    if "ppl" not in _PPL:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            s = run_retrofit(_cfg(base, Path(d) / "r", steps=1), log=_quiet)
        _PPL["ppl"] = s["eval"]["teacher_ppl"]
    return _PPL["ppl"]


def test_crash_during_save_keeps_previous_checkpoint(base, tmp_path, monkeypatch):
    """A save that dies half-way (files partly written, never published) leaves the previous one in use."""
    import dms.training.loop as loop

    out = tmp_path / "run"
    run_retrofit(_cfg(base, out, steps=2), log=_quiet)
    real = loop.save_training_state

    def dying(acc, folder, *a, **k):
        real(acc, folder, *a, **k)
        (folder / "optimizer.pt").write_bytes(b"half")  # a torn write
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(loop, "save_training_state", dying)
    with pytest.raises(KeyboardInterrupt):
        run_retrofit(_cfg(base, out, steps=4, resume="auto"), log=_quiet)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step-000002"
    assert [p.name for p in ck.glob("step-*")] == ["step-000002"]
    assert list(ck.glob(".tmp-step-000004-*"))
    verify_checkpoint(ck / "step-000002")
    monkeypatch.setattr(loop, "save_training_state", real)
    run_retrofit(_cfg(base, out, steps=4, resume="auto"), log=_quiet)  # resumes from step 2, finishes
    assert (ck / "latest").read_text() == "step-000004" and not list(ck.glob(".tmp-*"))
    ref = tmp_path / "ref"
    run_retrofit(_cfg(base, ref, steps=4), log=_quiet)
    a, b = _losses(ref), _losses(out)
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)


def test_only_partial_checkpoints_refused(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000004-r").mkdir(parents=True)
    (root / ".tmp-step-000004-r" / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="only interrupted saves"):
        CheckpointManager(root).latest_complete()


def test_prune_only_main_and_only_after_publish(tmp_path):
    root = tmp_path / "checkpoints"
    main, other = CheckpointManager(root, keep_last=1, is_main=True), CheckpointManager(root, keep_last=1, is_main=False)
    for step in (1, 2):
        tmp = main.tmp_dir(step)
        tmp.mkdir(parents=True)
        (tmp / "w.safetensors").write_bytes(b"x" * step)
        main.publish(tmp, step)
    assert [p.name for p in main.step_dirs()] == ["step-000002"]
    # a non-main rank never deletes, even with old checkpoints around
    keep = root / "step-000001"
    keep.mkdir()
    other.prune()
    assert keep.exists()
    # publish writes the manifest and renames before pruning: a failing rename leaves the old one alone
    tmp = main.tmp_dir(3)
    tmp.mkdir()
    (tmp / "w.safetensors").write_bytes(b"abc")
    import os

    real_rename = os.rename

    def boom(a, b):
        raise OSError("disk full")

    os.rename = boom
    try:
        with pytest.raises(OSError):
            main.publish(tmp, 3)
    finally:
        os.rename = real_rename
    assert (root / "step-000002").exists() and (root / "latest").read_text() == "step-000002"


def test_deepspeed_auto_values_filled(monkeypatch, tmp_path):
    pytest.importorskip("deepspeed")
    from dms.training.config import TrainConfig
    from dms.training.loop import _deepspeed_plugin

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(repo / "recipes/deepspeed/zero3.json"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    plugin = _deepspeed_plugin(TrainConfig(batch_size=2, grad_accum=3, max_grad_norm=0.5))
    c = plugin.hf_ds_config.config
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (2, 3, 24)
    assert c["gradient_clipping"] == 0.5 and c["bf16"]["enabled"] is True and c["zero_optimization"]["stage"] == 3
    bad = json.loads((repo / "recipes/deepspeed/zero2.json").read_text())
    bad["train_micro_batch_size_per_gpu"] = 7
    (tmp_path / "ds.json").write_text(json.dumps(bad))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=7"):
        _deepspeed_plugin(TrainConfig(batch_size=2))


def test_mfu_flops_formula():
    from transformers import LlamaConfig

    from dms.training.loop import model_flops_per_token

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    f = model_flops_per_token(cfg, seq_len=128, n_params=1000, n_trainable=10)
    attn = 2 * 2 * 2 * 64 * 4 * 16
    assert f == 3 * (2 * 1000 + attn) + 2 * 10


def test_gradient_checkpointing_same_losses(base, tmp_path):
    """Checkpointed layers recompute the retention heads with the first pass's documents and noise."""
    d = _cfg(base, tmp_path / "plain", steps=3, grad_accum=2).to_dict()
    run_retrofit(RetrofitConfig.from_dict(d), log=_quiet)
    d["model"]["gradient_checkpointing"] = True
    d["train"]["output"] = str(tmp_path / "gc")
    run_retrofit(RetrofitConfig.from_dict(d), log=_quiet)
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "gc")
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)


def test_frozen_teacher_stays_in_eval_mode(make_tiny_model):
    """The full fine-tune teacher: a frozen copy that `module.train()` (DDP/DeepSpeed wrappers) never flips."""
    from dms.training.config import RetrofitConfig
    from dms.training.loop import DistillationModule
    from dms.training.zero3 import frozen_teacher, is_zero3_partitioned, local_numel

    model = make_tiny_model("llama")
    cfg = RetrofitConfig.from_dict({"train": {"trainable": "full"}})
    teacher = frozen_teacher(model, cfg)
    assert teacher is not model and not is_zero3_partitioned(teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    module = DistillationModule(model, teacher).train()
    assert module.model.training and not module.teacher.training
    n = sum(p.numel() for p in model.parameters())
    assert local_numel(teacher) == {"numel": n, "local": n} and local_numel(None) == {"numel": 0, "local": 0}


def test_new_run_from_dms_export_keeps_retention_heads(base, tmp_path):
    """--model <a DMS export>: the retention heads continue from the export (not from zero), with its logit
    scale/offset; a different retention type is refused with the flags to pass."""
    from safetensors.torch import load_file

    from dms.training.loop import build_model_and_tokenizer, prepare_student

    res = run_retrofit(_cfg(base, tmp_path / "a", steps=3), log=_quiet)
    export = Path(res["export"])
    saved = {k: v for f in export.glob("*.safetensors") for k, v in load_file(str(f)).items() if "dms_retention" in k}
    assert saved and any(v.abs().sum() > 0 for v in saved.values())  # trained, not the zero init
    cfg = RetrofitConfig.from_dict({"model": {"name_or_path": str(export)},
                                    "data": {"source": str(base / "data.jsonl"), "seq_len": 48},
                                    "dms": {"window": 4, "alpha_offset": 1.0}, "train": {"output": str(tmp_path / "b")}})
    model, _, _ = build_model_and_tokenizer(cfg)
    model, _, _, _ = prepare_student(cfg, model)
    got = {n: p for n, p in model.named_parameters() if "dms_retention" in n}
    for k, v in saved.items():
        name = k[len("model."):] if k.startswith("model.") and k not in got else k
        assert torch.equal(got[name].detach().float(), v.float()), k
    ref = dms.DMSConfig.from_hf_config(model.config)
    assert dms.dms_state(model).config.alpha_offset == ref.alpha_offset != 1.0  # the export's, not the flag's
    bad = RetrofitConfig.from_dict({**cfg.to_dict(), "dms": {"window": 4, "retention": "q_neuron"},
                                    "train": {"output": str(tmp_path / "c"), "trainable": "full"}})
    model, _, _ = build_model_and_tokenizer(bad)
    with pytest.raises(ValueError, match="--retention adapter"):
        prepare_student(bad, model)
