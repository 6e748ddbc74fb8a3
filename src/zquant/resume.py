"""Resumable block pipelines: finished blocks kept on disk, so an interrupted run picks up there.

A resume directory holds ``block-NNNN.safetensors`` (a finished quantized block's state dict) and
``progress.json`` (the run's key, one record per finished block, and each block file's size and
SHA-256). The key identifies the run (scheme, algorithm settings, model and data hashes); a
directory written by a run with another key is refused rather than silently mixed in, and so is
a block file that does not match its recorded size and hash (truncated, corrupted, swapped).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from . import outdir
from .fsutil import atomic_file

RESUME_FORMAT = "zquant-lkd-resume"
RESUME_VERSION = 2              # 2: per-block file hashes
PROGRESS_FILE = "progress.json"


def check_target(directory, sources=(), force: bool = False, force_hint: str = "pass force=True") -> Path:
    """``directory`` once a default resume directory may go there and be removed after the save
    (`zquant.outdir.check_target`): absent, empty or a resume directory already, unless ``force``."""
    return outdir.check_target(directory, PROGRESS_FILE, "LKD resume directory", sources, force, force_hint)


def tensor_bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class and every tensor of its state dict (names, dtypes, values)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


class ResumeState:
    """The finished blocks of a run in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | Path, key: dict):
        self.dir = Path(directory)
        self.key = json.loads(json.dumps(key))          # the form it has once read back from JSON
        self.blocks: list[dict] = []
        self.files: list[dict] = []                     # {"sha256", "bytes"} of each block file
        path = self.dir / PROGRESS_FILE
        if path.is_file():
            self.blocks, self.files = self._read(path)

    def _read(self, path: Path) -> tuple[list[dict], list[dict]]:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            ours = saved["format"] == RESUME_FORMAT and saved["version"] == RESUME_VERSION
            blocks, files, saved_key = list(saved["blocks"]), list(saved["files"]), dict(saved["key"])
            ours = ours and len(files) == len(blocks) and all(isinstance(f, dict) for f in files)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise ValueError(f"{path}: not a progress file of this zquant; delete {self.dir} to start over")
        if saved_key != self.key:
            differ = sorted(k for k in set(saved_key) | set(self.key) if saved_key.get(k) != self.key.get(k))
            raise ValueError(f"{self.dir} holds a run with a different {', '.join(differ)}; delete it or "
                             "choose another resume directory")
        for i, record in enumerate(blocks):
            if not isinstance(record, dict) or record.get("block") != i or not self.path(i).is_file():
                raise ValueError(f"{self.dir}: block {i} is missing or out of order; delete the directory to start over")
        for i, expected in enumerate(files):        # before any slow work: every finished block is intact
            self._verify(i, self.path(i).read_bytes(), expected)
        return blocks, files

    def _verify(self, k: int, data: bytes, expected: dict) -> None:
        """Refuse block ``k``'s file bytes unless they have the recorded size and SHA-256."""
        if len(data) != expected.get("bytes"):
            problem = f"{len(data)} bytes, expected {expected.get('bytes')} (truncated or replaced)"
        elif hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            problem = f"SHA-256 does not match {PROGRESS_FILE} (corrupted, modified or swapped)"
        else:
            return
        raise ValueError(f"{self.path(k)}: block {k}'s saved file: {problem}; delete {self.dir} to start over")

    def path(self, k: int) -> Path:
        return self.dir / f"block-{k:04d}.safetensors"

    def save(self, k: int, block: nn.Module, record: dict) -> None:
        """Write block ``k`` and then the progress file, each atomically (a crash in between only
        leaves an unlisted block file, which the next run overwrites)."""
        from safetensors.torch import save_file
        if k != len(self.blocks):
            raise RuntimeError(f"block {k} finished out of order (expected {len(self.blocks)})")
        with atomic_file(self.path(k)) as tmp:
            save_file({n: t.detach().contiguous().clone() for n, t in block.state_dict().items()}, str(tmp))
            data = tmp.read_bytes()
        self.blocks.append(record)
        self.files.append({"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        with atomic_file(self.dir / PROGRESS_FILE) as tmp:
            tmp.write_text(json.dumps({"format": RESUME_FORMAT, "version": RESUME_VERSION, "key": self.key,
                                       "blocks": self.blocks, "files": self.files}, indent=1), encoding="utf-8")

    def load(self, k: int, skeleton: nn.Module) -> nn.Module:
        """``skeleton`` (a quantized block of the right structure) with block ``k``'s saved tensors."""
        from safetensors.torch import load
        data = self.path(k).read_bytes()          # verified again: these are the bytes that are loaded
        self._verify(k, data, self.files[k])
        skeleton.load_state_dict(load(data), strict=True)
        return skeleton
