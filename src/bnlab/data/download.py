"""Download the four MNIST IDX files, verified, atomically, with retries and resume.

Each file is fetched gzip-compressed into ``<name>.gz.part``, resumed with an
HTTP Range request when a partial file is there, checked against the MD5 of
the uncompressed original, and only then renamed to ``<name>.gz``. A failed or
corrupt download never leaves a file under the final name.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bnlab.data.mnist import FILES

__all__ = ["DEFAULT_MIRRORS", "DownloadError", "download_mnist"]

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """Every mirror failed for a file (the message lists each attempt)."""


def _md5_of_gzip(path: Path) -> str | None:
    try:
        with gzip.open(path, "rb") as f:
            h = hashlib.md5()
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
    except (OSError, EOFError):
        return None


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Fetch url into part, resuming from part's current size when the server allows."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = start and response.status == 206
        mode = "ab" if resumed else "wb"
        total = response.headers.get("Content-Length")
        total = int(total) + (start if resumed else 0) if total else None
        from tqdm.auto import tqdm

        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=start if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                leave=False,
                disable=not (progress and sys.stderr.isatty()),
            ) as bar,
        ):
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                bar.update(len(block))


def download_mnist(
    directory: str | Path,
    mirrors: tuple[str, ...] | list[str] = DEFAULT_MIRRORS,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    log=print,
) -> Path:
    """Download and verify the four MNIST files into ``directory``.

    Files already present and verified are kept. For each missing file, each
    mirror is tried up to ``retries`` times (resuming partial downloads, with a
    short back-off between tries).

    Returns:
        The directory, ready for ``bnlab reproduce figure1 --data DIR``.

    Raises:
        DownloadError: a file could not be fetched and verified from any mirror.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, (_, md5) in FILES.items():
        final = directory / f"{name}.gz"
        if final.exists() and _md5_of_gzip(final) == md5:
            log(f"{final.name}: present, checksum ok")
            continue
        part = directory / f"{name}.gz.part"
        attempts = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            for attempt in range(1, retries + 1):
                try:
                    _fetch(url, part, timeout, progress)
                except (urllib.error.URLError, OSError, TimeoutError) as e:
                    attempts.append(f"{url} (try {attempt}): {e}")
                    time.sleep(min(0.2 * 2**attempt, 2.0))
                    continue
                got = _md5_of_gzip(part)
                if got == md5:
                    os.replace(part, final)  # atomic: the final name only ever holds good data
                    log(f"{final.name}: downloaded from {mirror}, checksum ok")
                    break
                attempts.append(f"{url} (try {attempt}): checksum {got}, expected {md5}")
                part.unlink(missing_ok=True)  # corrupt: start over, do not resume from it
            else:
                continue
            break
        else:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"could not download {name}.gz; attempts:\n  "
                + "\n  ".join(attempts)
                + "\nCheck your connection or pass another --mirror."
            )
    return directory
