"""A minimal experiment module whose arm fails, for the runner's fault tests.

``build_job`` makes ``work/<arm>.error`` a folder before raising, so the worker
cannot write its error report there, as on a full disk.
"""

import errno
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class Config:
    IDENTITY: ClassVar[tuple] = ("steps",)
    steps: int = 1


def validate(cfg):
    pass


def check_data(cfg):
    pass


def arms(cfg):
    return ["a", "b"]


def describe(cfg):
    return []


def build_job(arm, cfg, info, work):
    (work / f"{arm}.error").mkdir(parents=True, exist_ok=True)
    raise OSError(errno.ENOSPC, "No space left on device")
