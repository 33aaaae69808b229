"""One place that decides which array library the scratch code runs on.

``SCRATCH_BACKEND=numpy|cupy|auto`` (default ``auto``) selects the module returned by
:func:`get_xp`.  ``auto`` picks CuPy only when it imports *and* a GPU really computes a small
test (on machines without a driver ``import cupy`` succeeds but the first kernel raises
``CUDARuntimeError``); that answer is cached.  Asking for ``cupy`` where it cannot run is a
clear :class:`BackendError`.

The maths code never asks "which backend is selected?": it asks which library the arrays it
was given belong to (:func:`array_module`), so one function body serves NumPy and CuPy.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from array_api_compat import is_cupy_array

BACKENDS = ("numpy", "cupy", "auto")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class BackendError(RuntimeError):
    """The requested array backend cannot run here."""


@functools.cache
def cupy_usable() -> bool:
    """True when CuPy imports and a GPU computes ``sum(arange(4)**2) == 14``. Cached."""
    try:
        import cupy

        return int((cupy.arange(4) ** 2).sum()) == 14
    except Exception:  # ImportError, CUDARuntimeError, driver or compiler errors
        return False


def backend_name(name: str | None = None) -> str:
    """Resolve ``name`` (or ``$SCRATCH_BACKEND``, default ``auto``) to ``numpy`` or ``cupy``."""
    name = (name or os.environ.get("SCRATCH_BACKEND") or "auto").strip().lower()
    if name not in BACKENDS:
        raise BackendError(f"SCRATCH_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "cupy" if cupy_usable() else "numpy"
    if name == "cupy" and not cupy_usable():
        raise BackendError(
            "SCRATCH_BACKEND=cupy but CuPy cannot run here (not installed, or no working GPU); "
            "install the 'gpu' extra on a CUDA machine or use SCRATCH_BACKEND=numpy")
    return name


def get_xp(name: str | None = None):
    """The selected array module: :mod:`numpy` or :mod:`cupy`."""
    if backend_name(name) == "cupy":
        import cupy

        return cupy
    return np


def array_module(*arrays):
    """The array module the given arrays live in (CuPy if any is a CuPy array, else NumPy)."""
    for a in arrays:
        if is_cupy_array(a):
            import cupy

            return cupy
    return np


def to_numpy(x) -> np.ndarray:
    """Copy ``x`` (NumPy, CuPy, torch CPU tensor, list...) to a host NumPy array."""
    if is_cupy_array(x):
        return x.get()
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def float_dtype(dtype) -> np.dtype:
    """Normalise ``"float32"``, ``np.float64``, ... to a NumPy float dtype; reject the rest."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"not a dtype: {dtype!r}") from e
    if resolved not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {resolved}")
    return resolved


def as_float_array(x, name: str = "x", dtype=None, xp=None, finite: bool = True):
    """``x`` as a float32/float64 array of the backend's module.

    Floats keep their dtype (never silently upcast); ints and bools become float64 unless
    ``dtype`` is given. With ``finite=True`` NaN or inf is a :class:`ValueError` naming ``name``.
    """
    xp = xp or array_module(x)
    if not is_cupy_array(x) and xp is not np:
        x = to_numpy(x)
    arr = xp.asarray(x)
    if dtype is not None:
        arr = arr.astype(float_dtype(dtype), copy=False)
    elif arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got dtype {arr.dtype}")
    if finite and not bool(xp.isfinite(arr).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def state_arrays(state_dict, shapes: dict, dtype, xp) -> dict:
    """{name: array} from ``state_dict`` (torch tensors or arrays), cast to ``dtype`` on ``xp``:
    exactly the names of ``shapes`` ({name: shape}), each of its shape and finite; otherwise a
    :class:`ValueError` naming the entry."""
    missing = [k for k in shapes if k not in state_dict]
    extra = [k for k in state_dict if k not in shapes]
    if missing or extra:
        raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {extra}")
    new = {}
    for name, shape in shapes.items():
        arr = as_float_array(to_numpy(state_dict[name]), name, dtype=dtype, xp=xp)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        new[name] = arr
    return new
