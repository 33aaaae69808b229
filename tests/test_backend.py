import numpy as np
import pytest
import torch

from scratch import backend

from .helpers import CUPY


def test_numpy_backend_selected_explicitly(monkeypatch):
    monkeypatch.setenv("SCRATCH_BACKEND", "numpy")
    assert backend.get_xp() is np


def test_unknown_backend_is_clear_error(monkeypatch):
    monkeypatch.setenv("SCRATCH_BACKEND", "jax")
    with pytest.raises(backend.BackendError, match="SCRATCH_BACKEND must be one of"):
        backend.get_xp()


def test_cupy_requested_without_gpu_is_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "cupy_usable", lambda: False)
    monkeypatch.setenv("SCRATCH_BACKEND", "cupy")
    with pytest.raises(backend.BackendError, match="CuPy cannot run here"):
        backend.get_xp()
    monkeypatch.setenv("SCRATCH_BACKEND", "auto")
    assert backend.get_xp() is np


def test_cupy_usable_is_cached_and_false_without_working_gpu():
    backend.cupy_usable.cache_clear()
    first = backend.cupy_usable()
    assert backend.cupy_usable.cache_info().hits == 0
    assert backend.cupy_usable() == first
    assert backend.cupy_usable.cache_info().hits == 1
    try:
        import cupy
        works = int((cupy.arange(4) ** 2).sum()) == 14
    except Exception:
        works = False
    assert first == works


def test_array_module_and_to_numpy():
    a = np.arange(3.0)
    assert backend.array_module(a) is np
    t = torch.arange(3.0, requires_grad=True) * 2
    np.testing.assert_array_equal(backend.to_numpy(t), [0.0, 2.0, 4.0])


def test_as_float_array_keeps_dtype_and_rejects_bad_input():
    x32 = np.ones(3, np.float32)
    assert backend.as_float_array(x32).dtype == np.float32
    assert backend.as_float_array([1, 2]).dtype == np.float64
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        backend.as_float_array(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.as_float_array(np.ones(2, np.float16))
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        backend.float_dtype("int32")


@pytest.mark.parametrize("xp", [CUPY], indirect=True)
def test_cupy_backend_computes_same_as_numpy(xp):
    from scratch.functional import sigmoid
    x = np.linspace(-50, 50, 101)
    out = sigmoid(xp.asarray(x))
    assert backend.array_module(out) is xp and backend.get_xp("cupy") is xp
    np.testing.assert_allclose(backend.to_numpy(out), sigmoid(x), rtol=1e-15)
