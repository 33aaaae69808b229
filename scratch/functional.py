"""Numerically stable activations and their derivatives, written once for NumPy and CuPy.

Every function accepts any finite float input without an overflow warning: ``exp`` is only
ever taken of non-positive numbers.  Derivatives sit beside their functions; where it is
cheaper they take the function's *output* (``sigmoid_grad(s) = s (1 - s)``).
"""
from __future__ import annotations

import numpy as np

from .backend import array_module


def sigmoid(x):
    """sigma(x) = 1 / (1 + e^{-x}), evaluated as e^{min(x,0)} / (1 + e^{-|x|}) so that
    ``exp`` never overflows."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))                      # in (0, 1]
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def sigmoid_grad(s):
    """d sigma / dx written in terms of the output s = sigma(x): s (1 - s)."""
    return s * (1.0 - s)


def tanh(x):
    """tanh(x); the library's tanh saturates without overflow."""
    return array_module(x).tanh(x)


def tanh_grad(t):
    """d tanh / dx in terms of the output t = tanh(x): 1 - t^2."""
    return 1.0 - t * t


def softmax_parts(x, axis: int = -1, out=None):
    """``(e, z)`` with ``e = e^{x - max x}`` and ``z = sum e`` along ``axis``: softmax = e / z.

    Subtracting the max makes every exponent <= 0. ``-inf`` entries (masked) get weight 0; a
    slice that is entirely ``-inf`` has no defined softmax and raises ``ValueError``.
    ``out``: where e is written (``out=x`` works in place); default a new array.  Kept apart
    so that a caller can divide something smaller than e (attention divides ``e V``).
    """
    xp = array_module(x)
    m = xp.max(x, axis=axis, keepdims=True)
    if not bool(xp.isfinite(m).all()):
        raise ValueError("softmax over a slice with no finite entry (fully masked row?)")
    with np.errstate(over="ignore"):  # x - m <= 0; an overflow is -inf, whose exp is exactly 0
        e = xp.subtract(x, m, out=out)
        xp.exp(e, out=e)
    return e, xp.sum(e, axis=axis, keepdims=True)


def softmax(x, axis: int = -1, out=None):
    """softmax(x)_i = e^{x_i - max x} / sum_j e^{x_j - max x} along ``axis`` (see
    :func:`softmax_parts`; ``out=x`` computes in place)."""
    e, z = softmax_parts(x, axis, out)
    e /= z
    return e


def softmax_backward(y, dy, axis: int = -1):
    """Vector-Jacobian product of softmax given its output y: dx = y * (dy - <dy, y>)."""
    xp = array_module(y)
    return y * (dy - xp.sum(dy * y, axis=axis, keepdims=True))


def elu(x, alpha: float = 1.0):
    """ELU(x) = x for x > 0, alpha (e^x - 1) otherwise (``expm1`` of min(x, 0): no overflow)."""
    xp = array_module(x)
    return xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0))).astype(x.dtype, copy=False)


def elu_grad(x, alpha: float = 1.0):
    """d ELU / dx = 1 for x > 0, alpha e^x otherwise (the input x, not the output)."""
    xp = array_module(x)
    return xp.where(x > 0, 1.0, alpha * xp.exp(xp.minimum(x, 0))).astype(x.dtype, copy=False)


def bce_with_logits(z, t):
    """Binary cross-entropy on logits, per element: max(z, 0) - z t + log(1 + e^{-|z|})."""
    xp = array_module(z)
    return xp.maximum(z, 0) - z * t + xp.log1p(xp.exp(-xp.abs(z)))


def bce_with_logits_grad(z, t):
    """d BCE / dz = sigma(z) - t."""
    return sigmoid(z) - t
