"""Shared test fixtures: tiny random models built from configs (no hub access anywhere)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported: set it before any test module (or
# library code they import) pulls triton in, so CPU runs execute every kernel in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of multi-process CPU work; skipped unless DMS_RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    # CI (2 cores) runs every test but these; `DMS_RUN_SLOW=1 python3 -m pytest -m slow` runs them
    if os.environ.get("DMS_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set DMS_RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

FAMILIES = {
    # family: (config class name, extra kwargs)
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
}


def tiny_config(family="llama", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, vocab=97, **kw):
    import transformers

    cls_name, extra = FAMILIES[family]
    cls = getattr(transformers, cls_name)
    head_dim = head_dim or hidden // heads
    args = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                bos_token_id=2)
    args.update(extra)
    args.update(kw)
    return cls(**args)


def tiny_model(family="llama", seed=0, dtype=torch.float32, attn_implementation="sdpa", **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def randomize_retention(model, scale=0.5, seed=1):
    """Give adapter heads random weights so that some tokens are evicted (fresh heads evict nothing)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "dms_retention.proj" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def make_tiny_model():
    return tiny_model


@pytest.fixture
def randomize():
    return randomize_retention


def make_tiny_base(root: Path, n_docs: int = 24) -> Path:
    """A tiny Llama + word-level tokenizer saved like a hub checkpoint, and a small jsonl corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)]
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[j] for j in torch.randint(0, 60, (int(torch.randint(20, 90, (1,), generator=g)),),
                                                        generator=g).tolist()) for _ in range(n_docs)]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_base_factory():
    """``make_tiny_base(root, n_docs)``: a saved tiny Llama + tokenizer (no pad token) + jsonl corpus."""
    return make_tiny_base


def make_tiny_dms_checkpoint(root: Path, window: int) -> Path:
    """``make_tiny_base`` retrofitted (eager attention) with random retention heads, saved with its tokenizer
    as ``root / "ckpt"``: a DMS checkpoint that evicts, for ``dms.load`` and the scripts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dms

    base = root / "base"
    base.mkdir(parents=True)
    make_tiny_base(base)
    model = AutoModelForCausalLM.from_pretrained(base / "model")
    dms.retrofit(model, dms.DMSConfig(window=window, attention_impl="eager"))
    randomize_retention(model, 0.5, seed=0)
    out = root / "ckpt"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base / "model").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dms_checkpoint_factory():
    """``make_tiny_dms_checkpoint(root, window)`` -> the checkpoint folder."""
    return make_tiny_dms_checkpoint


def shared_decode_vs_teacher_forced(model, cache, ids, am, samples: int, new: int, horizon: int, cuda_graph: bool):
    """Decode ``new`` random teacher-forced tokens per sample through ``GraphedDecodeStep`` over a shared-prefix
    ``cache`` built from ``ids, am`` (``[G, T]``); returns ``(step logits [G*W, new, V], the same positions'
    logits of the model run on the whole sequences)``."""
    from dms.graphs import GraphedDecodeStep

    W, T = samples, ids.shape[1]
    g = torch.Generator().manual_seed(4)
    chosen = torch.randint(3, 97, (ids.shape[0] * W, new), generator=g).to(ids.device)
    tok = ids[:, -1:].repeat_interleave(W, 0)
    pos = (am.sum(-1, keepdim=True) - 1).repeat_interleave(W, 0)
    logits = []
    with GraphedDecodeStep(model, cache, horizon=horizon, cuda_graph=cuda_graph) as step:
        for i in range(new):
            logits.append(step(tok, pos + i).clone())
            tok = chosen[:, i:i + 1]
    seq = torch.cat([ids.repeat_interleave(W, 0), chosen], 1)
    full_am = torch.cat([am.repeat_interleave(W, 0), torch.ones_like(chosen)], 1)
    with torch.no_grad():
        tf = model(seq, attention_mask=full_am).logits
    return torch.stack(logits, 1), tf[:, T - 1:-1]


@pytest.fixture(scope="session")
def shared_decode_check():
    """:func:`shared_decode_vs_teacher_forced`."""
    return shared_decode_vs_teacher_forced
