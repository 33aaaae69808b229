"""Stable activations: values against torch, derivatives against torch autograd, no warnings;
on each backend (``xp``: NumPy beside torch on the CPU, CuPy beside torch on CUDA)."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scratch import functional as F
from scratch.backend import to_numpy

from .helpers import on, tensor

finite64 = st.floats(allow_nan=False, allow_infinity=False, width=64)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def any_finite_array():
    return st.one_of(arrays(np.float64, st.integers(1, 30), elements=finite64),
                     arrays(np.float32, st.integers(1, 30), elements=finite32))


@given(any_finite_array())
def test_no_overflow_warning_and_matches_torch(xp, device, x):
    xs = on(xp, x)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        s, t, e = F.sigmoid(xs), F.tanh(xs), F.elu(xs, 0.7)
        bce = F.bce_with_logits(xs, xp.ones_like(xs))
    assert s.dtype == x.dtype and e.dtype == x.dtype
    tx = tensor(x, device)
    tol = dict(rtol=1e-6, atol=1e-45) if x.dtype == np.float32 else dict(rtol=1e-14, atol=1e-300)

    def close(a, b):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), **tol)

    close(s, torch.sigmoid(tx))
    close(t, torch.tanh(tx))
    close(e, torch.nn.functional.elu(tx, 0.7))
    close(bce, torch.nn.functional.binary_cross_entropy_with_logits(
        tx, torch.ones_like(tx), reduction="none"))


def test_extreme_sigmoid_values():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        assert F.sigmoid(np.array([1000 * 1e6]))[0] == 1.0
        assert F.sigmoid(np.array([-1000 * 1e6]))[0] == 0.0
        big = np.finfo(np.float64).max
        assert F.sigmoid(np.array([big, -big])).tolist() == [1.0, 0.0]


@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 9)),
              elements=st.floats(-30, 30)), st.sampled_from([0, 1, -1]))
def test_softmax_and_its_backward_match_torch(xp, device, x, axis):
    y = F.softmax(on(xp, x), axis=axis)
    tx = tensor(x, device, requires_grad=True)
    ty = torch.softmax(tx, dim=axis)
    np.testing.assert_allclose(to_numpy(y), to_numpy(ty), rtol=1e-13, atol=1e-300)
    dy = np.cos(np.arange(x.size)).reshape(x.shape)
    ty.backward(tensor(dy, device))
    np.testing.assert_allclose(to_numpy(F.softmax_backward(y, on(xp, dy), axis)),
                               to_numpy(tx.grad), rtol=1e-10, atol=1e-14)


def test_softmax_huge_inputs_and_masked_rows():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = F.softmax(np.array([1e308, 1e308, -1e308]))
    np.testing.assert_array_equal(y, [0.5, 0.5, 0.0])
    y = F.softmax(np.array([[0.0, -np.inf, 0.0]]))
    np.testing.assert_array_equal(y, [[0.5, 0.0, 0.5]])
    with pytest.raises(ValueError, match="fully masked"):
        F.softmax(np.array([[-np.inf, -np.inf]]))


@given(arrays(np.float64, st.integers(1, 20), elements=st.floats(-50, 50)),
       st.floats(0.05, 2.0))
def test_derivatives_match_autograd(xp, device, x, alpha):
    dy = np.linspace(-1, 1, x.size)
    for fn, _grad_from, ours in [
        (torch.sigmoid, "out", lambda v, o: F.sigmoid_grad(o)),
        (torch.tanh, "out", lambda v, o: F.tanh_grad(o)),
        (lambda v: torch.nn.functional.elu(v, alpha), "in", lambda v, o: F.elu_grad(v, alpha)),
    ]:
        tx = tensor(x, device, requires_grad=True)
        out = fn(tx)
        out.backward(tensor(dy, device))
        mine = to_numpy(ours(on(xp, x), on(xp, to_numpy(out))) * on(xp, dy))
        # from-output derivatives (1 - t^2) lose relative digits near saturation: compare absolutely
        np.testing.assert_allclose(mine, to_numpy(tx.grad), rtol=1e-12, atol=1e-15)
    t = (x > 0).astype(np.float64)
    tx = tensor(x, device, requires_grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(tx, tensor(t, device),
                                                         reduction="sum").backward()
    np.testing.assert_allclose(to_numpy(F.bce_with_logits_grad(*on(xp, x, t))), to_numpy(tx.grad),
                               rtol=1e-12, atol=1e-300)
