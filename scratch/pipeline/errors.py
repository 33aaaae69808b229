"""Errors a command reports as one line and exit status 1 (:func:`scratch.pipeline.cli.run`):
a problem found while running, not a bad input (those end with status 2 before any work)."""
from __future__ import annotations


class CommandError(Exception):
    """The message is the whole report: one line, no traceback."""
