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

    def _two_chains(self, rng: random.Random, hops: int):
        """Two variable chains of ``hops`` links with distinct names: the asked one ``a`` (value ``va``) and a
        distractor ``b`` (value ``vb``), and their needles."""
        names: list[str] = []
        while len(names) < 2 * (hops + 1):
            k = self.random_key(rng).upper()
            if k not in names:
                names.append(k)
        a, b = names[:hops + 1], names[hops + 1:]
        va, vb = self.random_value(rng), self.random_value(rng)
        return a, b, va, vb, self._chain(rng, a, va) + self._chain(rng, b, vb)

    def variable_tracking(self, length: int, hops: int = 2, index: int = 0) -> Example:
        rng = self._rng("variable_tracking", length, index, hops)
        a, b, va, vb, needles = self._two_chains(rng, hops)
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
    def pretraining_document(self, rng: random.Random, length: int, mix: "PretrainMix | None" = None) -> list[int]:
        """A ``length``-token training document: filler with planted facts, then questions with their answers.

        The task is drawn with ``mix.weights``; the pieces are the evaluation's own templates, but keys,
        values, depths and filler come from ``rng`` and this builder's stream (the *train* split in
        :func:`dms.base_models.build_base_model`; evaluation prompts use the validation split and their own
        seeded generators), so no evaluation item is ever trained on.

        - passkey: one needle, one question.
        - multikey: ``mix.min_keys..max_keys`` facts (the evaluation uses 4), then questions about
          ``1..max_questions`` distinct keys in random order, each followed by its value.
        - variable_tracking: a chain of ``0..max_hops`` links plus a distractor chain with another value (as in
          the evaluation), then questions about ``1..max_questions`` variables of either chain, so every hop
          depth (0 = direct lookup) is supervised, not only the last one.

        After the last answer the row goes on with the next document.
        """
        mix = mix or PretrainMix()
        kind = rng.choices(TASKS, weights=mix.weights)[0]
        if kind == "passkey":
            v = self.random_value(rng)
            needles = [(rng.random(), self.enc(f"\nThe pass key is {v}. Remember it. {v} is the pass key.\n"))]
            tail = self.enc(f"\nWhat is the pass key? The pass key is {v}.\n")
        elif kind == "multikey":
            n = rng.randint(mix.min_keys, mix.max_keys)
            keys, vals, needles = self._multikey_parts(rng, n)
            tail = []
            for q in rng.sample(range(n), rng.randint(1, min(n, mix.max_questions))):
                tail += self.enc(f"\nWhat is the special magic number for {keys[q]}? The special magic number for "
                                 f"{keys[q]} is {vals[q]}.\n")
        else:
            hops = rng.randint(0, mix.max_hops)
            a, b, va, vb, needles = self._two_chains(rng, hops)
            names = a + b
            value_of = {**{x: va for x in a}, **{x: vb for x in b}}
            tail = []
            for x in rng.sample(names, rng.randint(1, min(len(names), mix.max_questions))):
                tail += self.enc(f"\nQuestion: what value does VAR {x} hold? Answer: VAR {x} holds {value_of[x]}.\n")
        fixed = sum(len(n) for _, n in needles) + len(tail)
        length = max(length, fixed + 8)
        return self._assemble(rng, length, needles, tail)


@dataclass
class PretrainMix:
    """How retrieval documents of the pretraining mix are drawn (:meth:`TaskBuilder.pretraining_document`).

    Attributes:
        weights: relative frequency of (passkey, multikey, variable_tracking) documents. Passkey is the easy
            one (a single needle), so the default spends most documents on the two harder tasks.
        min_keys, max_keys: facts per multi-key document (uniform; the evaluation uses 4, more keys in training
            make telling keys apart, the evaluation's failure mode, the thing that is learned).
        max_questions: questions per multi-key / variable-tracking document (uniform in ``1..max``).
        max_hops: variable-tracking chain links (uniform in ``0..max``; the evaluation uses 2).
    """

    weights: tuple = (0.2, 0.6, 0.2)
    min_keys: int = 2
    max_keys: int = 10
    max_questions: int = 4
    max_hops: int = 3

    def __post_init__(self):
        w = tuple(float(x) for x in self.weights)
        if len(w) != len(TASKS) or any(x < 0 for x in w) or not sum(w) > 0:
            raise ValueError(f"weights must be {len(TASKS)} non-negative numbers for {TASKS} with a positive sum; "
                             f"got {self.weights!r}")
        self.weights = w
        for name in ("min_keys", "max_keys", "max_questions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        if self.min_keys > self.max_keys:
            raise ValueError(f"min_keys ({self.min_keys}) must be <= max_keys ({self.max_keys})")
        if isinstance(self.max_hops, bool) or not isinstance(self.max_hops, int) or self.max_hops < 0:
            raise ValueError(f"max_hops must be an integer >= 0; got {self.max_hops!r}")


def answer_correct(generated: str, answer: str) -> bool:
    """True if the first whitespace-separated word of ``generated`` (trailing punctuation stripped) is ``answer``."""
    words = generated.strip().split()
    return bool(words) and words[0].rstrip(".,;:!?") == answer
