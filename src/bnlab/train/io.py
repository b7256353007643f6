"""Files that survive being killed at any moment: atomic writes, safe checkpoint loads."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "read_jsonl",
    "save_checkpoint",
    "to_strict_json",
    "write_json",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (corrupt, or from another experiment)."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float, at any depth, replaced by None.

    Python's json module writes such floats as ``NaN``/``Infinity``, which strict
    readers (jq, browsers) reject; bnlab records say why a value is missing in
    another field (a ``diverged`` record, for example).
    """
    if isinstance(obj, float | np.floating):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_strict_json(v) for v in obj]
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(to_strict_json(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (killed mid-write) is dropped."""
    records = []
    if not Path(path).exists():
        return records
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save ``state`` atomically."""
    _atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain data only).

    Raises:
        CheckpointError: the file is corrupt or not a bnlab checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, unsafe global, ...
        # PyTorch's own text may suggest weights_only=False: for a tampered file that
        # runs its code, so it is not passed on (the cause stays chained for debugging).
        raise CheckpointError(
            f"checkpoint {path} is damaged or was not written by bnlab ({type(e).__name__}), "
            "so it cannot be trusted and was not loaded; delete it and rerun the same "
            "command with --resume (that part of the run then trains again from step 0)"
        ) from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a bnlab training checkpoint")
    return state
