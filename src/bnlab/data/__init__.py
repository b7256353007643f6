"""Data sets: MNIST from IDX files, the packaged offline subset, and the downloader."""

from bnlab.data.mnist import (
    Dataset,
    MNISTDataError,
    load_mnist,
    load_mnist_dir,
    load_packaged_mnist,
)

__all__ = ["Dataset", "MNISTDataError", "load_mnist", "load_mnist_dir", "load_packaged_mnist"]
