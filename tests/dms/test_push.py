"""scripts/push_to_hub.py: dry run writes a loadable folder; a mocked HfApi sees one private commit, no token."""
import importlib.util
import json
from pathlib import Path

import pytest

import dms

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_SECRETtoken1234567890abcdef"


def _script():
    spec = importlib.util.spec_from_file_location("push_to_hub", REPO / "scripts" / "push_to_hub.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_base_factory):
    from dms.training import RetrofitConfig, run_retrofit

    root = tiny_base_factory(tmp_path_factory.mktemp("push"), n_docs=30)
    run_retrofit(RetrofitConfig.from_dict({
        "model": {"name_or_path": str(root / "model")},
        "data": {"source": str(root / "data.jsonl"), "seq_len": 48}, "dms": {"window": 4},
        "train": {"steps": 2, "cr": 4, "batch_size": 2, "output": str(root / "run"), "progress": False,
                  "eval_batches": 1}}), log=lambda *a: None)
    return root / "run"


def _no_token_anywhere(folder: Path):
    for p in Path(folder).rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


def test_dry_run_folder_loads_and_generates(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "upload"
    assert _script().main([str(run_dir), "--repo", "me/tiny-dms", "--dry-run", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "README.md" in names and "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    card = (out / "README.md").read_text()
    for needle in ("target compression ratio", "| 4.0 |", "eviction window | 4", "training steps | 2", "Evaluation"):
        assert needle in card, needle
    model, tok = dms.load(str(out))
    ids = model.generate(**tok(["w1 w2 w3"], return_tensors="pt"), max_new_tokens=3, min_new_tokens=3,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert ids.shape[1] == 6
    _no_token_anywhere(out)
    cap = capsys.readouterr()
    assert TOKEN not in cap.out + cap.err


def test_push_is_one_private_commit_without_token(run_dir, monkeypatch, capsys):
    calls, seen = [], {}

    class FakeApi:
        def __init__(self, token=None, **kw):
            calls.append(("init", token is not None))

        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            folder = Path(kw["folder_path"])
            seen["files"] = sorted(p.name for p in folder.iterdir())
            _no_token_anywhere(folder)

            class Info:
                commit_url = "https://huggingface.co/me/tiny-dms/commit/abc"

            return Info()

        def create_commit(self, **kw):
            calls.append(("create_commit", kw))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert _script().main([str(run_dir), "--repo", "me/tiny-dms", "--token", TOKEN]) == 0
    kinds = [c[0] for c in calls]
    assert kinds.count("upload_folder") + kinds.count("create_commit") == 1  # one commit
    create = [c[1] for c in calls if c[0] == "create_repo"][0]
    assert create["private"] is True and create["repo_id"] == "me/tiny-dms"
    assert "model.safetensors" in seen["files"] and "README.md" in seen["files"]
    cap = capsys.readouterr()
    assert TOKEN not in cap.out + cap.err and "private" in cap.out


def test_refuses_pickles_and_non_dms(run_dir, tmp_path):
    import shutil

    mod = _script()
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "export", bad)
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        mod.stage(bad, "me/x", tmp_path / "o1")
    plain = tmp_path / "plain"
    shutil.copytree(run_dir / "export", plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("dms")
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no DMS settings"):
        mod.stage(plain, "me/x", tmp_path / "o2")
