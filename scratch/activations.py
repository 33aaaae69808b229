"""The feed-forward activations a transformers ``config.json`` names (``hidden_act``), forward
only (the encoder is frozen), for NumPy and CuPy arrays.  Each equals transformers' ``ACT2FN``
entry of the same name (tests/test_bert.py checks them all in float64).

"gelu" is the exact ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2``: SciPy's / cupyx's erf, except
NumPy float32, where SciPy's erf is a slow scalar loop: :func:`gelu_float32` evaluates Phi
through a fitted ``tanh`` form (written as a sigmoid, one ``exp``) with every step a vectorised
in-place pass.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special

from .backend import array_module
from .functional import sigmoid


def _erf(x, out=None):
    """erf(x) from SciPy (NumPy arrays) or cupyx (CuPy arrays)."""
    if array_module(x) is np:
        return special.erf(x, out=out)
    from cupyx.scipy.special import erf

    return erf(x, out=out)


def gelu_exact(x):
    """GELU(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 with the library's erf (SciPy, cupyx):
    the exact form, transformers' "gelu".  Written in place into one new array."""
    g = x * (1.0 / math.sqrt(2.0))          # x / sqrt 2
    _erf(g, out=g)                          # erf(x / sqrt 2)
    g += 1.0
    g *= 0.5                                # Phi(x)
    g *= x
    return g


# Phi(x) = (1 + tanh(x P(x^2))) / 2 on |x| <= 4 sqrt 2 (beyond, Phi is 0 or 1 to float32
# precision: Phi(-4 sqrt 2) = 7.6e-9), P of degree 6 with the coefficients below (constant term
# first), fitted here to artanh(2 Phi(x) - 1) / x by least squares reweighted towards the
# smallest largest |Phi error| (Lawson's iteration) in float64.  Evaluated as the sigmoid
# (1 + tanh y) / 2 = 1 / (1 + e^{-2y}) (NumPy's float32 exp costs 2/3 of its tanh), in float32
# arithmetic the GELU error is at most 1.5e-7 max(1, |x|) on a dense grid (tests/test_bert.py
# checks 2e-7).
_PHI_TANH = (0.797884942208162, 0.036333082845684365, -3.2593713047865556e-05,
             -5.5306604302457245e-05, 3.9648145110741505e-06, -1.3226953204494304e-07,
             1.756380213586867e-09)
_PHI_CLIP = 4.0 * math.sqrt(2.0)
_MINUS_2_PHI_TANH = tuple(-2.0 * c for c in _PHI_TANH)      # -2 P(x^2): the sigmoid's exponent


def gelu_float32(x):
    """GELU in float32 without erf: x Phi(x) with Phi from the tanh fit above, as a sigmoid::

        y = x P(x^2)                                  x clipped to |x| <= 4 sqrt 2
        GELU(x) = x (1 + tanh y) / 2 = x / (1 + e^{-2y})

    every step an in-place vectorised pass (SciPy's float32 erf is a scalar loop, ~30x torch's
    GELU).  |error| <= 2e-7 max(1, |x|) against the exact GELU (tested); exactly 0 below
    -4 sqrt 2, exactly x above 6."""
    xp = array_module(x)
    scalar = x.dtype.type                                   # constants in x's precision
    z = xp.clip(x, scalar(-_PHI_CLIP), scalar(_PHI_CLIP))   # (..., I)
    u = z * z                                               # x^2
    p = u * scalar(_MINUS_2_PHI_TANH[-1])
    p += scalar(_MINUS_2_PHI_TANH[-2])
    for c in _MINUS_2_PHI_TANH[-3::-1]:                     # Horner: p = -2 P(x^2)
        p *= u
        p += scalar(c)
    p *= z                                                  # -2y
    xp.exp(p, out=p)                                        # e^{-2y} (< e^{20}: finite)
    p += scalar(1.0)
    xp.divide(x, p, out=p)                                  # x / (1 + e^{-2y}) = x Phi(x)
    p[x < scalar(-_PHI_CLIP)] = 0                               # Phi < 7.6e-9 there: 0
    return p


def gelu(x):
    """GELU(x) = x Phi(x), the exact form: the library's erf, except NumPy float32 (SciPy's
    float32 erf is slow), which takes :func:`gelu_float32`.  CuPy always uses cupyx's erf."""
    if array_module(x) is np and x.dtype == np.float32:
        return gelu_float32(x)
    return gelu_exact(x)


def gelu_tanh(x):
    """The tanh approximation ("gelu_new", "gelu_pytorch_tanh"):
    x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2."""
    xp = array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_fast(x):
    """transformers' "gelu_fast": x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2))) / 2."""
    xp = array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _relu(x):
    return array_module(x).maximum(x, 0)


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": lambda x: x * sigmoid(1.702 * x),
    "relu": _relu,
    "silu": lambda x: x * sigmoid(x),
    "swish": lambda x: x * sigmoid(x),
    "sigmoid": sigmoid,
    "tanh": lambda x: array_module(x).tanh(x),
    "linear": lambda x: x,
}
