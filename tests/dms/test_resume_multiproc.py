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


def _launch_env() -> dict:
    """The launchers' environment: offline, CPU DeepSpeed, no inherited fault, no GPU (these are CPU multi-process
    tests; on a one-GPU machine rank 1 would otherwise ask for cuda:1 and fail with "invalid device ordinal"). The
    repository goes in front of an inherited PYTHONPATH, not in its place (packages installed on a PYTHONPATH, e.g.
    DeepSpeed on the GPU machine, stay importable in the launched processes)."""
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=path, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    env.pop("DMS_TEST_FAULT", None)
    return env


def test_launch_env_keeps_an_inherited_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    monkeypatch.setenv("DMS_TEST_FAULT", "x")
    env = _launch_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/opt/site"] and "DMS_TEST_FAULT" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.delenv("PYTHONPATH")
    assert _launch_env()["PYTHONPATH"] == str(REPO)


def launch(recipe: Path, out: Path, *extra, fault: str | None = None, nproc: int = 2, config_file: Path | None = None,
           timeout: int = 240) -> subprocess.CompletedProcess:
    env = _launch_env()
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


def ds_config(folder: Path, stage: int = 3, **zero) -> Path:
    """An accelerate config for 2 processes with recipes/deepspeed/zero{stage}.json, ``zero_optimization`` overridden."""
    ds = REPO / "recipes" / "deepspeed" / f"zero{stage}.json"
    if zero:
        d = json.loads(ds.read_text())
        d["zero_optimization"].update(zero)
        ds = folder / f"zero{stage}.json"
        ds.write_text(json.dumps(d))
    cfg = folder / f"zero{stage}.yaml"
    cfg.write_text(ZERO3_ACCELERATE.format(ds=ds))
    return cfg


def _kill_resume(recipe: Path, cfg: Path, ref_out: Path, out: Path, fault: str = "kill:3:1:1", latest: int = 2):
    """kill -9 (rank 1, mid-accumulation), check the last published checkpoint, resume, compare with ``ref_out``."""
    from dms.training import verify_checkpoint

    p = launch(recipe, out, fault=fault, config_file=cfg)
    assert p.returncode != 0 and (out / "checkpoints" / "latest").is_file(), (p.returncode, p.stderr[-3000:])
    assert _latest(out) == f"step-{latest:06d}"
    manifest = verify_checkpoint(out / "checkpoints" / f"step-{latest:06d}")
    assert any(f.startswith("deepspeed/") for f in manifest["files"]), manifest["files"].keys()
    p = launch(recipe, out, "--resume", "auto", config_file=cfg)
    _ok(p, "resume")
    assert "resumed from" in p.stdout + p.stderr
    _assert_same_curve(losses(ref_out), losses(out))
    return json.loads((out / "summary.json").read_text())


def _generates(export: str):
    import dms

    model, tok = dms.load(export)
    assert model.generate(**tok(["w1 w2 w3"], return_tensors="pt"), max_new_tokens=3, do_sample=False,
                          pad_token_id=tok.pad_token_id).shape[1] == 6


@pytest.fixture(scope="module")
def zero3_reference(base, tmp_path_factory):
    """Uninterrupted ZeRO-3 run (adapter mode, recipes/deepspeed/zero3.json as shipped) on 2 processes."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("z3-ref")
    recipe = write_recipe(base, root / "recipe.yaml", steps=4, save_every=2)
    _ok(launch(recipe, root / "run", config_file=ds_config(root)), "ZeRO-3 uninterrupted")
    return recipe, root / "run"


def test_zero3_kill_and_resume(base, zero3_reference, tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU processes: kill -9 mid-accumulation, resume: same losses; checkpoint verified."""
    recipe, ref_out = zero3_reference
    summary = _kill_resume(recipe, ds_config(tmp_path), ref_out, tmp_path / "run")
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2
    _generates(summary["export"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_zero3_modes_kill_resume_and_export(base, zero3_reference, tmp_path, mode):
    """Full fine-tune and LoRA under ZeRO-3, 2 processes: kill -9, resume exactly, export the trained weights.

    Parameters are partitioned down to the smallest (persistence threshold 0), so the test also sees
    that each rank holds only its shard of the student and of the full fine-tune's frozen teacher.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    cfg = ds_config(tmp_path, stage3_param_persistence_threshold=0)
    recipe = write_recipe(base, tmp_path / "recipe.yaml", steps=4, save_every=2, trainable=mode, lora_r=4,
                          lora_alpha=8)
    ref_out = tmp_path / "ref"
    _ok(launch(recipe, ref_out, config_file=cfg), f"ZeRO-3 {mode} uninterrupted")
    summary = _kill_resume(recipe, cfg, ref_out, tmp_path / "run")
    assert summary["zero_stage"] == 3 and summary["trainable"] == mode

    # every rank holds about half of each model's parameters (shards padded to the world size)
    res = summary["param_residency"]
    assert [r["rank"] for r in res] == [0, 1]
    for who in ("student", "teacher") if mode == "full" else ("student",):
        n = res[0][who]["numel"]
        assert n > 0 and all(r[who]["numel"] == n for r in res)
        for r in res:
            assert n / 2 <= r[who]["local"] <= n / 2 + 64, (who, r)
    if mode == "lora":
        assert res[0]["teacher"]["numel"] == 0  # the teacher is the student with adapters and DMS off
    # the teacher is the base model: same held-out teacher perplexity as the adapter-mode run
    ref_summary = json.loads((zero3_reference[1] / "summary.json").read_text())
    assert summary["eval"]["teacher_ppl"] == pytest.approx(ref_summary["eval"]["teacher_ppl"], rel=1e-5)

    # the export holds the trained weights (DeepSpeed's own reader of the last ZeRO checkpoint), plain keys
    trained = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-000004"),
                                                       tag="deepspeed")
    trained = {k[len("model."):]: v for k, v in trained.items() if k.startswith("model.")}
    exported = load_file(str(Path(summary["export"]) / "model.safetensors"))
    based = load_file(str(base / "model" / "model.safetensors"))
    assert not [k for k in exported if "lora" in k or "base_layer" in k or k.startswith("base_model")]
    assert any("dms_retention" in k for k in exported)
    if mode == "full":
        assert set(exported) == set(trained)
        for k in exported:
            assert torch.equal(exported[k], trained[k]), k
    else:  # W + (alpha / r) B A on the four attention projections; every other weight is the base's
        lora = {}
        for k, v in trained.items():
            if ".lora_" in k:
                mod, ab = k.split(".lora_")
                lora.setdefault(mod.replace("base_model.model.", "", 1), {})[ab[0]] = v
        assert len(lora) == 4 * 2
        for k in exported:
            mod = k[: -len(".weight")]
            if mod in lora:
                want = based[k] + 2.0 * lora[mod]["B"] @ lora[mod]["A"]
                torch.testing.assert_close(exported[k], want, rtol=0, atol=1e-6)
                assert not torch.equal(exported[k], based[k]), k
            elif "dms_retention" in k:
                assert torch.equal(exported[k], trained[k.replace("model.", "base_model.model.model.", 1)]), k
            else:
                assert torch.equal(exported[k], based[k]), k
    _generates(summary["export"])


def test_zero2_kill_and_resume(base, tmp_path):
    """DeepSpeed ZeRO-2 on 2 CPU processes (full fine-tune): kill -9 mid-accumulation, resume: same losses."""
    pytest.importorskip("deepspeed")
    cfg = ds_config(tmp_path, stage=2)
    recipe = write_recipe(base, tmp_path / "recipe.yaml", steps=4, save_every=2, trainable="full")
    ref_out = tmp_path / "ref"
    _ok(launch(recipe, ref_out, config_file=cfg), "ZeRO-2 uninterrupted")
    summary = _kill_resume(recipe, cfg, ref_out, tmp_path / "run")
    assert summary["zero_stage"] == 2 and summary["world_size"] == 2
    # ZeRO-2 partitions gradients and optimizer state only: each rank holds the full weights
    for r in summary["param_residency"]:
        assert r["student"]["local"] == r["student"]["numel"] and r["teacher"]["local"] == r["teacher"]["numel"]
    _generates(summary["export"])


def launch_nodes(recipe: Path, out: Path, *extra, fault_node1: str | None = None, timeout: int = 240,
                 while_running=None):
    """recipes/accelerate/multinode_zero3.yaml as 2 nodes x 1 process on localhost: two launchers, one per node.

    Returns ``(return codes, outputs)``, node 0 first. ``fault_node1`` goes to node 1's environment only;
    ``while_running(procs, log_paths)`` is called once both launchers have started.
    """
    env = _launch_env()
    port = _port()
    procs, logs = [], []
    for node in (0, 1):
        node_env = dict(env, DMS_TEST_FAULT=fault_node1) if node == 1 and fault_node1 else env
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "recipes" / "accelerate" / "multinode_zero3.yaml"),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--mixed_precision", "no",  # the template says bf16 (GPUs); the CI recipe is fp32
               str(REPO / "train" / "retrofit.py"), "--recipe", str(recipe), "--output", str(out), *extra]
        logs.append(out.parent / f"{out.name}.node{node}.{port}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=str(REPO), env=node_env, stdout=f, stderr=subprocess.STDOUT))
    try:
        if while_running is not None:
            while_running(procs, logs)
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], [log.read_text() for log in logs]


def test_multinode_template_sigterm_and_resume(base, zero3_reference, tmp_path):
    """The multi-node template, 2 nodes x 1 process on localhost (ZeRO-3): SIGTERM to the rank on node 1 after
    step 3: both nodes save step 3 and exit 0; relaunching both with --resume auto continues the curve exactly."""
    recipe, ref_out = zero3_reference
    out = tmp_path / "run"
    codes, outs = launch_nodes(recipe, out, fault_node1="term:3:1")
    assert codes == [0, 0], (codes, outs[0][-3000:], outs[1][-3000:])
    for o in outs:  # each node's rank printed it: it saved and returned 0
        assert "preempted: saved step 3" in o, o[-3000:]
    assert _latest(out) == "step-000003" and max(losses(out)) == 3
    codes, outs = launch_nodes(recipe, out, "--resume", "auto")
    assert codes == [0, 0], (codes, outs[0][-3000:], outs[1][-3000:])
    assert "resumed from" in outs[0]
    _assert_same_curve(losses(ref_out), losses(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3


def _logged_steps(out: Path) -> int:
    path = out / "losses.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # a row being written
            pass
    return max(steps, default=0)


@pytest.mark.slow
def test_multinode_launcher_sigterm_and_resume(base, tmp_path):
    """SIGTERM to node 1's *launcher* (a scheduler's preemption notice) mid-run, 2 nodes x 1 process, ZeRO-3.

    torch elastic forwards it to node 1's rank; every rank saves the same step and returns 0 (each prints
    "preempted"). The signalled launcher itself exits non-zero (torch elastic's SignalException), and node 0's
    launcher, its rank done, waits in torch elastic's exit barrier for the departed peer (300 s, a blocking
    store wait that defers even SIGTERM): a scheduler ends it after its grace period, here a SIGKILL once its
    rank has exited. Relaunching both continues the curve exactly.
    """
    import re
    import signal
    import time

    pytest.importorskip("deepspeed")
    recipe = write_recipe(base, tmp_path / "recipe.yaml", steps=8, save_every=4)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    _ok(launch(recipe, ref_out, config_file=ds_config(tmp_path)), "ZeRO-3 uninterrupted")

    def preempt(procs, logs):
        deadline = time.time() + 180
        while procs[1].poll() is None and _logged_steps(out) < 2 and time.time() < deadline:
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)
        procs[1].wait(timeout=120)
        children = Path(f"/proc/{procs[0].pid}/task/{procs[0].pid}/children")
        while procs[0].poll() is None and ("preempted: saved step" not in logs[0].read_text()
                                           or children.read_text().split()):  # node 0's rank still running
            assert time.time() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.1)
        procs[0].kill()

    codes, outs = launch_nodes(recipe, out, while_running=preempt)
    found = re.search(r"preempted: saved step (\d+)", outs[1])
    assert found, (codes, outs[1][-3000:])
    step = int(found.group(1))
    assert f"preempted: saved step {step}" in outs[0], outs[0][-3000:]
    assert 2 <= step < 8 and _latest(out) == f"step-{step:06d}" and max(losses(out)) == step
    assert codes[1] != 0 and "SignalException" in outs[1]  # the launcher, not the rank
    codes, outs = launch_nodes(recipe, out, "--resume", "auto")
    assert codes == [0, 0], (codes, outs[0][-3000:], outs[1][-3000:])
    _assert_same_curve(losses(ref_out), losses(out))
