"""bnlab: a reference implementation of Batch Normalization (Ioffe & Szegedy, 2015).

Submodules:
    functional  the Batch Normalizing Transform as pure tensor math (Algorithm 1)
    nn          drop-in replacements for torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm, converters

Algorithm 2 (training a batch-normalized network) at the top level:
    insert_batchnorm            steps 1-2: BN before every nonlinearity
    recompute_population_stats  steps 8-10: population statistics for inference
    fold_batchnorm              step 11: inference BN folded into neighbouring layers
    freeze_batchnorm / unfreeze_batchnorm

    accumulate                  gradient accumulation: one running-statistics update per
                                optimizer step, from the merged micro-batches

The top-level names are imported on first use, so ``import bnlab`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"  # the one place; pyproject.toml and CHANGELOG.md follow it

_LAZY = {
    "insert_batchnorm": "bnlab.insert",
    "recompute_population_stats": "bnlab.stats.population",
    "fold_batchnorm": "bnlab.fold",
    "freeze_batchnorm": "bnlab.freeze",
    "unfreeze_batchnorm": "bnlab.freeze",
    # The module is bnlab.accumulation, not bnlab.accumulate: importing a submodule sets
    # the package attribute of its name, which would then shadow the function.
    "accumulate": "bnlab.accumulation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
