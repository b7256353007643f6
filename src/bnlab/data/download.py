"""Download data sets verified, atomically, with retries and resume: MNIST and CIFAR-10.

Every file goes through one routine (:func:`_download_file`): it is fetched
into ``<name>.part``, resumed with an HTTP Range request when a partial file is
there, checked against its MD5, and only then renamed to ``<name>``. A failed
or corrupt download never leaves a file under the final name.

What the MD5 covers differs by set, as published: for MNIST it is the MD5 of
the *uncompressed* IDX file (the ``.gz`` itself may differ between mirrors);
for CIFAR-10 it is the MD5 of the ``.tar.gz`` archive.
"""

from __future__ import annotations

import gzip
import hashlib
import http
import os
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from bnlab.data import cifar10
from bnlab.data.mnist import FILES

__all__ = [
    "CIFAR10_MIRRORS",
    "DEFAULT_MIRRORS",
    "DownloadError",
    "download_cifar10",
    "download_mnist",
]

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
CIFAR10_MIRRORS = cifar10.MIRRORS
CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """No mirror gave a verified file (the message lists each attempt), or --dir is unusable."""


def _md5_of(f) -> str:
    h = hashlib.md5()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _md5_of_gzip(path: Path) -> str | None:
    """MD5 of the decompressed content; None when it is not a whole gzip stream."""
    try:
        with gzip.open(path, "rb") as f:
            return _md5_of(f)
    except (OSError, EOFError, zlib.error):  # zlib.error: a bad deflate stream
        return None


def _md5_of_file(path: Path) -> str | None:
    """MD5 of the file's bytes; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return _md5_of(f)
    except OSError:
        return None


def _prepare(directory: str | Path) -> Path:
    """The target folder, created if needed; a DownloadError when it cannot be one."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DownloadError(f"--dir {directory} is a file, not a folder; pass a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the folder {directory}: {e}") from e
    return directory


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Fetch url into part, resuming from part's current size when the server allows."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if start and e.code == http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
            return  # part already holds the whole file; the checksum decides
        raise
    with response:
        resumed = start and response.status == 206
        mode = "ab" if resumed else "wb"
        total = response.headers.get("Content-Length")
        total = int(total) + (start if resumed else 0) if total else None
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


def _download_file(
    final: Path,
    md5: str,
    md5_of: Callable[[Path], str | None],
    mirrors: Sequence[str],
    retries: int,
    timeout: float,
    progress: bool,
    log: Callable[[str], object],
) -> None:
    """Make ``final`` hold the file whose ``md5_of`` is ``md5``, from the first mirror that works.

    A file already there with the right checksum is kept. Each mirror is tried
    up to ``retries`` times, resuming ``final.part`` and backing off briefly
    between tries; a part that fails its checksum is deleted, not resumed.

    Raises:
        DownloadError: no mirror gave a verified file; lists every attempt.
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1 (tries per mirror), got {retries}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    if final.exists() and md5_of(final) == md5:
        log(f"{final.name}: present, checksum ok")
        return
    part = final.with_name(final.name + ".part")
    attempts = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{final.name}"
        for attempt in range(1, retries + 1):
            log(f"{final.name}: fetching {url} (try {attempt} of {retries}, timeout {timeout:g} s)")
            try:
                _fetch(url, part, timeout, progress)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                attempts.append(f"{url} (try {attempt}): {e}")
                time.sleep(min(0.2 * 2**attempt, 2.0))
                continue
            got = md5_of(part)
            if got == md5:
                os.replace(part, final)  # atomic: the final name only ever holds good data
                log(f"{final.name}: downloaded from {mirror}, checksum ok")
                return
            size = part.stat().st_size if part.exists() else 0
            why = (
                f"incomplete download or not the expected kind of file ({size:,} bytes "
                "that cannot be read whole)"
                if got is None
                else f"not the expected file (MD5 {got}, expected {md5})"
            )
            attempts.append(f"{url} (try {attempt}): {why}")
            part.unlink(missing_ok=True)  # corrupt: start over, do not resume from it
    part.unlink(missing_ok=True)
    raise DownloadError(
        f"could not download {final.name}; attempts:\n  "
        + "\n  ".join(attempts or ["(no mirror given)"])
        + "\nCheck your connection or pass another --mirror."
    )


def download_mnist(
    directory: str | Path,
    mirrors: Sequence[str] = DEFAULT_MIRRORS,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> Path:
    """Download and verify the four MNIST files into ``directory``.

    Files already present and verified are kept. For each missing file, each
    mirror is tried up to ``retries`` times (resuming partial downloads, with a
    short back-off between tries). Each ``.gz`` is checked against the MD5 of
    the published *uncompressed* file.

    Returns:
        The directory, ready for ``bnlab reproduce figure1 --data DIR``.

    Raises:
        DownloadError: a file could not be fetched and verified from any mirror,
            or ``directory`` is not a usable folder.
    """
    directory = _prepare(directory)
    for name, (_, md5) in FILES.items():
        _download_file(
            directory / f"{name}.gz", md5, _md5_of_gzip, mirrors, retries, timeout, progress, log
        )
    return directory


def download_cifar10(
    directory: str | Path,
    layout: str = "python",
    mirrors: Sequence[str] = CIFAR10_MIRRORS,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    log: Callable[[str], object] = print,
    md5: str | None = None,
) -> Path:
    """Download and verify the CIFAR-10 archive (``cifar-10-python.tar.gz``) into ``directory``.

    The archive is kept packed: :func:`bnlab.data.load_cifar10` reads it in
    place. An archive already present with the right checksum is kept.

    Args:
        directory: the target folder (created if needed).
        layout: ``"python"`` (pickled batches) or ``"binary"`` (``cifar-10-binary.tar.gz``).
        mirrors: base URLs, tried in order; the file name is appended.
        retries: tries per mirror.
        timeout: seconds per network operation.
        progress: a progress bar on a terminal.
        log: receives one line per file.
        md5: the expected MD5 of the archive file; default the official one
            (:data:`bnlab.data.cifar10.OFFICIAL`).

    Returns:
        The archive's path, ready for ``bnlab reproduce inception --data DIR``.

    Raises:
        ValueError: an unknown layout.
        DownloadError: no mirror gave a verified archive, or ``directory`` is not a
            usable folder.
    """
    if layout not in cifar10.ARCHIVES:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(cifar10.ARCHIVES)}")
    name = cifar10.ARCHIVES[layout]
    final = _prepare(directory) / name
    md5 = md5 or cifar10.OFFICIAL[name]
    _download_file(final, md5, _md5_of_file, mirrors, retries, timeout, progress, log)
    return final
