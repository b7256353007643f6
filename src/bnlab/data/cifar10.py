"""CIFAR-10 (Krizhevsky, 2009) from the official python or binary layout, folder or archive.

Both layouts hold five training batches and one test batch of 10,000 32x32
colour images each, every image stored as 3,072 bytes: the red, then the green,
then the blue 32x32 plane, rows top to bottom. So ``data.reshape(n, 3, 32, 32)``
gives (N, C, H, W) directly.

- python layout (``cifar-10-batches-py/``, archive ``cifar-10-python.tar.gz``):
  ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, pickles of a dict with
  ``b"data"`` (uint8, n x 3072) and ``b"labels"`` (n ints); ``b"filenames"`` and
  ``b"batch_label"`` may be there too and are ignored.
- binary layout (``cifar-10-batches-bin/``, archive ``cifar-10-binary.tar.gz``):
  ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``, records of
  1 label byte followed by the 3,072 pixel bytes.

Unpickling runs whatever code a pickle asks for, so the python layout is read
with an unpickler that only hands out numpy's array reconstruction and a few
plain containers (:class:`_BatchUnpickler`). Archives are read member by member
in one pass over the stream, never extracted to disk. Local files are not
checked against :data:`OFFICIAL`: a lossless rebuild of the set (without
``b"filenames"``, say) differs byte-wise but loads the same; only the
downloader verifies checksums.
"""

from __future__ import annotations

import functools
import gzip
import io
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ARCHIVES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CLASSES",
    "MIRRORS",
    "OFFICIAL",
    "CIFARDataError",
    "ImageData",
    "compute_channel_stats",
    "load_cifar10",
    "normalize_images",
]

# layout -> archive name, as published
ARCHIVES = {"python": "cifar-10-python.tar.gz", "binary": "cifar-10-binary.tar.gz"}
# archive name -> MD5 of the archive file itself (the downloader checks it)
OFFICIAL = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
}
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean and standard deviation of the 50,000 training images, on the
# [0, 1] scale (the usual 125.3 / 123.0 / 113.9 and 63.0 / 62.1 / 66.7 out of 255).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

_FOLDERS = {"python": "cifar-10-batches-py", "binary": "cifar-10-batches-bin"}
_SUFFIX = {"python": "", "binary": ".bin"}
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = "test_batch"
_BATCH = 10_000
_PIXELS = 3 * 32 * 32


class CIFARDataError(ValueError):
    """A missing, corrupt, tampered or inconsistent CIFAR-10 file (the message names it)."""


@dataclass
class ImageData:
    """Images as uint8 (N, 3, 32, 32), labels int64 in 0..9, and where they came from.

    Pixels stay uint8 (150 MiB for CIFAR-10's 50,000 training images, a quarter
    of float32); convert a batch at a time with :func:`normalize_images`.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    description: str  # which data this is, for reports
    source: str  # the path it was read from

    @property
    def name(self) -> str:
        return self.description.split(":")[0]


_FIX = (
    "download it again with `bnlab data download cifar10 --dir DIR` and pass --data DIR, "
    "or point --data at a good copy"
)


# --------------------------------------------------------------- safe unpickling


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 writes for ``bytes`` at protocol 2: ``_codecs.encode(str, "latin1")``."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


@functools.cache
def _allowed() -> dict[tuple[str, str], object]:
    # ndarray.__reduce__ names numpy's own _reconstruct: numpy.core.multiarray in
    # numpy 1 (and in the official pickles), numpy._core.multiarray in numpy 2.
    reconstruct = np.empty(0).__reduce__()[0]
    # numpy >= 1.16 pickles contiguous arrays at protocol 5 through _frombuffer
    frombuffer = np.empty(0).__reduce_ex__(5)[0]
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches and refuses any other callable or class.

    A pickle names every callable it runs (``GLOBAL``/``STACK_GLOBAL``), and
    each goes through :meth:`find_class`; answering only with numpy's array
    reconstruction and plain containers means a crafted file cannot run
    ``os.system`` or anything else. ``persistent_load`` stays unsupported.
    """

    source = "?"

    def find_class(self, module: str, name: str) -> object:
        found = _allowed().get((module, name))
        if found is None:
            raise CIFARDataError(
                f"{self.source}: the CIFAR-10 loader refuses to load a pickle that asks for "
                f"{module}.{name}: not a CIFAR-10 batch; the file may be tampered with; "
                "download it again with `bnlab data download cifar10`"
            )
        return found


def _unpickle(raw: bytes, source: str) -> object:
    # encoding="bytes", as the official loader: Python 2 strings stay bytes (b"data")
    unpickler = _BatchUnpickler(io.BytesIO(raw), encoding="bytes")  # BytesIO shares raw
    unpickler.source = source
    try:
        return unpickler.load()
    except CIFARDataError:
        raise
    except Exception as e:  # whatever a damaged stream makes the unpickler or numpy raise
        raise CIFARDataError(
            f"{source}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt; " + _FIX
        ) from e


# --------------------------------------------------------------- one batch


def _parse_python(raw: bytes, source: str, check_shapes: bool) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(raw, source)
    if not isinstance(batch, dict):
        raise CIFARDataError(
            f"{source}: holds a {type(batch).__name__}, expected a dict with data and labels; "
            + _FIX
        )
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", "labels"):
        if key not in batch:
            raise CIFARDataError(f"{source}: no {key!r} entry; " + _FIX)
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = type(data).__name__
        if isinstance(data, np.ndarray):
            what = f"{data.dtype} array of shape {data.shape}"
        raise CIFARDataError(
            f"{source}: data is a {what}, expected uint8 images x {_PIXELS}; " + _FIX
        )
    try:
        labels = np.asarray(batch["labels"])
    except (ValueError, TypeError) as e:
        raise CIFARDataError(f"{source}: labels are not a list of integers ({e})") from e
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise CIFARDataError(
            f"{source}: labels of dtype {labels.dtype} and shape {labels.shape}, expected "
            "a list of integers; " + _FIX
        )
    return _checked(data, labels, source, check_shapes)


def _parse_binary(raw: bytes, source: str, check_shapes: bool) -> tuple[np.ndarray, np.ndarray]:
    record = 1 + _PIXELS
    if len(raw) % record:
        raise CIFARDataError(
            f"{source}: {len(raw):,} bytes is not a whole number of {record}-byte records "
            "(1 label byte + 3,072 pixel bytes); the file is truncated or corrupt; " + _FIX
        )
    table = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)  # (n, 1 + 3072)
    return _checked(table[:, 1:], table[:, 0], source, check_shapes)


def _checked(
    data: np.ndarray, labels: np.ndarray, source: str, check_shapes: bool
) -> tuple[np.ndarray, np.ndarray]:
    n = _BATCH if check_shapes else len(data)
    if data.shape != (n, _PIXELS):
        raise CIFARDataError(
            f"{source}: images of shape {data.shape}, expected ({n}, {_PIXELS}); " + _FIX
        )
    if labels.shape != (len(data),):
        raise CIFARDataError(f"{source}: {len(labels)} labels for {len(data)} images; " + _FIX)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)][0]
        raise CIFARDataError(
            f"{source}: label {int(bad)} outside 0..9; the file is corrupt; " + _FIX
        )
    return data, labels


# --------------------------------------------------------------- where the files are


def _layout_of_folder(folder: Path) -> str | None:
    for layout, suffix in _SUFFIX.items():
        if any((folder / f"{name}{suffix}").is_file() for name in (*_TRAIN, _TEST)):
            return layout
    return None


def _locate(path: Path) -> tuple[str, Path, str | None]:
    """("folder" | "archive", where, layout or None when an archive decides it)."""
    if path.is_file():
        if path.name.removesuffix(".bin") in (*_TRAIN, _TEST):
            raise CIFARDataError(
                f"--data {path}: one batch of CIFAR-10; pass the folder that holds all six"
            )
        return "archive", path, None
    if not path.is_dir():
        raise CIFARDataError(
            f"--data {path}: no such file or folder; run `bnlab data download cifar10 --dir "
            f"{path}` first"
        )
    layout = _layout_of_folder(path)
    if layout:
        return "folder", path, layout
    for layout, folder in _FOLDERS.items():
        if _layout_of_folder(path / folder) == layout:
            return "folder", path / folder, layout
    for layout, archive in ARCHIVES.items():
        if (path / archive).is_file():
            return "archive", path / archive, layout
    raise CIFARDataError(
        f"--data {path}: found no CIFAR-10 here (looked for data_batch_1..5 and test_batch, "
        f"with or without .bin, in it, in {'/ or '.join(_FOLDERS.values())}/, and for "
        f"{' or '.join(ARCHIVES.values())}); run `bnlab data download cifar10 --dir {path}`"
    )


def _read_folder(folder: Path, layout: str) -> Iterator[tuple[str, bytes, str]]:
    for name in (*_TRAIN, _TEST):
        file = folder / f"{name}{_SUFFIX[layout]}"
        if not file.is_file():
            raise CIFARDataError(
                f"{file}: missing (a CIFAR-10 {layout}-layout folder holds data_batch_1..5 and "
                f"test_batch{_SUFFIX[layout]}); " + _FIX
            )
        try:
            yield name, file.read_bytes(), str(file)
        except OSError as e:
            raise CIFARDataError(f"{file}: cannot read ({e}); " + _FIX) from e


def _read_archive(archive: Path) -> tuple[str, dict[str, tuple[bytes, str]]]:
    """The batches of a tar(.gz) in one pass over its stream: (layout, name -> (bytes, where))."""
    wanted = {f"{n}{s}": (n, layout) for layout, s in _SUFFIX.items() for n in (*_TRAIN, _TEST)}
    found: dict[str, dict[str, tuple[bytes, str]]] = {"python": {}, "binary": {}}
    try:
        with open(archive, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            # GzipFile checks the CRC-32 and length at the end of the stream, which
            # tarfile's own gzip reader skips; deflate alone would let a flipped bit through.
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
            # "r|": a forward-only stream; "r:gz" would decompress again for every seek back
            with tarfile.open(fileobj=stream, mode="r|" if gzipped else "r|*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if base not in wanted or not member.isfile():
                        continue
                    name, layout = wanted[base]
                    f = tar.extractfile(member)
                    found[layout][name] = (f.read(), f"{archive}:{member.name}")
            while stream.read(1 << 20):  # to the end, where gzip verifies its checksum
                pass
    except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
        raise CIFARDataError(
            f"{archive}: cannot read the archive ({type(e).__name__}: {e}); it is truncated or "
            "corrupt; " + _FIX
        ) from e
    layout = max(found, key=lambda k: len(found[k]))
    if not found[layout]:
        raise CIFARDataError(
            f"{archive}: holds no CIFAR-10 batches (data_batch_1..5, test_batch); " + _FIX
        )
    return layout, found[layout]


# --------------------------------------------------------------- public


def load_cifar10(path: str | Path, check_shapes: bool = True) -> ImageData:
    """Load CIFAR-10 from a folder or an archive, in the python or the binary layout.

    Args:
        path: the extracted ``cifar-10-batches-py`` (or ``-bin``) folder, the folder
            above it, a folder holding ``cifar-10-python.tar.gz`` (or
            ``cifar-10-binary.tar.gz``), or the archive itself.
        check_shapes: require the official 10,000 images per batch; tests pass False.

    Returns:
        :class:`ImageData` with 50,000 training and 10,000 test images, uint8
        (N, 3, 32, 32), in the official order.

    Raises:
        CIFARDataError: missing, truncated, corrupt, tampered or inconsistent
            data; the message names the file and the fix.

    Example:
        >>> d = load_cifar10("data/cifar10")  # doctest: +SKIP
        >>> d.x_train.shape, d.classes[d.y_train[0]]  # doctest: +SKIP
        (torch.Size([50000, 3, 32, 32]), 'frog')
    """
    path = Path(path)
    kind, where, layout = _locate(path)
    if kind == "folder":
        batches = {name: (raw, src) for name, raw, src in _read_folder(where, layout)}
    else:
        layout, batches = _read_archive(where)
        for name in (*_TRAIN, _TEST):
            if name not in batches:
                raise CIFARDataError(f"{where}: no {name}{_SUFFIX[layout]} in the archive; " + _FIX)
    parse: Callable[[bytes, str, bool], tuple[np.ndarray, np.ndarray]] = (
        _parse_python if layout == "python" else _parse_binary
    )
    parsed = {name: parse(raw, src, check_shapes) for name, (raw, src) in batches.items()}

    def stack(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.concatenate([parsed[n][0] for n in names])  # (n, 3072): R, G, B planes
        labels = np.concatenate([parsed[n][1] for n in names]).astype(np.int64)
        return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)

    x_train, y_train = stack(_TRAIN)
    x_test, y_test = stack((_TEST,))
    return ImageData(
        x_train,
        y_train,
        x_test,
        y_test,
        classes=CLASSES,
        description=f"CIFAR-10 ({layout} layout) from {where}: "
        f"{len(x_train):,} training / {len(x_test):,} test images",
        source=str(where),
    )


def compute_channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (biased) standard deviation of uint8 images, on the [0, 1] scale.

    Counts each of the 256 values per channel (``bincount``), so the moments are
    exact sums over integers: no float copy of the images and no round-off
    from summing 51 million pixels.

    Shape:
        x: (N, C, H, W), uint8 in 0..255.
    """
    if x.dim() != 4 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    values = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mu = (counts * values).sum() / n
        biased_var = (counts * (values - mu).square()).sum() / n
        mean.append(float(mu) / 255)
        std.append(float(biased_var.sqrt()) / 255)
    return tuple(mean), tuple(std)


def normalize_images(
    x: torch.Tensor,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel: uint8 images to standardized floats.

    Args:
        x: uint8 images (N, C, H, W) in any memory format (the output keeps it).
        mean, std: per channel, on the [0, 1] scale (the defaults are CIFAR-10's).
        dtype: the floating dtype of the result.
    """
    if x.dim() != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"images of shape {tuple(x.shape)} with {len(mean)} means and {len(std)} stds: "
            "expected (N, C, H, W) and C of each"
        )
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x.to(dtype) / 255 - m) / s
