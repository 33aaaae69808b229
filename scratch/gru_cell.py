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

Backward, given dh' = dL/dh' (B, H); a_* are the pre-activations::

    dn    = dh' * (1 - z)            da_n = dn * (1 - n^2)             (tanh' from its output)
    dz    = dh' * (h - n)            da_z = dz * z * (1 - z)           (sigmoid' from its output)
    dr    = da_n * g_n               da_r = dr * r * (1 - r)
    d[i_r, i_z, i_n] = [da_r, da_z, da_n]                 = dgi  (B, 3H)
    d[g_r, g_z, g_n] = [da_r, da_z, da_n * r]             = dgh  (B, 3H)
    dx = dgi W_ih        dW_ih = dgi^T x       db_ih = sum_B dgi
    dh = dh' * z + dgh W_hh        dW_hh = dgh^T h        db_hh = sum_B dgh

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


def gru_cell_backward(dh_new, cache: CellCache, w_ih, w_hh):
    """Vector-Jacobian product of :func:`gru_cell_forward` (module docstring).

    Returns (dx, dh, dW_ih, dW_hh, db_ih, db_hh).
    """
    xp = array_module(dh_new)
    c = cache
    da_n = dh_new * (1 - c.z) * tanh_grad(c.n)
    da_z = dh_new * (c.h - c.n) * sigmoid_grad(c.z)
    da_r = da_n * c.g_n * sigmoid_grad(c.r)
    dgi = xp.concatenate([da_r, da_z, da_n], axis=-1)
    dgh = xp.concatenate([da_r, da_z, da_n * c.r], axis=-1)
    dx = dgi @ w_ih
    dh = dh_new * c.z + dgh @ w_hh
    return dx, dh, dgi.T @ c.x, dgh.T @ c.h, dgi.sum(axis=0), dgh.sum(axis=0)
