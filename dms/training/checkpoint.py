"""Atomic, verifiable training checkpoints.

Layout under ``<output>/checkpoints``::

    step-000200/            a complete checkpoint (renamed into place only once fully written)
        manifest.json       every file's size and sha256, written last inside the folder
        ...                 model/optimizer/RNG/trainer state
    latest                  name of the newest complete checkpoint (replaced atomically, after the rename)
    .tmp-step-000400-*/     a save in progress or killed mid-way: never used for resume

A checkpoint is used only if its manifest verifies (files present, sizes and hashes match); a
truncated or missing file is named in the error. Old checkpoints are deleted by the main process
only, and only after the new one is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def verify_checkpoint(folder: str | Path, check_hashes: bool = True) -> dict:
    """Return the manifest of a complete checkpoint or raise CheckpointError naming the bad file."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it is partial (a save was interrupted)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is corrupted ({e})") from None
    for rel, meta in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint file {p} is truncated or altered: {size} bytes, manifest says {meta['size']}")
        if check_hashes and _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} does not match its sha256 in the manifest")
    listed = set(manifest["files"]) | {MANIFEST}
    for p in folder.rglob("*"):
        if p.is_file() and p.relative_to(folder).as_posix() not in listed:
            raise CheckpointError(f"checkpoint {folder} holds a file not in its manifest: {p} (refusing to load it)")
    return manifest


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2, is_main: bool = True):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main

    def step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def tmp_dir(self, step: int, nonce: str | None = None) -> Path:
        return self.root / f".tmp-step-{step:06d}-{nonce or uuid.uuid4().hex[:8]}"

    def publish(self, tmp: Path, step: int, extra: dict | None = None) -> Path:
        """Main process: manifest, rename into place, update ``latest``, prune old ones."""
        final = self.root / f"step-{step:06d}"
        write_manifest(tmp, extra)
        if final.exists():  # a re-run of the same step (after resume): replace only once the new one is whole
            old = self.root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        latest_tmp = self.root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, self.root / "latest")
        self.prune()
        return final

    def prune(self):
        if not self.is_main:
            return
        dirs = self.step_dirs()
        for p in dirs[:-self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)

    def latest_complete(self) -> Path | None:
        """Newest checkpoint whose manifest verifies; None if there is none at all.

        Raises CheckpointError if checkpoints exist but none is complete (refuse rather than
        silently restarting from scratch).
        """
        candidates = list(reversed(self.step_dirs()))
        latest = self.root / "latest"
        if latest.is_file():
            named = self.root / latest.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        errors = []
        for c in candidates:
            try:
                verify_checkpoint(c)
                return c
            except CheckpointError as e:
                errors.append(str(e))
        partial = list(self.root.glob(".tmp-step-*")) if self.root.is_dir() else []
        if errors or partial:
            detail = "; ".join(errors) or f"only interrupted saves: {[p.name for p in partial]}"
            raise CheckpointError(
                f"no complete checkpoint in {self.root} ({detail}). Refusing to start from scratch silently: "
                "remove the folder or pass --overwrite to start over")
        return None
