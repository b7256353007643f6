"""Thin modules over :mod:`bnlab.functional`: drop-in BN layers, SyncBatchNorm, Batch
Renorm, ghost batch normalization, converters."""

from bnlab.nn.batchnorm import (
    FUSER_METHOD_MAPPING,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormShapeError,
)
from bnlab.nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from bnlab.nn.convert import (
    convert_to_batch_renorm,
    convert_to_ghost_batchnorm,
    fuse_batchnorm_act,
    replace_batchnorm,
    revert_batchnorm,
    unfuse_batchnorm_act,
)
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from bnlab.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "FUSER_METHOD_MAPPING",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormShapeError",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "convert_to_batch_renorm",
    "convert_to_ghost_batchnorm",
    "fuse_batchnorm_act",
    "replace_batchnorm",
    "revert_batchnorm",
    "revert_sync_batchnorm",
    "unfuse_batchnorm_act",
]
