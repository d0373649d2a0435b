"""Argument parsing for `tli train` and `tli study` (filled in by the training issue)."""

from __future__ import annotations

import argparse


def add_training_parsers(sub: argparse._SubParsersAction) -> None:
    """Register training subcommands; each sets `handler` to a function(args) -> exit code."""
