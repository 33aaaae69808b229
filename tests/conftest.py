"""Shared test set-up: hypothesis profiles, the IMDB archive, offline hub."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ci: derandomized, fixed example count, no deadline (CI machines are slow and shared).
settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# dev: random examples, a few more of them, still no deadline (torch start-up varies).
settings.register_profile(
    "dev", max_examples=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def imdb_path() -> Path:
    """The real labelled aclImdb archive from ``IMDB_PATH``: fails (not skips) in CI if missing."""
    p = os.environ.get("IMDB_PATH")
    if not p:
        default = Path(__file__).resolve().parents[1].parent / "shared/data/imdb/aclImdb_labelled.tar.gz"
        p = str(default) if default.exists() else ""
    if not p or not Path(p).exists():
        msg = f"IMDB archive not found (IMDB_PATH={os.environ.get('IMDB_PATH')!r})"
        if IN_CI:
            pytest.fail(msg + ": CI must have it")
        pytest.skip(msg)
    return Path(p)
