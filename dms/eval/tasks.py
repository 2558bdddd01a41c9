"""Long-context tasks built from corpus text, assembled at the token level.

Every example is a prompt of exactly ``length`` tokens (filler = contiguous slices of a tokenized
corpus stream, with task sentences planted in it) and a short answer. Because pieces are
concatenated as token ids and every planted piece starts with a newline, the same pieces appear
identically in pretraining (:meth:`TaskBuilder.pretraining_document`) and in evaluation, and
prompts of one length batch without padding.

Tasks (RULER-style, simplified for small reference models):

- ``passkey``: one needle ``The pass key is 71432. Remember it. 71432 is the pass key.`` at a
  chosen depth (0 = start, 1 = end of the filler); question at the end.
- ``multikey``: ``n_keys`` facts ``The special magic number for <key> is <value>.`` at random depths;
  the question names one key (multi-key associative recall).
- ``variable_tracking``: ``VAR A = 48213.`` then a chain ``VAR B = VAR A.`` ... (``hops`` links) plus a
  distractor chain with another value; the question asks the value of the last variable of the chain.
"""
from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

TASKS = ("passkey", "multikey", "variable_tracking")

_CONS = "bcdfghjklmnprstvz"
_VOW = "aeiou"


@dataclass
class Example:
    """One prompt (``input_ids [length]``) and its expected answer."""

    task: str
    input_ids: list[int]
    answer: str
    meta: dict = field(default_factory=dict)


def read_corpus(path: str | Path, max_docs: int | None = None) -> list[str]:
    """Texts of a ``.jsonl`` / ``.jsonl.gz`` corpus file (field ``text``), in file order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"corpus file {str(path)!r} not found; expected e.g. /work/shared/data/corpus/validation.jsonl.gz")
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            t = json.loads(line).get("text")
            if t:
                out.append(t)
            if max_docs is not None and len(out) >= max_docs:
                break
    if not out:
        raise ValueError(f"corpus file {str(path)!r} holds no documents with a 'text' field")
    return out


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate tokenized documents, each followed by EOS, into one ``[N]`` int64 stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in range(0, len(texts), 64):
        enc = tokenizer(texts[i:i + 64], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for e in enc:
            ids.extend(e)
            if eos is not None:
                ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


class TaskBuilder:
    """Builds task prompts of exact token lengths from a filler token stream.

    Args:
        tokenizer: a Hugging Face tokenizer (its pieces are tokenized once and cached).
        filler: ``[N]`` int64 token stream of corpus text (EOS tokens inside are replaced by newlines
            so that a prompt reads as one document).
        seed: base seed; example ``i`` of a task uses ``Random(seed, task, length, i)``.
    """

    def __init__(self, tokenizer, filler: torch.Tensor, seed: int = 0):
        if filler.ndim != 1 or filler.numel() < 64:
            raise ValueError(f"filler must be a 1-D token stream of >= 64 tokens; got shape {tuple(filler.shape)}")
        self.tok = tokenizer
        self.seed = int(seed)
        nl = self._enc("\n")
        eos = tokenizer.eos_token_id
        f = filler.clone()
        if eos is not None and nl:
            f[f == eos] = nl[0]
        self.filler = f.tolist()
        self._cache: dict[str, list[int]] = {}

    # --- pieces -----------------------------------------------------------------------------------
    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self._enc(text)
        return ids

    @staticmethod
    def random_key(rng: random.Random) -> str:
        return "".join(rng.choice(_CONS) + rng.choice(_VOW) for _ in range(rng.randint(2, 3)))

    @staticmethod
    def random_value(rng: random.Random, digits: int = 5) -> str:
        return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))

    def _filler(self, rng: random.Random, n: int) -> list[int]:
        if n <= 0:
            return []
        if n >= len(self.filler):
            raise ValueError(f"filler stream has {len(self.filler)} tokens, a prompt needs {n}; use more corpus text")
        s = rng.randrange(0, len(self.filler) - n)
        return self.filler[s:s + n]

    def _assemble(self, rng: random.Random, length: int, needles: list[tuple[float, list[int]]], tail: list[int]) -> list[int]:
        """Filler of the right size with ``needles`` (depth in [0, 1], ids) inserted, then ``tail``."""
        fixed = sum(len(n) for _, n in needles) + len(tail)
        n_fill = length - fixed
        if n_fill < 0:
            raise ValueError(f"length {length} is too short for this task's {fixed} planted tokens; raise the length")
        fill = self._filler(rng, n_fill)
        cuts = sorted((min(max(d, 0.0), 1.0), i) for i, (d, _) in enumerate(needles))
        out, prev = [], 0
        for d, i in cuts:
            at = int(round(d * n_fill))
            out.extend(fill[prev:at])
            out.extend(needles[i][1])
            prev = at
        out.extend(fill[prev:])
        out.extend(tail)
        assert len(out) == length
        return out

    # --- tasks ------------------------------------------------------------------------------------
    def _rng(self, task: str, length: int, index: int, salt: int = 0) -> random.Random:
        return random.Random(f"{self.seed}/{task}/{length}/{index}/{salt}")

    def passkey(self, length: int, depth: float, index: int = 0) -> Example:
        rng = self._rng("passkey", length, index, int(depth * 1000))
        v = self.random_value(rng)
        needle = self.enc(f"\nThe pass key is {v}. Remember it. {v} is the pass key.\n")
        tail = self.enc("\nWhat is the pass key? The pass key is")
        return Example("passkey", self._assemble(rng, length, [(depth, needle)], tail), v, {"depth": depth})

    def _multikey_parts(self, rng: random.Random, n_keys: int):
        keys = []
        while len(keys) < n_keys:
            k = self.random_key(rng)
            if k not in keys:
                keys.append(k)
        vals = [self.random_value(rng) for _ in keys]
        needles = [(rng.random(), self.enc(f"\nThe special magic number for {k} is {v}.\n")) for k, v in zip(keys, vals)]
        return keys, vals, needles

    def multikey(self, length: int, n_keys: int = 4, index: int = 0) -> Example:
        rng = self._rng("multikey", length, index, n_keys)
        keys, vals, needles = self._multikey_parts(rng, n_keys)
        q = rng.randrange(n_keys)
        tail = self.enc(f"\nWhat is the special magic number for {keys[q]}? The special magic number for {keys[q]} is")
        return Example("multikey", self._assemble(rng, length, needles, tail), vals[q],
                       {"n_keys": n_keys, "depth": needles[q][0]})

    def _chain(self, rng: random.Random, names: list[str], value: str) -> list[tuple[float, list[int]]]:
        depths = sorted(rng.random() * 0.9 for _ in names)
        out = [(depths[0], self.enc(f"\nVAR {names[0]} = {value}.\n"))]
        for i in range(1, len(names)):
            out.append((depths[i], self.enc(f"\nVAR {names[i]} = VAR {names[i - 1]}.\n")))
        return out

    def variable_tracking(self, length: int, hops: int = 2, index: int = 0) -> Example:
        rng = self._rng("variable_tracking", length, index, hops)
        names: list[str] = []
        while len(names) < 2 * (hops + 1):
            k = self.random_key(rng).upper()
            if k not in names:
                names.append(k)
        a, b = names[:hops + 1], names[hops + 1:]
        va = self.random_value(rng)
        vb = self.random_value(rng)
        needles = self._chain(rng, a, va) + self._chain(rng, b, vb)
        tail = self.enc(f"\nQuestion: what value does VAR {a[-1]} hold? Answer: VAR {a[-1]} holds")
        return Example("variable_tracking", self._assemble(rng, length, needles, tail), va, {"hops": hops})

    def suite(self, lengths: list[int], n: int, depths: list[float], n_keys: int = 4, hops: int = 2) -> list[Example]:
        """``n`` examples per (task, length); passkey examples cycle through ``depths``."""
        out = []
        for L in lengths:
            for i in range(n):
                out.append(self.passkey(L, depths[i % len(depths)], i))
            for i in range(n):
                out.append(self.multikey(L, n_keys, i))
            for i in range(n):
                out.append(self.variable_tracking(L, hops, i))
        return out

    # --- pretraining mix ------------------------------------------------------------------------
    def pretraining_document(self, rng: random.Random, length: int) -> list[int]:
        """A ``length``-token training document: filler with planted facts, the question and its answer.

        One of the three tasks (uniformly; random key counts, hop counts and depths); the answer follows
        the question, then the row goes on with the next document, so the model learns to recall facts.
        """
        kind = rng.choice(TASKS)
        if kind == "passkey":
            v = self.random_value(rng)
            needles = [(rng.random(), self.enc(f"\nThe pass key is {v}. Remember it. {v} is the pass key.\n"))]
            tail = self.enc(f"\nWhat is the pass key? The pass key is {v}.\n")
        elif kind == "multikey":
            n = rng.randint(1, 8)
            keys, vals, needles = self._multikey_parts(rng, n)
            tail = []
            for q in rng.sample(range(n), min(n, rng.randint(1, 3))):
                tail += self.enc(f"\nWhat is the special magic number for {keys[q]}? The special magic number for "
                                 f"{keys[q]} is {vals[q]}.\n")
        else:
            hops = rng.randint(0, 3)
            names: list[str] = []
            while len(names) < 2 * (hops + 1):
                k = self.random_key(rng).upper()
                if k not in names:
                    names.append(k)
            a, b = names[:hops + 1], names[hops + 1:]
            va, vb = self.random_value(rng), self.random_value(rng)
            needles = self._chain(rng, a, va) + self._chain(rng, b, vb)
            tail = self.enc(f"\nQuestion: what value does VAR {a[-1]} hold? Answer: VAR {a[-1]} holds {va}.\n")
        fixed = sum(len(n) for _, n in needles) + len(tail)
        length = max(length, fixed + 8)
        return self._assemble(rng, length, needles, tail)


def answer_correct(generated: str, answer: str) -> bool:
    """True if the first whitespace-separated word of ``generated`` (trailing punctuation stripped) is ``answer``."""
    words = generated.strip().split()
    return bool(words) and words[0].rstrip(".,;:!?") == answer
