"""A run folder's files: atomic writes, safe checkpoint loads, and the folder's lock.

Everything here survives being killed at any moment: a file is the old one or the
new one, never half of one, and a killed run's lock is released by the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "LOCK_NAME",
    "CheckpointError",
    "FolderLockedError",
    "atomic_write_bytes",
    "atomic_write_text",
    "folder_problem",
    "locked_folder",
    "TornRecordWarning",
    "load_checkpoint",
    "read_json",
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None and cause is not e:
            # torch.save reports a failed write as "[enforce fail ...] unexpected pos";
            # the OSError behind it (a full disk, say) is what the user needs to see.
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from e
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def _os_error(e: BaseException) -> OSError | None:
    """The OSError that ``e`` is or was raised while handling, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created if needed), or None if they can.

    Checks by doing: creates the folder and writes and removes a probe file, so a
    read-only file system, a missing permission or a parent that is a file is found
    before any work is done.
    """
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".bnlab-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror or e})"
    return None


LOCK_NAME = ".lock"  # in the run folder: the holder's pid, host, start time and command


class FolderLockedError(ValueError):
    """Another process holds the run folder (it is training or reporting there)."""


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block, or refuse at once with who holds it.

    Two runs writing one folder (two ``--resume`` of the same run, say) each train
    every arm and append every record twice; one run judging the folder while the
    other is still writing it refuses with a misleading reason. The lock is an
    ``fcntl.flock`` on ``folder/.lock``, which the kernel releases when the holder
    exits or is killed, so a stale lock never blocks a later run; the file holds
    the holder's pid, host, start time and command, to name it in the error.

    Args:
        folder: an existing folder.

    Raises:
        FolderLockedError: another process holds the lock (a ValueError).
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise FolderLockedError(
                f"{folder} is in use by another bnlab run ({holder}); wait for it to finish "
                "(or stop it), or choose another --out"
            ) from None
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
        holder = (
            f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        try:
            yield folder
        finally:
            with contextlib.suppress(OSError):  # the file may be gone with its folder
                os.ftruncate(fd, 0)  # released: no holder to name
    finally:
        os.close(fd)  # releases the flock


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


class TornRecordWarning(UserWarning):
    """The last line of a JSON-lines file was cut off (a crash mid-write) and skipped."""


def _json_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> ValueError:
    where = f"line {line if line is not None else e.lineno}, column {e.colno}"
    return ValueError(f"{path}, {where}: not valid JSON ({e.msg}); the file is damaged")


def read_json(path: Path) -> Any:
    """The JSON document in ``path``.

    Raises:
        ValueError: not valid JSON; the message names the file and the line.
    """
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e.reason}); the file is damaged") from e


def read_jsonl(path: Path, warn: bool = True) -> list[dict]:
    """Records of a JSON-lines file (none if it does not exist).

    A torn last line (the writer was killed mid-write) is skipped, with a
    :class:`TornRecordWarning` naming the file and line when ``warn``.

    Raises:
        ValueError: a line before the last is not valid JSON (named with its number).
    """
    records = []
    if not Path(path).exists():
        return records
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i != len(lines) - 1:
                raise _json_error(path, e, line=i + 1) from e
            if warn:
                warnings.warn(
                    f"{path}, line {i + 1}: a torn record (cut off mid-write, as by a crash) "
                    "was skipped; what it held is missing from this report",
                    TornRecordWarning,
                    stacklevel=2,
                )
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
