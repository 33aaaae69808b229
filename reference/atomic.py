"""Atomic writes: the torch-free implementation lives in :mod:`scratch.atomic` (scratch cannot
import reference); re-exported here for the reference pipeline."""
from scratch.atomic import atomic_write, write_json  # noqa: F401
