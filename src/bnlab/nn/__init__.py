"""Thin modules over :mod:`bnlab.functional`: drop-in BN layers, SyncBatchNorm, converters."""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.convert import replace_batchnorm, revert_batchnorm
from bnlab.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "replace_batchnorm",
    "revert_batchnorm",
    "revert_sync_batchnorm",
]
