"""CLI subcommands; each module provides add_parser(subparsers).

This package also holds what every subcommand's parser shares: the help
formatter and the argument types that refuse bad values with a clear message.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["HelpFormatter", "integer", "positive_float", "positive_int"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default once: appended as "(default: X)" unless the help text
    already says it, and never for options whose default is "not given" (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def integer(text: str) -> int:
    """An argparse type: an integer (its range is the experiment's ``validate``'s to check)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number greater than 0 (seconds, rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value
