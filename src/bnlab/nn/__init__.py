"""Thin modules over :mod:`bnlab.functional`: drop-in BN layers, SyncBatchNorm, converters."""

from bnlab.nn.batchnorm import (
    FUSER_METHOD_MAPPING,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormShapeError,
)
from bnlab.nn.convert import replace_batchnorm, revert_batchnorm
from bnlab.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "FUSER_METHOD_MAPPING",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormShapeError",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "replace_batchnorm",
    "revert_batchnorm",
    "revert_sync_batchnorm",
]
