"""Shared test set-up: hypothesis profiles, the IMDB archive, offline hub, and the array backend
(``xp``: NumPy, and CuPy with torch on CUDA where a GPU computes)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl
import torch
from hypothesis import HealthCheck, Phase, settings

from tests.helpers import BACKENDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per library in each pytest-xdist worker: `make test` starts a worker per core, and
# each worker's BLAS, OpenMP and torch would start a thread per core too (2 workers x 2 threads
# on 2 cores: test_bert, test_compare, test_gru and test_sentiment took 13-18% longer).  Tests
# about threads set their own counts; the commands the tests start inherit the environment; an
# OMP_NUM_THREADS of the caller's wins.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
    for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_THREADS))
    threadpoolctl.threadpool_limits(_THREADS)
    torch.set_num_threads(_THREADS)
# the autocast chooser's verdicts (reference.pipeline.autocast) go to a file of this session's,
# never the user's, here and in the commands the tests start (set before the test modules copy
# os.environ)
_AUTOCAST = Path(tempfile.mkdtemp(prefix="gru-attention-autocast-"))
atexit.register(shutil.rmtree, _AUTOCAST, ignore_errors=True)
os.environ["GRU_ATTENTION_AUTOCAST_CACHE"] = str(_AUTOCAST / "autocast.json")

# ci: derandomized, fixed example count, no deadline (CI machines are slow and shared).
settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# dev: random examples, a few more of them, still no deadline (torch start-up varies).
settings.register_profile(
    "dev", max_examples=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# gpu: bench/gpu_check.sh's run of the CuPy tests: derandomized like ci, fewer examples and no
# shrinking (the GPU's time is short; a failure is reported with the example that found it).
settings.register_profile(
    "gpu", derandomize=True, max_examples=20, deadline=None, print_blob=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") else "dev"))

IN_CI = bool(os.environ.get("CI"))


def pytest_collection_modifyitems(config, items):
    """Tests in an ``xdist_group`` first: a group is one long chain on one worker (the IMDB
    end-to-end module: 4 tests, 270 s, behind a module fixture), so under `make test`'s
    ``--dist loadgroup`` it starts at once while the other workers share everything else
    (measured on 2 cores: the two workers' test time 366 and 365 s), instead of starting
    halfway and running alone at the end, or on two workers at once under plain ``--dist
    load``, each training the fixture's model."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


@pytest.fixture(scope="session")
def imdb_path() -> Path:
    """The real labelled aclImdb archive from ``IMDB_PATH``: fails (not skips) in CI if missing."""
    p = os.environ.get("IMDB_PATH")
    if not p:
        shared = Path(__file__).resolve().parents[1].parent / "shared"
        default = shared / "data/imdb/aclImdb_labelled.tar.gz"
        p = str(default) if default.exists() else ""
    if not p or not Path(p).exists():
        msg = f"IMDB archive not found (IMDB_PATH={os.environ.get('IMDB_PATH')!r})"
        if IN_CI:
            pytest.fail(msg + ": CI must have it")
        pytest.skip(msg)
    return Path(p)


@pytest.fixture(scope="session", params=BACKENDS)
def xp(request):
    """The array module scratch runs on: numpy, or cupy (then the torch side runs on CUDA, see
    ``device``).  Tests build their data in NumPy, hand scratch ``xp.asarray(...)`` and compare
    through ``scratch.backend.to_numpy``."""
    if request.param == "numpy":
        return np
    import cupy
    import torch

    # torch's float32 on CUDA may use TF32 tensor cores (cuDNN's RNNs and convolutions do by
    # default): 10-bit mantissas, far outside the float32 tolerances.  CuPy never does unless
    # CUPY_TF32=1.  Both sides in true float32, as on the CPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return cupy


@pytest.fixture(scope="session")
def device(xp) -> str:
    """Where the torch reference runs: "cuda" beside CuPy, "cpu" beside NumPy."""
    return "cpu" if xp is np else "cuda"
