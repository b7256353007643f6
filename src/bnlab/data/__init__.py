"""Data sets: MNIST from IDX files and the packaged offline subset, CIFAR-10, the downloader."""

from bnlab.data.cifar10 import CIFARDataError, ImageData, load_cifar10
from bnlab.data.mnist import (
    Dataset,
    MNISTDataError,
    load_mnist,
    load_mnist_dir,
    load_packaged_mnist,
)

__all__ = [
    "CIFARDataError",
    "Dataset",
    "ImageData",
    "MNISTDataError",
    "load_cifar10",
    "load_mnist",
    "load_mnist_dir",
    "load_packaged_mnist",
]
