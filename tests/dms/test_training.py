"""Retrofit loop end to end on a tiny model: losses, checkpoints, exact resume, export -> load -> generate."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import dms
from dms.training import CheckpointError, RetrofitConfig, run_retrofit, verify_checkpoint


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_base_factory):
    """A tiny Llama + word-level tokenizer (no pad token) saved like a hub checkpoint, and a jsonl corpus."""
    return tiny_base_factory(tmp_path_factory.mktemp("base"), n_docs=80)


def _cfg(base, out, **train):
    t = dict(steps=6, cr=4, cr_warmup_steps=3, lr=5e-2, batch_size=2, save_every=2, keep_last=2, log_every=1,
             output=str(out), progress=False, eval_batches=2)
    t.update(train)
    return RetrofitConfig.from_dict({
        "model": {"name_or_path": str(base / "model")},
        "data": {"source": str(base / "data.jsonl"), "seq_len": 48},
        "dms": {"window": 4},
        "train": t,
    })


def _losses(out):
    return [json.loads(l) for l in (Path(out) / "losses.jsonl").read_text().splitlines()]


def test_retrofit_runs_exports_and_generates(tiny_base, tmp_path):
    out = tmp_path / "run"
    summary = run_retrofit(_cfg(tiny_base, out), log=lambda *a: None)
    assert summary["steps"] == 6
    ev = summary["eval"]
    assert ev["decision_cr"] >= 1.0 and ev["memory_cr"] >= 1.0 and ev["kl"] >= 0
    export = Path(summary["export"])
    assert (export / "model.safetensors").is_file() and (export / "dms_run_summary.json").is_file()
    assert json.loads((export / "config.json").read_text())["dms"]["window"] == 4
    assert not list(export.glob("*.bin")) and not list(export.glob("*.pt"))
    model, tok = dms.load(str(export))
    assert tok.pad_token is not None
    enc = tok(["w1 w2 w3 w4 w5 w6 w7 w8"], return_tensors="pt")
    out_ids = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out_ids.shape[1] == enc.input_ids.shape[1] + 5
    # retention heads survived the round trip
    trained = [p for n, p in model.named_parameters() if "dms_retention.proj.weight" in n]
    assert any(float(p.detach().abs().sum()) > 0 for p in trained)
    # checkpoints: only the last two kept, each verifiable
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000004", "step-000006"]
    for c in ckpts:
        verify_checkpoint(c)
    assert (out / "checkpoints" / "latest").read_text() == "step-000006"


def test_resume_reproduces_uninterrupted_losses(tiny_base, tmp_path):
    full = tmp_path / "full"
    run_retrofit(_cfg(tiny_base, full), log=lambda *a: None)
    part = tmp_path / "part"
    run_retrofit(_cfg(tiny_base, part, steps=4, cr_warmup_steps=3), log=lambda *a: None)
    # "preempted" after step 4: continue the same run to step 6
    run_retrofit(_cfg(tiny_base, part, resume="auto"), log=lambda *a: None)
    a = {r["step"]: r["loss"] for r in _losses(full)}
    b = {r["step"]: r["loss"] for r in _losses(part)}
    assert set(b) == set(range(1, 7))
    for s in range(1, 7):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])


def test_existing_output_refused_and_partial_checkpoints(tiny_base, tmp_path):
    out = tmp_path / "run"
    run_retrofit(_cfg(tiny_base, out, steps=2), log=lambda *a: None)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ValueError, match="already exists"):
        run_retrofit(_cfg(tiny_base, out, steps=2), log=lambda *a: None)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched
    # truncate a file of the only checkpoint: resume names it and refuses
    ck = out / "checkpoints" / "step-000002"
    f = ck / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        verify_checkpoint(ck)
    with pytest.raises(CheckpointError, match="Refusing"):
        run_retrofit(_cfg(tiny_base, out, steps=4, resume="auto"), log=lambda *a: None)
    # a planted file not in the manifest is rejected too
    shutil.rmtree(ck)
    run_retrofit(_cfg(tiny_base, tmp_path / "r2", steps=2), log=lambda *a: None)
    ck2 = tmp_path / "r2" / "checkpoints" / "step-000002"
    (ck2 / "evil.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match="evil.pkl"):
        verify_checkpoint(ck2)


def test_load_plain_model_is_refused(tiny_base):
    with pytest.raises(ValueError, match="no DMS settings"):
        dms.load(str(tiny_base / "model"))
