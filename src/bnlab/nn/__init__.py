"""Thin modules over :mod:`bnlab.functional`: drop-in BN layers and converters."""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.convert import replace_batchnorm, revert_batchnorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "replace_batchnorm",
    "revert_batchnorm",
]
