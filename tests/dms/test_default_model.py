"""dms.default_model: stdlib corpus, tiny offline base-model build, atomic cache."""
from __future__ import annotations

import json
import re

import pytest
import torch

from dms import default_model as dm
from dms.default_model import (
    DEFAULT_MODEL_HELP,
    DefaultModelConfig,
    build_default_base_model,
    default_corpus_texts,
    default_model_dir,
    is_complete_build,
)

TINY = DefaultModelConfig(
    vocab_size=320, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, max_position_embeddings=64, seq_len=32, batch_size=2, warmup_steps=1,
    max_corpus_chars=30_000, eval_rows=2,
)


def test_corpus_nonempty_deterministic_and_capped():
    docs = default_corpus_texts()
    assert len(docs) > 100 and sum(map(len, docs)) > 500_000
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert not any(re.search(r" at 0x[0-9a-f]+", d) for d in docs)
    dm._collect_stdlib_docs.cache_clear()  # recollect in a fresh interpreter
    assert default_corpus_texts() == docs
    capped = default_corpus_texts(max_chars=10_000)
    assert sum(map(len, capped)) == 10_000 and capped[0] == docs[0][:10_000]
    with pytest.raises(ValueError, match="max_chars"):
        default_corpus_texts(max_chars=0)


def test_help_and_default_dir(monkeypatch, tmp_path):
    assert "--model Qwen/Qwen3-8B --data" in DEFAULT_MODEL_HELP
    monkeypatch.setenv("DMS_CACHE_DIR", str(tmp_path))
    assert default_model_dir(seed=3) == tmp_path / "default-base-v1-seed3"
    other = default_model_dir(seed=3, steps=5, config=TINY)
    assert other.parent == tmp_path and other.name.startswith("default-base-v1-seed3-")
    monkeypatch.delenv("DMS_CACHE_DIR")
    assert default_model_dir().parts[-3:] == (".cache", "dms", "default-base-v1-seed0")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"hidden_size": 100}, "num_heads x head_dim"),
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"seq_len": 8192}, "seq_len"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DefaultModelConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    # A leftover temporary folder of an interrupted build must be ignored.
    stale = root / ".model.tmp-999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = build_default_base_model(cache_dir=root / "model", seed=0, steps=3, progress=False, config=TINY)
    return root, path


def test_build_produces_loadable_checkpoint(tiny_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, path = tiny_build
    assert path == root / "model" and is_complete_build(path)
    assert (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    enc = tok(["def foo(): return the value"], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape[-1] == len(tok) and torch.isfinite(out.logits).all()
    info = json.loads((path / "build_info.json").read_text())
    for key in ("steps", "seconds", "train_loss", "val_loss", "unigram_val_loss", "params", "corpus_chars"):
        assert key in info
    assert info["steps"] == 3 and info["params"] == sum(p.numel() for p in model.parameters())
    # the stale temporary folder was neither used nor touched, no other folder appeared
    assert sorted(p.name for p in root.iterdir()) == [".model.tmp-999-deadbeef", "model"]


def test_rebuild_is_cache_hit(tiny_build, monkeypatch):
    _, path = tiny_build

    def boom(*args, **kwargs):
        raise AssertionError("cache hit expected, but a build started")

    monkeypatch.setattr(dm, "_build_into", boom)
    assert build_default_base_model(cache_dir=path, seed=0, steps=3, progress=False, config=TINY) == path
    with pytest.raises(ValueError, match="another recipe"):
        build_default_base_model(cache_dir=path, seed=1, steps=3, progress=False, config=TINY)


def test_build_is_deterministic(tiny_build, tmp_path):
    from safetensors.torch import load_file

    _, path = tiny_build
    again = build_default_base_model(cache_dir=tmp_path / "again", seed=0, steps=3, progress=False, config=TINY)
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (path / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_incomplete_target_and_interrupted_build(tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a complete default-model build"):
        build_default_base_model(cache_dir=partial, steps=3, progress=False, config=TINY)

    def crash(out, *args, **kwargs):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "_build_into", crash)
    with pytest.raises(KeyboardInterrupt):
        build_default_base_model(cache_dir=tmp_path / "m", steps=3, progress=False, config=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]  # no target, tmp removed


def test_auto_cache_folder_rebuilt_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("DMS_CACHE_DIR", str(tmp_path))
    auto = default_model_dir(seed=0, steps=2, config=TINY)
    auto.mkdir(parents=True)
    (auto / "config.json").write_text("{}")  # e.g. a half-copied folder
    path = build_default_base_model(seed=0, steps=2, progress=False, config=TINY)
    assert path == auto and is_complete_build(path)
    assert [p.name for p in tmp_path.iterdir()] == [auto.name]
