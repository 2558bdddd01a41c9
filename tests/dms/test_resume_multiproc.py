"""Resume contract on 2 CPU processes (gloo): kill -9, SIGTERM, kill during save, topology checks, ZeRO-3.

Each test launches ``accelerate launch --cpu --num_processes 2 train/retrofit.py`` on a tiny Llama.
Faults are injected with ``DMS_TEST_FAULT`` (dms.training.loop._fault): a real SIGKILL/SIGTERM that
the process sends itself at an exact step / micro-batch, so the tests are deterministic.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def write_recipe(base: Path, path: Path, **train) -> Path:
    import yaml

    t = dict(steps=STEPS, cr=4, cr_warmup_steps=4, lr=5e-2, batch_size=1, grad_accum=2, save_every=2, keep_last=2,
             log_every=1, progress=False, eval_batches=1, mixed_precision="no")
    t.update(train)
    recipe = {"model": {"name_or_path": str(base / "model")},
              "data": {"source": str(base / "data.jsonl"), "seq_len": 48},
              "dms": {"window": 4, "attention_impl": "eager"}, "train": t}
    path.write_text(yaml.safe_dump(recipe))
    return path


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def launch(recipe: Path, out: Path, *extra, fault: str | None = None, nproc: int = 2, config_file: Path | None = None,
           timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    env.pop("DMS_TEST_FAULT", None)
    if fault:
        env["DMS_TEST_FAULT"] = fault
    if config_file is not None:  # DeepSpeed: accelerate launch (the JSON's "auto" values are filled by dms)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--main_process_port", str(_port())]
    else:  # DDP on CPU (gloo); `accelerate launch --cpu` would start a single process without MPI
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port())]
    cmd += [str(REPO / "train" / "retrofit.py"), "--recipe", str(recipe), "--output", str(out), *extra]
    return subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> dict[int, dict]:
    rows = [json.loads(l) for l in (out / "losses.jsonl").read_text().splitlines() if l.strip()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in losses.jsonl: {steps}"
    return {r["step"]: r for r in rows}


def _ok(p: subprocess.CompletedProcess, what: str):
    assert p.returncode == 0, f"{what}: rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_base_factory):
    return tiny_base_factory(tmp_path_factory.mktemp("mp-base"))


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The uninterrupted 2-process run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("mp-ref")
    recipe = write_recipe(base, root / "recipe.yaml")
    out = root / "run"
    _ok(launch(recipe, out), "uninterrupted run")
    return recipe, losses(out), out


def _assert_same_curve(ref: dict, got: dict, tol: float = 1e-6):
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for s in sorted(ref):
        assert abs(ref[s]["loss"] - got[s]["loss"]) <= tol, (s, ref[s]["loss"], got[s]["loss"])
        assert got[s]["samples"] == ref[s]["samples"], (s, ref[s]["samples"], got[s]["samples"])


def test_preemptions_resume_exactly_ddp(base, reference, tmp_path):
    """SIGTERM to rank 1 (all ranks save, exit 0), resume, kill -9 mid-accumulation after an epoch boundary, resume."""
    recipe, ref, ref_out = reference
    # per-rank sample ids: disjoint across ranks within a step; within an epoch no duplicate, across epochs complete
    ranks = len(ref[1]["samples"])
    assert ranks == 2 and all(len(r["samples"][k]) == 2 for r in ref.values() for k in range(ranks))
    for r in ref.values():
        assert not set(r["samples"][0]) & set(r["samples"][1])
    out = tmp_path / "run"

    # 1. SIGTERM delivered to rank 1 only, after step 3 (not a save step): every rank saves step 3, exit 0
    p = launch(recipe, out, fault="term:3:1")
    _ok(p, "SIGTERM run")
    assert _latest(out) == "step-000003"
    assert max(losses(out)) == 3
    assert not (out / "export").exists()

    # 2. resume; kill -9 rank 0 before the 2nd micro-batch of step 8 (index 7): mid-accumulation and past the
    #    first epoch boundary (26 train rows / 2 ranks = 13 micro-batches an epoch = 6.5 steps)
    p = launch(recipe, out, "--resume", "auto", fault="kill:7:1:0")
    assert p.returncode != 0
    assert _latest(out) == "step-000006"
    # only the main rank pruned, after the new one was complete: keep_last=2 of {3, 4, 6}
    assert sorted(c.name for c in (out / "checkpoints").glob("step-*")) == ["step-000004", "step-000006"]

    # 3. resume again (second resume in a row) and finish
    p = launch(recipe, out, "--resume", "auto")
    _ok(p, "final resume")
    assert "resumed from" in p.stdout + p.stderr
    got = losses(out)
    _assert_same_curve(ref, got)
    assert sorted(c.name for c in (out / "checkpoints").glob("step-*")) == ["step-000006", "step-000008"]
    assert not list((out / "checkpoints").glob(".tmp-*"))

    # every rank's sample stream is the uninterrupted one (no duplicate, no gap); the run crossed epochs
    for rk in range(ranks):
        stream = [i for st in sorted(got) for i in got[st]["samples"][rk]]
        assert stream == [i for st in sorted(ref) for i in ref[st]["samples"][rk]]
    # global order: step, micro-batch, rank. The first epoch hands out every row but at most one
    # remainder row exactly once; the next epoch starts right after (no gap, no duplicate).
    order = [i for st in sorted(got) for m in range(2) for rk in range(ranks) for i in got[st]["samples"][rk][m:m + 1]]
    first_dup = next(k for k in range(len(order)) if order[k] in order[:k])
    assert first_dup % 2 == 0 and first_dup >= len(set(order)) - 1, (first_dup, len(set(order)))
    assert first_dup // ranks <= 7 * 2, "the kill -9 at step 8 must come after the first epoch boundary"


def test_topology_or_data_change_refused(base, reference, tmp_path):
    """A 2-process checkpoint resumed on 1 process, or with other data, is refused with instructions."""
    from dms.training import CheckpointError, RetrofitConfig, load_recipe, run_retrofit

    recipe, ref, ref_out = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    d = load_recipe(str(recipe))
    d["train"].update(output=str(out), resume="auto", steps=STEPS + 2)
    with pytest.raises(CheckpointError, match=r"world_size: checkpoint 2 vs now 1.*--num_processes 2"):
        run_retrofit(RetrofitConfig.from_dict(d), log=lambda *a: None)
    d["data"]["max_documents"] = 10
    with pytest.raises(CheckpointError, match="data_fingerprint"):
        run_retrofit(RetrofitConfig.from_dict(d), log=lambda *a: None)
    # nothing written was touched
    assert _latest(out) == "step-000008"


def test_planted_pickle_refused_before_loading(base, reference, tmp_path):
    from dms.training import CheckpointError, RetrofitConfig, load_recipe, run_retrofit, verify_checkpoint

    recipe, ref, ref_out = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    ck = out / "checkpoints" / "step-000008"
    (ck / "rng_rank1.pt").write_bytes(b"\x80\x04cos\nsystem\nq\x00.")
    with pytest.raises(CheckpointError, match="rng_rank1.pt"):
        verify_checkpoint(ck)
    d = load_recipe(str(recipe))
    d["train"].update(output=str(out), resume=str(ck), steps=STEPS + 1)
    with pytest.raises(CheckpointError, match="not in its manifest"):
        run_retrofit(RetrofitConfig.from_dict(d), log=lambda *a: None)


ZERO3_ACCELERATE = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
"""


def test_zero3_kill_and_resume(base, tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU processes: kill -9 mid-accumulation, resume: same losses; checkpoint verified."""
    pytest.importorskip("deepspeed")
    from dms.training import verify_checkpoint

    cfg = tmp_path / "zero3.yaml"
    cfg.write_text(ZERO3_ACCELERATE.format(ds=REPO / "recipes" / "deepspeed" / "zero3.json"))
    recipe = write_recipe(base, tmp_path / "recipe.yaml", steps=4, save_every=2)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    _ok(launch(recipe, ref_out, config_file=cfg), "ZeRO-3 uninterrupted")
    p = launch(recipe, out, fault="kill:3:1:1", config_file=cfg)
    assert p.returncode != 0 and _latest(out) == "step-000002"
    ck = out / "checkpoints" / "step-000002"
    manifest = verify_checkpoint(ck)
    assert any(f.startswith("deepspeed/") for f in manifest["files"]), manifest["files"].keys()
    _ok(launch(recipe, out, "--resume", "auto", config_file=cfg), "ZeRO-3 resume")
    ref, got = losses(ref_out), losses(out)
    _assert_same_curve(ref, got)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2
    import dms

    model, tok = dms.load(summary["export"])
    assert model.generate(**tok(["w1 w2 w3"], return_tensors="pt"), max_new_tokens=3, do_sample=False,
                          pad_token_id=tok.pad_token_id).shape[1] == 6
