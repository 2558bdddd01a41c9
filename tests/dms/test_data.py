"""dms.data: loading, packing, sampler resume, loader. Tiny offline WordLevel tokenizers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from dms.data import (  # noqa: E402
    DataConfig,
    PackedDataset,
    ResumableSampler,
    build_dataloader,
    build_packed_dataset,
    data_fingerprint,
    load_texts,
    pack_documents,
)

CORPUS = Path("/work/shared/data/corpus/validation.jsonl.gz")
needs_corpus = pytest.mark.skipif(not CORPUS.exists(), reason=f"the shared corpus ({CORPUS}) is not on this machine")
WORDS = "the a of and to in is it that hello world doc one two three four five six seven eight".split()
UNK, EOS, PAD = 0, 1, 2


def make_tokenizer(pad: bool = True, eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": UNK, "[EOS]": EOS, "[PAD]": PAD}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"tokenizer_object": tok, "unk_token": "[UNK]"}
    if eos:
        kwargs["eos_token"] = "[EOS]"
    if pad:
        kwargs["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(**kwargs)


def make_bpe_tokenizer():
    """Byte-level BPE trained in memory on a slice of the shared corpus (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(line)["text"][:5000] for _, line in zip(range(8), f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def ids(text: str) -> list[int]:
    return [3 + WORDS.index(w) for w in text.split()]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"max_documents": 0}, "max_documents"),
        ({"text_field": ""}, "--text-field"),
        ({"seed": -1}, "seed"),
        ({"source": "  "}, "source"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DataConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
def test_packing_doc_ids_eos_and_padding():
    tok = make_tokenizer()
    docs = ["hello world", "one two three", "", "four five six seven eight the a"]
    packed = pack_documents(docs, tok, DataConfig(seq_len=6))
    stream = ids("hello world") + [EOS] + ids("one two three") + [EOS] + ids("four five six seven eight the a") + [EOS]
    assert len(stream) == 15
    assert packed.input_ids.dtype == torch.int64 and packed.doc_ids.dtype == torch.int32
    assert packed.input_ids.shape == (3, 6)
    expected_ids = stream + [PAD] * 3
    assert packed.input_ids.flatten().tolist() == expected_ids
    # row 0: doc0 "hello world EOS", doc1 starts; the empty document is skipped entirely.
    assert packed.doc_ids.tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 1, 1, 1, 1, 1],  # doc1's EOS continues as doc 0 of row 1; doc2 is doc 1 here
        [0, 0, 0, -1, -1, -1],  # doc2's tail, then padding
    ]
    # every EOS ends its document: the next token starts a new doc id (or padding)
    flat_ids, flat_docs = packed.input_ids.flatten(), packed.doc_ids.flatten()
    assert (flat_ids == EOS).sum() == 3
    assert (flat_ids[flat_docs < 0] == PAD).all()
    item = packed[1]
    assert set(item) == {"input_ids", "doc_ids", "index"} and int(item["index"]) == 1


def test_packing_exact_fit_has_no_padding_and_no_eos_option():
    tok = make_tokenizer()
    packed = pack_documents(["one two", "three four"], tok, DataConfig(seq_len=3))
    assert packed.input_ids.shape == (2, 3)
    assert (packed.doc_ids >= 0).all()
    packed = pack_documents(["one two", "three four"], tok, DataConfig(seq_len=2, add_eos=False))
    assert packed.input_ids.tolist() == [ids("one two"), ids("three four")]
    assert packed.doc_ids.tolist() == [[0, 0], [0, 0]]


def test_tokenizer_without_pad_uses_eos(recwarn):
    tok = make_tokenizer(pad=False)
    assert tok.pad_token_id is None
    packed = pack_documents(["one two three"], tok, DataConfig(seq_len=8))
    assert packed.pad_token_id == EOS
    assert packed.input_ids[0, 4:].tolist() == [EOS] * 4
    assert packed.doc_ids[0].tolist() == [0, 0, 0, 0, -1, -1, -1, -1]
    assert not [w for w in recwarn if "pad" in str(w.message).lower()]


def test_tokenizer_without_eos_errors_or_skips():
    tok = make_tokenizer(pad=False, eos=False)
    with pytest.raises(ValueError, match="add_eos"):
        pack_documents(["one two"], tok, DataConfig(seq_len=4))
    packed = pack_documents(["one two"], tok, DataConfig(seq_len=4, add_eos=False))
    assert packed.pad_token_id == 0 and packed.input_ids[0].tolist() == ids("one two") + [0, 0]


def test_chat_template_rendering():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    chats = [[{"role": "one", "content": "hello world"}, {"role": "two", "content": "the doc"}]]
    ds = datasets.Dataset.from_dict({"text": chats})
    with pytest.raises(ValueError, match="--chat-template"):
        pack_documents(ds, tok, DataConfig(seq_len=4))
    packed = pack_documents(ds, tok, DataConfig(seq_len=8, chat_template=True))
    assert packed.input_ids[0].tolist() == ids("one hello world two the doc") + [EOS, PAD]


@needs_corpus
def test_packing_is_deterministic_and_local_corpus():
    tok = make_bpe_tokenizer()
    cfg = DataConfig(source=str(CORPUS), max_documents=3, seq_len=128)
    a = build_packed_dataset(cfg, tok)
    b = build_packed_dataset(cfg, tok)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.doc_ids, b.doc_ids)
    assert len(a) > 10
    # three documents, each ending with EOS; doc ids never decrease inside a row
    eos = tok.eos_token_id
    assert int(((a.input_ids == eos) & (a.doc_ids >= 0)).sum()) == 3
    d = a.doc_ids
    assert ((d[:, 1:] - d[:, :-1] >= 0) | (d[:, 1:] == -1)).all()
    assert (d[:, 0] == 0).all()
    # a document continuing in the next row (no EOS at the end of the row) -> same global doc
    assert a.pad_token_id == eos  # no pad token: EOS pads
    fp = data_fingerprint(cfg, tok, len(a))
    assert fp == data_fingerprint(cfg, tok, len(b)) and len(fp) == 64
    assert fp != data_fingerprint(cfg, tok, len(a) + 1)
    assert fp != data_fingerprint(DataConfig(source=str(CORPUS), max_documents=3, seq_len=64), tok, len(a))


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_load_txt_jsonl_parquet(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt").write_text("three four\nfive")
    (tmp_path / "txt" / "a.txt").write_text("one two")
    ds = load_texts(DataConfig(source=str(tmp_path / "txt")))
    assert ds.column_names == ["text"] and ds["text"] == ["one two", "three four\nfive"]  # sorted, 1 doc/file

    rows = [{"body": "hello world", "n": 1}, {"body": "the doc", "n": 2}, {"body": "one", "n": 3}]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ds = load_texts(DataConfig(source=str(tmp_path / "d.jsonl"), text_field="body", max_documents=2))
    assert ds["text"] == ["hello world", "the doc"]

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    ds = load_texts(DataConfig(source=str(tmp_path / "*.parquet"), text_field="body"))
    assert ds["text"] == ["hello world", "the doc", "one"]

    packed = build_packed_dataset(DataConfig(source=str(tmp_path / "p.parquet"), text_field="body", seq_len=4), make_tokenizer())
    assert packed.input_ids.flatten().tolist() == ids("hello world") + [EOS] + ids("the doc") + [EOS] + ids("one") + [EOS]  # 8 tokens: 2 full rows


@needs_corpus
def test_load_shared_corpus():
    ds = load_texts(DataConfig(source=str(CORPUS), max_documents=5))
    assert len(ds) == 5 and all(isinstance(t, str) and t for t in ds["text"])


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no data files match .*nothing"):
        load_texts(DataConfig(source=str(tmp_path / "nothing" / "*.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_texts(DataConfig(source=str(tmp_path / "empty.jsonl")))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no field 'text'.*\['content', 'id'\].*--text-field"):
        load_texts(DataConfig(source=str(tmp_path / "x.jsonl")))


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------
def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_epochs_are_permutations_and_deterministic():
    s = ResumableSampler(12, batch_size=3, seed=5)
    first = take(s, 24)
    assert sorted(first[:12]) == list(range(12)) and sorted(first[12:]) == list(range(12))
    assert first[:12] != first[12:]  # reshuffled per epoch
    assert take(ResumableSampler(12, batch_size=3, seed=5), 24) == first
    assert take(ResumableSampler(12, batch_size=3, seed=6), 12) != first[:12]


@pytest.mark.parametrize("cut", [1, 7, 10, 12, 13, 17])
def test_sampler_resume_exact_across_epoch_boundary(cut):
    # 10 rows, batch 4: 2 steps (8 rows) per epoch, 2 rows sit out each epoch.
    reference = take(ResumableSampler(10, batch_size=4, seed=3), 40)
    s = ResumableSampler(10, batch_size=4, seed=3)
    head = take(s, cut)
    state = s.state_dict()
    resumed = ResumableSampler(10, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert head + take(resumed, 40 - cut) == reference
    assert state["epoch"] == cut // 8 and state["position"] == cut % 8


def test_sampler_two_ranks_disjoint_complete_and_resumable():
    n, B, W = 24, 3, 2
    streams = [take(ResumableSampler(n, B, rank=r, world_size=W, seed=1), 24) for r in range(W)]
    for epoch in range(2):
        parts = [set(s[epoch * 12 : (epoch + 1) * 12]) for s in streams]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(range(n))
    # every global batch = rank 0's B rows + rank 1's B rows, taken from one slice of the permutation
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    assert streams[0][:B] == perm[:B] and streams[1][:B] == perm[B : 2 * B]
    # resume each rank from rank 0's state (states are rank-independent)
    live = [ResumableSampler(n, B, rank=r, world_size=W, seed=1) for r in range(W)]
    heads = [take(s, 15) for s in live]
    state = live[0].state_dict()
    assert state == {**live[1].state_dict()}
    for r in range(W):
        fresh = ResumableSampler(n, B, rank=r, world_size=W, seed=1)
        fresh.load_state_dict(state)
        assert heads[r] + take(fresh, 9) == streams[r]


def test_sampler_num_steps_and_state_checks():
    s = ResumableSampler(10, batch_size=2, seed=0, num_steps=7)
    assert len(s) == 14
    out = list(s)
    assert len(out) == 14 and out == take(ResumableSampler(10, 2, seed=0), 14)
    assert len(s) == 0 and list(s) == []
    with pytest.raises(TypeError):
        len(ResumableSampler(10, 2))
    other = ResumableSampler(10, batch_size=5)
    with pytest.raises(ValueError, match="batch_size=2"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(5, batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, 2, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------
def _rows(n=20, L=5):
    ids_ = torch.arange(n * L).view(n, L)
    return PackedDataset(ids_, torch.zeros(n, L, dtype=torch.int32), pad_token_id=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_resume_counts_delivered_batches(num_workers):
    data = _rows()
    ref_loader = build_dataloader(data, 4, ResumableSampler(data, 4, seed=2, num_steps=12))
    reference = [b["index"].tolist() for b in ref_loader]
    assert len(reference) == 12

    sampler = ResumableSampler(data, 4, seed=2, num_steps=12)
    loader = build_dataloader(data, 4, sampler, num_workers=num_workers)
    seen = []
    for step, batch in enumerate(loader):
        assert batch["input_ids"].shape == (4, 5) and batch["input_ids"].dtype == torch.int64
        assert batch["doc_ids"].dtype == torch.int32 and batch["index"].shape == (4,)
        assert torch.equal(batch["input_ids"][:, 0], batch["index"] * 5)
        seen.append(batch["index"].tolist())
        if step == 6:  # "crash" after 7 steps, workers may have prefetched more
            state = sampler.state_dict()
            break
    del loader
    resumed = ResumableSampler(data, 4, seed=2, num_steps=12)
    resumed.load_state_dict(state)
    seen += [b["index"].tolist() for b in build_dataloader(data, 4, resumed, num_workers=num_workers)]
    assert seen == reference


def test_build_dataloader_validates():
    data = _rows()
    with pytest.raises(ValueError, match="batch_size 3 differs"):
        build_dataloader(data, 3, ResumableSampler(data, 4))
    with pytest.raises(ValueError, match="rows"):
        build_dataloader(data, 4, ResumableSampler(30, 4))


def test_source_none_is_builtin_corpus():
    ds = load_texts(DataConfig(source=None, max_documents=3))
    assert ds.column_names == ["text"] and len(ds) == 3 and all(ds["text"])
