"""Training data: load raw text through ``datasets``, tokenize, pack into fixed-length rows, and
iterate them with a sampler whose position survives a restart exactly.

Pipeline::

    cfg = DataConfig(source="/work/shared/data/corpus/train.jsonl.gz", seq_len=1024)
    dataset = build_packed_dataset(cfg, tokenizer)            # PackedDataset, rows [N, seq_len]
    sampler = ResumableSampler(len(dataset), batch_size=8, rank=rank, world_size=world, seed=cfg.seed)
    loader = build_dataloader(dataset, batch_size=8, sampler=sampler)
    ...
    state = sampler.state_dict()                               # into the checkpoint
    sampler.load_state_dict(state)                             # on resume: continues exactly

Packing layout (one row, ``seq_len`` tokens): documents are tokenized without special tokens,
each is followed by EOS (``add_eos``), the stream is concatenated in dataset order and cut into
rows. ``doc_ids`` numbers the documents inside a row from 0; a document cut by a row boundary
continues in the next row as that row's document 0. The tail of the last row, if the stream does
not fill it, holds ``pad_token_id`` with doc id -1 (consumers mask doc id < 0 out of the loss and
of the eviction statistics).

The sampler is rank-sharded itself (each rank takes a disjoint slice of every global batch), so
hand the DataLoader to ``accelerate`` without letting it re-shard (or don't ``prepare`` it).
"""
from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DataConfig",
    "load_texts",
    "pack_documents",
    "build_packed_dataset",
    "PackedDataset",
    "ResumableSampler",
    "collate_packed",
    "build_dataloader",
    "data_fingerprint",
    "resolve_pad_token_id",
    "TEXT_COLUMN",
]

# Column name of the dataset returned by :func:`load_texts`, whatever the source calls it.
TEXT_COLUMN = "text"

# File suffix -> ``datasets`` builder. Longest suffixes first so ".jsonl.gz" wins over ".gz".
_SUFFIX_BUILDERS: tuple[tuple[str, str], ...] = (
    (".jsonl.gz", "json"),
    (".json.gz", "json"),
    (".jsonl", "json"),
    (".json", "json"),
    (".parquet", "parquet"),
    (".txt.gz", "text"),
    (".txt", "text"),
)
SUPPORTED_SUFFIXES = tuple(s for s, _ in _SUFFIX_BUILDERS)


@dataclass
class DataConfig:
    """Where the training text comes from and how it is packed.

    Attributes:
        source: a hub dataset name (``"allenai/c4"``), or a local file, directory or glob of
            ``.txt``, ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet`` files. ``None`` selects the
            built-in offline corpus (standard-library docstrings, see ``dms.default_model``).
        text_field: column holding the text (or, with ``chat_template``, a list of
            ``{"role", "content"}`` messages). ``.txt`` files always provide ``"text"``.
        split: dataset split; for local files it names the split the files form, so slicing
            such as ``"train[:1000]"`` works for both.
        chat_template: render message lists with ``tokenizer.apply_chat_template``.
        seq_len: tokens per packed row (>= 2: a row must hold an input and a target).
        seed: base seed of the sampler's per-epoch shuffle.
        max_documents: keep only the first N documents (in dataset order); ``None`` keeps all.
        add_eos: append the tokenizer's EOS after every document.
    """

    source: str | None = None
    text_field: str = "text"
    split: str = "train"
    chat_template: bool = False
    seq_len: int = 1024
    seed: int = 0
    max_documents: int | None = None
    add_eos: bool = True

    def __post_init__(self):
        if self.source is not None and (not isinstance(self.source, str) or not self.source.strip()):
            raise ValueError(
                f"source must be a hub dataset name or a local path (or None for the built-in corpus); "
                f"got {self.source!r}"
            )
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty column name (flag --text-field); got {self.text_field!r}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split must be a non-empty split name such as 'train'; got {self.split!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(
                f"seq_len must be an integer >= 2 (a row needs an input and a next-token target); got {self.seq_len!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}")
        if self.max_documents is not None and (
            isinstance(self.max_documents, bool) or not isinstance(self.max_documents, int) or self.max_documents < 1
        ):
            raise ValueError(f"max_documents must be None (all) or an integer >= 1; got {self.max_documents!r}")
        for name in ("chat_template", "add_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------
# Loading raw text
# ----------------------------------------------------------------------------------------------
def _builder_for(path: str) -> str | None:
    low = path.lower()
    for suffix, builder in _SUFFIX_BUILDERS:
        if low.endswith(suffix):
            return builder
    return None


def _looks_local(source: str) -> bool:
    if os.path.exists(os.path.expanduser(source)):
        return True
    if any(ch in source for ch in "*?["):
        return True
    if source.startswith(("/", "./", "../", "~")):
        return True
    return _builder_for(source) is not None


def _resolve_local_files(source: str) -> list[str]:
    """Local path / directory / glob -> sorted list of supported files (deterministic order)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        candidates = [str(p) for p in Path(path).rglob("*") if p.is_file()]
    elif os.path.isfile(path):
        candidates = [path]
    else:
        candidates = [p for p in _glob.glob(path, recursive=True) if os.path.isfile(p)]
    files = sorted(p for p in candidates if _builder_for(p) is not None)
    if not files:
        extra = ""
        if candidates:
            extra = f" ({len(candidates)} file(s) matched, none with a supported suffix, e.g. {sorted(candidates)[0]!r})"
        raise ValueError(
            f"no data files match {source!r}{extra}; expected a file, directory or glob of "
            f"{', '.join(SUPPORTED_SUFFIXES)} (flag --data)"
        )
    return files


def _split_base(split: str) -> str:
    return split.split("[", 1)[0].strip() or "train"


def load_texts(cfg: DataConfig) -> "datasets.Dataset":  # noqa: F821 (lazy import)
    """Load the documents named by ``cfg`` as a ``datasets.Dataset`` with one column ``"text"``.

    Local files go through ``datasets.load_dataset("json" | "text" | "parquet", data_files=...)``
    (``.txt``: one document per file); anything else is treated as a hub dataset name.
    ``cfg.source=None`` gives the built-in offline corpus. The column holds strings, or message
    lists when the source stores chats. ``max_documents`` keeps the first N documents.

    Raises:
        ValueError: no files match, the dataset is empty, or ``cfg.text_field`` is not a column.
    """
    import datasets

    if cfg.source is None:
        from dms.default_model import default_corpus_texts

        texts = default_corpus_texts()
        ds = datasets.Dataset.from_dict({TEXT_COLUMN: texts})
        where = "the built-in corpus (standard-library docstrings)"
        field = TEXT_COLUMN
    elif _looks_local(cfg.source):
        files = _resolve_local_files(cfg.source)
        builders = sorted({_builder_for(f) for f in files})
        if len(builders) > 1:
            raise ValueError(
                f"{cfg.source!r} mixes file kinds {builders} ({len(files)} files); point --data at one kind"
            )
        builder = builders[0]
        kwargs: dict[str, Any] = {}
        if builder == "text":
            kwargs["sample_by"] = "document"  # a .txt file is one document, not one per line
        where = f"{cfg.source!r} ({len(files)} file(s))"
        if all(os.path.getsize(f) == 0 for f in files):
            raise ValueError(f"{where} is empty: every matching file has 0 bytes, no documents to train on")
        try:
            ds = datasets.load_dataset(builder, data_files={_split_base(cfg.split): files}, split=cfg.split, **kwargs)
        except (StopIteration, datasets.exceptions.DatasetGenerationError) as exc:
            raise ValueError(f"could not read {where} as {builder!r} files: {type(exc).__name__}: {exc}") from exc
        field = TEXT_COLUMN if builder == "text" else cfg.text_field
    else:
        try:
            ds = datasets.load_dataset(cfg.source, split=cfg.split)
        except Exception as exc:  # re-raised with the flags to change
            raise ValueError(
                f"could not load hub dataset {cfg.source!r} split {cfg.split!r}: {type(exc).__name__}: {exc}. "
                f"Without hub access pass a local file/dir/glob to --data, or omit --data for the built-in corpus."
            ) from exc
        where = f"hub dataset {cfg.source!r}"
        field = cfg.text_field

    if isinstance(ds, datasets.DatasetDict):  # defensive: split=None style results
        raise ValueError(f"{where} gave several splits {list(ds)}; choose one with --split")
    if len(ds) == 0:
        raise ValueError(f"{where} split {cfg.split!r} is empty: no documents to train on")
    if field not in ds.column_names:
        raise ValueError(
            f"{where} has no field {field!r}; fields present: {ds.column_names}. "
            f"Pick one with --text-field (DataConfig.text_field)"
        )
    ds = ds.select_columns([field])
    if field != TEXT_COLUMN:
        ds = ds.rename_column(field, TEXT_COLUMN)
    if cfg.max_documents is not None and cfg.max_documents < len(ds):
        ds = ds.select(range(cfg.max_documents))
    return ds


# ----------------------------------------------------------------------------------------------
# Tokenize + pack
# ----------------------------------------------------------------------------------------------
def resolve_pad_token_id(tokenizer) -> int:
    """The id used for tail padding: the tokenizer's pad token, else its EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _tokenizer_signature(tokenizer) -> str:
    """Stable description of a tokenizer for fingerprints (name, vocab size, vocab hash)."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        h.update(backend.to_str().encode() if backend is not None else b"")
    except Exception:  # slow/custom tokenizers: fall back to the vocabulary
        try:
            h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        except Exception:
            pass
    return f"{name}|{len(tokenizer)}|{h.hexdigest()[:16]}"


def _render(doc: Any, tokenizer, cfg: DataConfig, row: int) -> str:
    if isinstance(doc, str):
        return doc
    if doc is None:
        return ""
    if isinstance(doc, list) and all(isinstance(m, dict) for m in doc):
        if not cfg.chat_template:
            raise ValueError(
                f"document {row} of field {cfg.text_field!r} is a list of messages; pass --chat-template "
                f"(DataConfig.chat_template=True) to render it, or choose a text field with --text-field"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "chat_template=True but the tokenizer has no chat template; use a chat model's tokenizer "
                "or flatten the messages into text"
            )
        return tokenizer.apply_chat_template(doc, tokenize=False)
    raise ValueError(
        f"document {row} of field {cfg.text_field!r} is a {type(doc).__name__}, not text or a message list; "
        f"choose another field with --text-field"
    )


def pack_documents(texts, tokenizer, cfg: DataConfig, *, progress: bool = False) -> "PackedDataset":
    """Tokenize ``texts`` (dataset with column ``"text"`` or a list of str) and pack into rows.

    Empty documents are skipped (they would contribute only an EOS). Deterministic: the output
    depends only on the documents, their order, the tokenizer and ``cfg``.

    Returns:
        PackedDataset with ``input_ids [N, seq_len]`` int64 and ``doc_ids [N, seq_len]`` int32.
    """
    import datasets

    if isinstance(texts, (list, tuple)):
        texts = datasets.Dataset.from_dict({TEXT_COLUMN: list(texts)})
    if TEXT_COLUMN not in texts.column_names:
        raise ValueError(f"texts must have a {TEXT_COLUMN!r} column (as load_texts returns); got {texts.column_names}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if cfg.add_eos and not isinstance(eos, int):
        raise ValueError(
            "add_eos=True but the tokenizer has no eos_token_id; set tokenizer.eos_token or DataConfig.add_eos=False"
        )
    pad = resolve_pad_token_id(tokenizer)

    def tokenize(batch, indices):
        rendered = [_render(d, tokenizer, cfg, i) for d, i in zip(batch[TEXT_COLUMN], indices)]
        # verbose=False: documents longer than model_max_length are fine here (they get packed),
        # so silence the "sequence length is longer than" warning.
        enc = tokenizer(rendered, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": enc["input_ids"]}

    fingerprint = hashlib.sha256(
        f"dms-tokenize-v1|{texts._fingerprint}|{_tokenizer_signature(tokenizer)}|{cfg.chat_template}".encode()
    ).hexdigest()[:32]
    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        tokenized = texts.map(
            tokenize,
            batched=True,
            batch_size=256,
            with_indices=True,
            remove_columns=texts.column_names,
            new_fingerprint=fingerprint,  # explicit: hashing a tokenizer closure is slow and warns
            desc="tokenizing",
        )
    finally:
        if was_enabled and not progress:
            datasets.enable_progress_bars()

    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    eos_arr = np.array([eos], dtype=np.int64) if cfg.add_eos else None
    for ids in tokenized.with_format("numpy")["input_ids"]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            continue
        if eos_arr is not None:
            ids = np.concatenate([ids, eos_arr])
        pieces.append(ids)
        lengths.append(ids.size)
    if not pieces:
        raise ValueError("every document tokenized to nothing: no tokens to train on")
    stream = np.concatenate(pieces)
    doc_of_token = np.repeat(np.arange(len(pieces), dtype=np.int64), lengths)
    return PackedDataset.from_stream(stream, doc_of_token, cfg.seq_len, pad)


def build_packed_dataset(cfg: DataConfig, tokenizer, *, progress: bool = False) -> "PackedDataset":
    """``load_texts`` + ``pack_documents``: the training rows for ``cfg``."""
    return pack_documents(load_texts(cfg), tokenizer, cfg, progress=progress)


class PackedDataset(Dataset):
    """Fixed-length packed rows.

    Item ``i`` is ``{"input_ids": [L] int64, "doc_ids": [L] int32, "index": int64 scalar}``, where
    ``index == i`` is the row's global id (lets a consumer record exactly which rows it saw).

    Args:
        input_ids: ``[N, L]`` integer token ids.
        doc_ids: ``[N, L]`` document index local to each row (0, 1, ...), -1 on padding.
        pad_token_id: the id written at padding positions (kept for consumers).
    """

    def __init__(self, input_ids, doc_ids, pad_token_id: int = 0):
        input_ids = torch.as_tensor(input_ids)
        doc_ids = torch.as_tensor(doc_ids)
        if input_ids.ndim != 2 or input_ids.shape != doc_ids.shape:
            raise ValueError(
                f"input_ids and doc_ids must both be [N, L] with the same shape; got "
                f"{tuple(input_ids.shape)} and {tuple(doc_ids.shape)}"
            )
        if input_ids.shape[0] == 0:
            raise ValueError("PackedDataset needs at least one row; got 0")
        if input_ids.dtype.is_floating_point or doc_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids/doc_ids must be integer tensors; got {input_ids.dtype}/{doc_ids.dtype}")
        self.input_ids = input_ids.to(torch.int64).contiguous()
        self.doc_ids = doc_ids.to(torch.int32).contiguous()
        self.pad_token_id = int(pad_token_id)

    @classmethod
    def from_stream(cls, stream: np.ndarray, doc_of_token: np.ndarray, seq_len: int, pad_token_id: int) -> "PackedDataset":
        """Cut a token stream ``[T]`` with global document numbers ``[T]`` (non-decreasing) into rows."""
        if stream.shape != doc_of_token.shape or stream.ndim != 1:
            raise ValueError(f"stream and doc_of_token must be 1-D of equal length; got {stream.shape}, {doc_of_token.shape}")
        total = stream.size
        rows = -(-total // seq_len)
        pad = rows * seq_len - total
        ids = np.concatenate([stream.astype(np.int64), np.full(pad, pad_token_id, dtype=np.int64)]).reshape(rows, seq_len)
        docs = np.concatenate([doc_of_token.astype(np.int64), np.full(pad, -1, dtype=np.int64)]).reshape(rows, seq_len)
        # Local numbering: documents are contiguous and numbered in stream order, so subtracting
        # the row's first document number restarts at 0 in every row (a cut document becomes 0).
        local = docs - docs[:, :1]
        local[docs < 0] = -1
        return cls(torch.from_numpy(ids), torch.from_numpy(local.astype(np.int32)), pad_token_id)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return int((self.doc_ids >= 0).sum())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)
        return {
            "input_ids": self.input_ids[index],
            "doc_ids": self.doc_ids[index],
            "index": torch.tensor(index, dtype=torch.int64),
        }


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------
class ResumableSampler(Sampler[int]):
    """Deterministic, rank-sharded, resumable sample order.

    Epoch ``e`` shuffles all ``num_samples`` rows with ``torch.Generator().manual_seed(seed + e)``.
    The permutation is cut into global batches of ``batch_size * world_size`` rows; rank ``r``
    takes slice ``[r * batch_size, (r + 1) * batch_size)`` of each. An epoch has
    ``num_samples // (batch_size * world_size)`` steps; the remainder rows sit out that epoch
    (the next epoch's shuffle differs), so all ranks always take the same number of steps.

    The sampler runs forever over epochs, or stops after ``num_steps`` steps in total.

    State: ``(epoch, position)``, ``position`` = rows this rank consumed in ``epoch``. It is the
    same on every rank, so any rank's ``state_dict()`` resumes all of them. After
    ``load_state_dict`` a new iteration yields exactly what the uninterrupted sampler would have
    yielded next. "Consumed" means yielded by the iterator, unless the sampler is driven by
    :func:`build_dataloader`, which counts rows delivered to the training loop instead (so rows
    prefetched by workers but not yet trained on are not skipped on resume).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_steps: int | None = None,
    ):
        if hasattr(num_samples, "__len__"):
            num_samples = len(num_samples)  # accept a dataset
        for name, value, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0):
            raise ValueError(f"num_steps must be None (infinite) or an integer >= 0; got {num_steps!r}")
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"dataset has {num_samples} rows, fewer than one global batch (batch_size {batch_size} x "
                f"world_size {world_size} = {global_batch}); lower the batch size or seq_len, or add data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.num_steps = num_steps
        self.epoch = 0
        self.position = 0
        self._count_deliveries = False  # set by build_dataloader's loader

    # -- geometry --------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def samples_per_epoch(self) -> int:
        """Rows this rank takes per epoch."""
        return self.steps_per_epoch * self.batch_size

    @property
    def consumed(self) -> int:
        """Rows this rank has consumed since the start of training (all epochs)."""
        return self.epoch * self.samples_per_epoch + self.position

    @property
    def step(self) -> int:
        """Completed optimizer steps implied by the position (partial batches round down)."""
        return self.consumed // self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def _limit(self) -> int | None:
        return None if self.num_steps is None else self.num_steps * self.batch_size

    def __len__(self) -> int:
        """Rows left to yield (only defined with ``num_steps``)."""
        limit = self._limit()
        if limit is None:
            raise TypeError("ResumableSampler without num_steps is infinite and has no len()")
        return max(0, limit - self.consumed)

    def __iter__(self) -> Iterator[int]:
        epoch, position = self.epoch, self.position
        limit = self._limit()
        consumed = epoch * self.samples_per_epoch + position
        B, G, r = self.batch_size, self.global_batch_size, self.rank
        while limit is None or consumed < limit:
            perm = self._permutation(epoch)
            while position < self.samples_per_epoch and (limit is None or consumed < limit):
                step, offset = divmod(position, B)
                index = int(perm[step * G + r * B + offset])
                position += 1
                consumed += 1
                if not self._count_deliveries:
                    self.epoch, self.position = epoch, position
                yield index
            if position >= self.samples_per_epoch:
                epoch, position = epoch + 1, 0
                if not self._count_deliveries:
                    self.epoch, self.position = epoch, position

    def advance(self, n: int) -> None:
        """Mark ``n`` more rows as consumed (used by the loader when it counts deliveries)."""
        if n < 0:
            raise ValueError(f"advance needs n >= 0; got {n}")
        position = self.position + n
        per = self.samples_per_epoch
        self.epoch += position // per
        self.position = position % per

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}`` plus the geometry, checked on load."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position. The geometry (rows, batch, world size, seed) must match."""
        for key in ("num_samples", "batch_size", "world_size", "seed", "shuffle"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={int(getattr(self, key))}; "
                    f"resume with the same data, batch size, world size and seed (or start a fresh run)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.samples_per_epoch:
            raise ValueError(
                f"sampler state epoch={epoch}, position={position} out of range "
                f"(epoch >= 0, 0 <= position <= {self.samples_per_epoch})"
            )
        if position == self.samples_per_epoch:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------
def collate_packed(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items: ``input_ids [B, L]`` int64, ``doc_ids [B, L]`` int32, ``index [B]`` int64."""
    if not items:
        raise ValueError("collate_packed got an empty batch")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class _CountingDataLoader(DataLoader):
    """DataLoader that advances its ResumableSampler by the rows it hands out, not the rows the
    workers prefetched, so ``sampler.state_dict()`` is exact at any point of the training loop."""

    def __iter__(self):
        sampler = self.sampler
        for batch in super().__iter__():
            sampler.advance(int(batch["index"].shape[0]))
            yield batch


def build_dataloader(dataset: Dataset, batch_size: int, sampler: ResumableSampler, num_workers: int = 0) -> DataLoader:
    """DataLoader over ``dataset`` in ``sampler`` order, batches from :func:`collate_packed`.

    ``sampler.batch_size`` must equal ``batch_size`` (the sampler lays rows out per batch).
    Resume: ``sampler.load_state_dict(state)`` before iterating the loader.
    """
    if not isinstance(sampler, ResumableSampler):
        raise ValueError(f"sampler must be a ResumableSampler; got {type(sampler).__name__}")
    if batch_size != sampler.batch_size:
        raise ValueError(
            f"batch_size {batch_size} differs from sampler.batch_size {sampler.batch_size}; build both with the same value"
        )
    if len(dataset) != sampler.num_samples:
        raise ValueError(f"dataset has {len(dataset)} rows but the sampler was built for {sampler.num_samples}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}")
    sampler._count_deliveries = True
    return _CountingDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_packed,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=False,
    )


def data_fingerprint(cfg: DataConfig, tokenizer, num_rows: int) -> str:
    """sha256 over what decides the packed rows: source, field, split, packing options, the
    tokenizer (name, vocab size, vocabulary hash) and the number of rows. Compare on resume."""
    payload = {
        "source": cfg.source,
        "text_field": cfg.text_field,
        "split": cfg.split,
        "chat_template": cfg.chat_template,
        "seq_len": cfg.seq_len,
        "max_documents": cfg.max_documents,
        "add_eos": cfg.add_eos,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "tokenizer_hash": _tokenizer_signature(tokenizer),
        "num_rows": int(num_rows),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
