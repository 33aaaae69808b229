r"""One step of torch's GRU, forward and backward side by side: the readable version.

Shapes: x (B, I), h (B, H), W_ih (3H, I), W_hh (3H, H), b_ih and b_hh (3H,).  The 3H rows of
every weight and bias are stacked **r | z | n** (reset, update, new), as in ``torch.nn.GRU``.

Forward (torch's equations; note ``b_hn`` sits *inside* the reset gate's product)::

    [i_r, i_z, i_n] = x W_ih^T + b_ih                      (B, 3H)
    [g_r, g_z, g_n] = h W_hh^T + b_hh                      (B, 3H)
    r  = sigmoid(i_r + g_r)                                (B, H)
    z  = sigmoid(i_z + g_z)
    n  = tanh(i_n + r * g_n)                               g_n = W_hn h + b_hn
    h' = (1 - z) * n + z * h                               = n + z * (h - n)

Backward, given d_h' = dL/dh' (B, H); a_* are the pre-activations::

    d_n = d_h' (1 - z)         d_a_n = d_n (1 - n^2)              (tanh' from its output)
    d_z = d_h' (h - n)         d_a_z = d_z z (1 - z)              (sigmoid' from its output)
    d_r = d_a_n g_n            d_a_r = d_r r (1 - r)
    d[i_r, i_z, i_n] = [d_a_r, d_a_z, d_a_n]                = d_gi  (B, 3H)
    d[g_r, g_z, g_n] = [d_a_r, d_a_z, d_a_n r]              = d_gh  (B, 3H)
    d_x = d_gi W_ih              d_W_ih = d_gi^T x          d_b_ih = sum_B d_gi
    d_h = d_h' z + d_gh W_hh     d_W_hh = d_gh^T h          d_b_hh = sum_B d_gh

The textbook GRU (d2l) writes ``n = tanh(W_in x + W_hn (r * h) + b)``: the reset gate multiplies
h *before* the matrix product, and its candidate mixes as ``h' = z h + (1 - z) n`` with the same
meaning of z.  torch (following cuDNN) applies r *after* the product, to ``W_hn h + b_hn``,
which is what lets all three recurrent products be one (B, H) x (H, 3H) matrix product.

:mod:`scratch.gru` runs the same maths over whole sequences, fast; this module is the
reference it is tested against, written for reading, with :mod:`scratch.functional`'s
activations.
"""
from __future__ import annotations

from dataclasses import dataclass

from .backend import array_module
from .functional import sigmoid, sigmoid_grad, tanh, tanh_grad


def split3(a):
    """(..., 3H) -> the r, z, n blocks (..., H) each (views)."""
    h = a.shape[-1] // 3
    return a[..., :h], a[..., h:2 * h], a[..., 2 * h:]


@dataclass
class CellCache:
    """What one step keeps for its backward: inputs and the gates' outputs."""
    x: object
    h: object
    r: object
    z: object
    n: object
    g_n: object          # W_hn h + b_hn, the product the reset gate scales


def gru_cell_forward(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = GRUCell(x, h) with torch's equations (module docstring). Returns (h', cache)."""
    gi = x @ w_ih.T
    gh = h @ w_hh.T
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gh = gh + b_hh
    i_r, i_z, i_n = split3(gi)
    g_r, g_z, g_n = split3(gh)
    r = sigmoid(i_r + g_r)
    z = sigmoid(i_z + g_z)
    n = tanh(i_n + r * g_n)
    h_new = (1 - z) * n + z * h
    return h_new, CellCache(x, h, r, z, n, g_n)


def gru_cell_backward(d_h_new, cache: CellCache, w_ih, w_hh):
    """Vector-Jacobian product of :func:`gru_cell_forward` (module docstring).

    Returns (d_x, d_h, d_W_ih, d_W_hh, d_b_ih, d_b_hh).
    """
    xp = array_module(d_h_new)
    c = cache
    d_a_n = d_h_new * (1 - c.z) * tanh_grad(c.n)
    d_a_z = d_h_new * (c.h - c.n) * sigmoid_grad(c.z)
    d_a_r = d_a_n * c.g_n * sigmoid_grad(c.r)
    d_gi = xp.concatenate([d_a_r, d_a_z, d_a_n], axis=-1)                        # (B, 3H)
    d_gh = xp.concatenate([d_a_r, d_a_z, d_a_n * c.r], axis=-1)                  # (B, 3H)
    d_x = d_gi @ w_ih                                                            # (B, I)
    d_h = d_h_new * c.z + d_gh @ w_hh                                            # (B, H)
    return d_x, d_h, d_gi.T @ c.x, d_gh.T @ c.h, d_gi.sum(axis=0), d_gh.sum(axis=0)
