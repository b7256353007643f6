"""What every experiment shares: the preset names and a config from a preset.

Presets mean the same in every experiment: ``quick`` is a smoke test of minutes
whose verdicts test nothing, ``cpu`` the documented run on 2 CPU cores (the
default), ``gpu`` the run for one CUDA device. See :mod:`bnlab.lab`.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

__all__ = ["DEFAULT_PRESET", "PRESET_NAMES", "config_from"]

PRESET_NAMES = ("quick", "cpu", "gpu")
DEFAULT_PRESET = "cpu"


def config_from(module: ModuleType, preset: str = DEFAULT_PRESET, **overrides):
    """``module.Config`` for ``preset`` of ``module.PRESETS``, with ``overrides``.

    None values in ``overrides`` are ignored (an option left out takes the preset's).

    Raises:
        ValueError: an unknown preset or option.
    """
    if preset not in module.PRESETS:
        raise ValueError(f"--preset must be one of {list(module.PRESETS)}, got {preset!r}")
    names = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(k for k in overrides if k not in names)
    if unknown:
        raise ValueError(f"unknown options {unknown}; known: {sorted(names)}")
    values = {**module.PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return module.Config(**{**values, "preset": preset})
