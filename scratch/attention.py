r"""Attention three ways, forward and backward, in NumPy (CuPy unchanged).

Shapes: ``q: (..., n, d_k)``, ``k: (..., m, d_k)``, ``v: (..., m, d_v)`` -> ``(..., n, d_v)``.
The leading axes ``...`` (batch, heads; zero or more) must be the same for q, k and v.
Every ``*_backward`` takes ``d_out = dL/d(out)`` of the output's shape and returns
``(d_q, d_k, d_v)``; it recomputes what it needs from (q, k, v), so there is no hidden state.

1. Softmax attention (Vaswani et al.)::

       out = softmax(Q K^T / sqrt(d_k)) V                          time O(n m d), memory O(n m)

2. Efficient Attention (Shen et al. 2018, arXiv 1812.01243)::

       out = rho_q(Q) (rho_k(K)^T V)                               time O((n + m) d_k d_v)

   ``rho_q`` = softmax over each query's features (last axis of Q), ``rho_k`` = softmax over
   positions (axis -2 of K).  Matrix products are associative, so ``(rho_q rho_k^T) V`` (an
   n x m matrix, what :func:`efficient_attention_naive` computes) equals ``rho_q (rho_k^T V)``
   (a d_k x d_v matrix, what :func:`efficient_attention` computes).  ``normalization="scaling"``
   is the paper's other choice, ``rho_q(Q) = Q / sqrt(m)``, ``rho_k(K) = K / sqrt(m)``, which
   makes the output exactly ``(Q K^T) V / m``: dot-product attention without softmax.

3. Linear attention (Katharopoulos et al. 2020, arXiv 2006.16236), ``phi(x) = elu(x) + 1``::

       out_i = phi(Q_i)^T S / (phi(Q_i)^T Z + eps),   S = sum_j phi(K_j) V_j^T,  Z = sum_j phi(K_j)

   Causal (``causal=True``): the sums run over ``j <= i`` only (prefix sums ``S_i``, ``Z_i``),
   and :class:`LinearAttentionState` is the same thing as an RNN, one token per ``step``.
   ``eps=0`` gives the paper's exact formula.

Masks.  Convention everywhere: **True = keep** (this key takes part), like the boolean
``attn_mask`` of ``torch.nn.functional.scaled_dot_product_attention``.

* softmax: ``mask`` broadcastable to ``(..., n, m)``; a key-padding mask ``key_mask`` of shape
  ``(..., m)`` is ``mask=key_mask[..., None, :]``.  A query row with no kept key has no defined
  softmax: that is a ``ValueError`` (never NaN).
* efficient and linear: only key padding makes sense (they never form the n x m matrix), so
  they take ``key_mask`` broadcastable to ``(..., m)``.  A padded key contributes nothing:
  efficient attention gives it -inf before the softmax over positions (weight exactly 0; no
  kept key at all is a ``ValueError``); linear attention zeroes its features ``phi(K_j)``, so
  it adds nothing to S or Z (a row with no kept key gets output 0 when ``eps > 0``, and is a
  ``ValueError`` when ``eps == 0``).
* :func:`key_mask_from_lengths` turns lengths ``(...,)`` into a key mask ``(..., m)``.
* ``causal=True`` needs ``n == m``; query i sees keys ``j <= i``.

Causal linear attention without an n x n matrix.  The forward and backward of the causal sums
are computed **in chunks** of ``chunk_size`` positions (vectorised over all chunks at once):
within a chunk a small ``C x C`` lower-triangular matrix, across chunks the prefix sums of the
per-chunk states ``phi(K_c)^T V_c``.  Memory ``O(n C + (n / C) d_k d_v)`` (``O(n)`` in n),
time ``O(n C d + n d_k d_v)``.  ``chunk_size=1`` *is* the textbook per-position prefix sum
(``S_i`` for every i: memory ``O(n d_k d_v)``); the backward is the paper's section 3.3.1
gradient (reverse cumulative sums), written for chunks.  :func:`linear_attention_naive` is the
explicit masked ``O(n^2)`` formula, kept beside it for the tests.

Precision note: ``phi(x) = elu(x) + 1`` is formed as written (``expm1(x) + 1`` for x <= 0),
so for very negative x it underflows to 0 (below about -37 in float64, -17 in float32) instead
of ``e^x``; torch's ``F.elu(x) + 1`` does exactly the same.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import array_module, as_float_array, float_dtype
from .functional import elu, elu_grad, softmax, softmax_backward, softmax_parts

__all__ = [
    "softmax_attention", "softmax_attention_backward",
    "efficient_attention", "efficient_attention_naive", "efficient_attention_backward",
    "linear_attention", "linear_attention_naive", "linear_attention_backward",
    "LinearAttentionState", "feature_map", "key_mask_from_lengths",
]


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _qkv(q, k, v, d_out=None, causal=False):
    """Validate and return (q, k, v[, d_out]) as float arrays of one dtype."""
    q, k, v = as_float_array(q, "q"), as_float_array(k, "k"), as_float_array(v, "v")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., positions, features), "
                             f"got shape {tuple(a.shape)}")
        if a.shape[-2] == 0 or a.shape[-1] == 0:
            raise ValueError(f"{name} needs at least one position and one feature, "
                             f"got shape {tuple(a.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same d_k, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k (..., m, d_k) and v (..., m, d_v) must agree on (..., m), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q, k, v must have the same leading (batch/head) axes, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs as many queries as keys (n == m), "
                         f"got n={q.shape[-2]}, m={k.shape[-2]}")
    if d_out is None:
        return q, k, v
    d_out = as_float_array(d_out, "d_out")
    expected = q.shape[:-1] + v.shape[-1:]
    if tuple(d_out.shape) != expected:
        raise ValueError(f"d_out must have the output's shape {expected}, "
                         f"got {tuple(d_out.shape)}")
    return q, k, v, d_out.astype(q.dtype, copy=False)


def _bool_mask(mask, shape, name, xp):
    """``mask`` as a boolean array broadcast to ``shape`` (a ValueError naming the problem)."""
    if mask is None:
        return None
    mask = xp.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"{name} must be boolean (True = keep), got dtype {mask.dtype}")
    try:
        return xp.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to "
                         f"{tuple(shape)}") from None


def _key_mask(key_mask, k, xp):
    return _bool_mask(key_mask, k.shape[:-1], "key_mask (..., m)", xp)


def key_mask_from_lengths(lengths, m: int, xp=np):
    """Key-padding mask from lengths: ``mask[..., j] = j < lengths[...]``, shape ``(..., m)``."""
    lengths = xp.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if bool(((lengths < 0) | (lengths > m)).any()):
        raise ValueError(f"lengths must lie in [0, {m}]")
    return xp.arange(m) < lengths[..., None]


def _causal_mask(n, xp):
    """(n, n) boolean lower triangle: query i keeps key j iff j <= i."""
    return xp.tril(xp.ones((n, n), dtype=bool))


def _t(x):
    """Transpose of the last two axes: ``x^T`` for a stack of matrices."""
    return x.swapaxes(-1, -2)


# ---------------------------------------------------------------------------------------------
# 1. softmax attention
# ---------------------------------------------------------------------------------------------

def _minus_inf_where_masked(keep, dtype, xp):
    """The additive form of a boolean mask: 0 where kept, -inf where masked (keep's shape).
    ``s + 0 = s`` exactly and ``s + (-inf) = -inf``: the same as ``where(keep, s, -inf)``."""
    return xp.where(keep, 0.0, -xp.inf).astype(dtype, copy=False)


def _softmax_parts(q, k, mask, causal):
    """(E, z): E = exp(S - rowmax S), z = rowsum E, S = Q K^T / sqrt(d_k) with masked entries
    -inf (weight 0); E (..., n, m), z (..., n, 1).  P = E / z.

    Everything happens in place in the one (..., n, m) array the product makes (the big one):
    the scale is applied to Q before the product, the mask enters as an additive 0 / -inf term
    of the mask's own (broadcast) shape, then exp."""
    xp = array_module(q)
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ _t(k)        # (..., n, m)
    if _bool_mask(mask, scores.shape, "mask (..., n, m)", xp) is not None:
        scores += _minus_inf_where_masked(xp.asarray(mask), scores.dtype, xp)
    if causal:
        scores += _minus_inf_where_masked(_causal_mask(q.shape[-2], xp), scores.dtype, xp)
    try:
        return softmax_parts(scores, axis=-1, out=scores)
    except ValueError:
        raise ValueError("softmax attention: a query row has no unmasked key "
                         "(fully masked row); its output is undefined") from None


def _softmax_weights(q, k, mask, causal):
    """P = softmax(Q K^T / sqrt(d_k)) with masked entries -inf -> weight 0; (..., n, m)."""
    e, z = _softmax_parts(q, k, mask, causal)
    e /= z
    return e


def softmax_attention(q, k, v, mask=None, causal=False):
    """out = softmax(Q K^T / sqrt(d_k)) V.  ``mask``: bool, broadcastable to (..., n, m),
    True = attend.  ``causal``: query i attends to keys j <= i (needs n == m).

    Computed as ``(E V) / z`` (:func:`_softmax_parts`): the division by the row sums falls on
    the (..., n, d_v) output instead of the (..., n, m) weights."""
    q, k, v = _qkv(q, k, v, causal=causal)
    e, z = _softmax_parts(q, k, mask, causal)
    out = e @ v                                                  # (..., n, d_v)
    out /= z
    return out


def softmax_attention_backward(q, k, v, d_out, mask=None, causal=False):
    """(d_q, d_k, d_v) of :func:`softmax_attention`.  With s = 1/sqrt(d_k), P = softmax(s Q K^T):

        d_V = P^T d_out,   d_P = d_out V^T,   d_A = P * (d_P - rowsum(d_P * P))   (softmax VJP)
        d_Q = s d_A K,     d_K = s d_A^T Q
    """
    q, k, v, d_out = _qkv(q, k, v, d_out, causal=causal)
    s = 1.0 / math.sqrt(q.shape[-1])
    p = _softmax_weights(q, k, mask, causal)
    d_a = softmax_backward(p, d_out @ _t(v), axis=-1)
    return (d_a @ k) * s, (_t(d_a) @ q) * s, _t(p) @ d_out


# ---------------------------------------------------------------------------------------------
# 2. Efficient Attention (Shen et al.)
# ---------------------------------------------------------------------------------------------

NORMALIZATIONS = ("softmax", "scaling")


def _efficient_rho(q, k, key_mask, normalization):
    """(rho_q(Q), rho_k(K)), padded keys contributing nothing, and the scale for "scaling"."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    xp = array_module(q)
    keep = _key_mask(key_mask, k, xp)
    if normalization == "softmax":
        if keep is not None:
            k = xp.where(keep[..., None], k, -xp.inf)
        try:
            return softmax(q, axis=-1), softmax(k, axis=-2), None
        except ValueError:
            raise ValueError("efficient attention: every key is masked out") from None
    # scaling: rho(Y) = Y / sqrt(m), m = number of kept keys (so padding changes nothing)
    if keep is None:
        m = xp.full(k.shape[:-2] + (1, 1), float(k.shape[-2]), dtype=q.dtype)
    else:
        m = keep.sum(axis=-1)[..., None, None].astype(q.dtype)
        if bool((m == 0).any()):
            raise ValueError("efficient attention: every key is masked out")
        k = k * keep[..., None]
    scale = 1.0 / xp.sqrt(m)
    return q * scale, k * scale, scale


def efficient_attention(q, k, v, key_mask=None, normalization="softmax"):
    """out = rho_q(Q) (rho_k(K)^T V): the d_k x d_v context ``rho_k(K)^T V`` first, so the cost
    is O((n + m) d_k d_v) and no n x m matrix exists.  ``key_mask`` (..., m): True = keep."""
    q, k, v = _qkv(q, k, v)
    rho_q, rho_k, _ = _efficient_rho(q, k, key_mask, normalization)
    return rho_q @ (_t(rho_k) @ v)


def efficient_attention_naive(q, k, v, key_mask=None, normalization="softmax"):
    """The same product bracketed the other way, (rho_q(Q) rho_k(K)^T) V: an n x m matrix,
    O(n m d).  Only for tests and teaching, and written out on its own (it shares no maths
    helper with :func:`efficient_attention`, so comparing the two tests both)::

        softmax:  rho_q(Q)_id = e^{Q_id} / sum_d' e^{Q_id'}        (over each query's features)
                  rho_k(K)_jd = e^{K_jd} / sum_{kept j'} e^{K_j'd}  (over the kept positions)
        scaling:  rho_q(Q) rho_k(K)^T = Q K^T / m,  m = number of kept keys, padded keys 0
    """
    q, k, v = _qkv(q, k, v)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    xp = array_module(q)
    keep = _key_mask(key_mask, k, xp)
    keep = xp.ones(k.shape[:-1], dtype=bool) if keep is None else keep
    n_kept = keep.sum(axis=-1)[..., None, None]                       # (..., 1, 1)
    if bool((n_kept == 0).any()):
        raise ValueError("efficient attention: every key is masked out")
    if normalization == "scaling":
        weights = xp.where(keep[..., None, :], q @ _t(k), 0) / n_kept.astype(q.dtype)
        return weights @ v
    e_q = xp.exp(q - q.max(axis=-1, keepdims=True))                   # exponents <= 0
    rho_q = e_q / e_q.sum(axis=-1, keepdims=True)
    k_max = xp.where(keep[..., None], k, -xp.inf).max(axis=-2, keepdims=True)
    e_k = xp.where(keep[..., None], xp.exp(xp.where(keep[..., None], k - k_max, 0)), 0)
    rho_k = e_k / e_k.sum(axis=-2, keepdims=True)
    return (rho_q @ _t(rho_k)) @ v


def efficient_attention_backward(q, k, v, d_out, key_mask=None, normalization="softmax"):
    """(d_q, d_k, d_v) of :func:`efficient_attention`.  With C = rho_k^T V (d_k x d_v):

        d_C = rho_q^T d_out,   d_rho_q = d_out C^T,   d_rho_k = V d_C^T,   d_V = rho_k d_C
        softmax:  d_Q = softmax VJP over the feature axis,  d_K = softmax VJP over positions
        scaling:  d_Q = d_rho_q / sqrt(m),                  d_K = mask * d_rho_k / sqrt(m)
    """
    q, k, v, d_out = _qkv(q, k, v, d_out)
    rho_q, rho_k, scale = _efficient_rho(q, k, key_mask, normalization)
    c = _t(rho_k) @ v
    d_c = _t(rho_q) @ d_out
    d_rho_q, d_rho_k, d_v = d_out @ _t(c), v @ _t(d_c), rho_k @ d_c
    if normalization == "softmax":        # padded keys have rho_k = 0, so their d_k is 0
        return softmax_backward(rho_q, d_rho_q, -1), softmax_backward(rho_k, d_rho_k, -2), d_v
    keep = _key_mask(key_mask, k, array_module(q))
    d_k = d_rho_k * scale if keep is None else d_rho_k * scale * keep[..., None]
    return d_rho_q * scale, d_k, d_v


# ---------------------------------------------------------------------------------------------
# 3. linear attention (Katharopoulos et al.)
# ---------------------------------------------------------------------------------------------

def feature_map(x, alpha: float = 1.0):
    """phi(x) = elu(x, alpha) + 1 > 0 for 0 < alpha <= 1 (the paper: alpha = 1)."""
    return elu(x, alpha) + 1.0


def _check_linear_args(eps, alpha):
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if not (0 < alpha <= 1):
        raise ValueError(f"alpha must be in (0, 1] so that phi = elu + 1 stays positive, "
                         f"got {alpha}")


def _linear_features(q, k, v, key_mask, alpha):
    """phi(Q), phi(K) with padded keys zeroed, and W = [V | 1] (..., m, d_v + 1).

    Appending a column of ones to V makes one product give numerator and denominator at once:
    phi(Q_i)^T sum_j phi(K_j) [V_j | 1]^T = [phi(Q_i)^T S | phi(Q_i)^T Z].
    """
    xp = array_module(q)
    f_q, f_k = feature_map(q, alpha), feature_map(k, alpha)
    keep = _key_mask(key_mask, k, xp)
    if keep is not None:
        f_k = f_k * keep[..., None]
    w = xp.concatenate([v, xp.ones(v.shape[:-1] + (1,), dtype=v.dtype)], axis=-1)
    return f_q, f_k, w, keep


ZERO_DENOMINATOR = ("linear attention: a query has no unmasked key (denominator 0, or every "
                    "phi(q_i) . phi(k_j) underflowed to 0: phi(x) = elu(x) + 1 is 0 below about "
                    "-17 in float32, -37 in float64); use eps > 0 to get output 0 there")


def _normalise(num_den, eps):
    """[N | D] -> out = N / (D + eps); ValueError for a zero denominator when eps == 0."""
    num, den = num_den[..., :-1], num_den[..., -1:] + eps
    if eps == 0 and bool((den == 0).any()):
        raise ValueError(ZERO_DENOMINATOR)
    return num / den, den


def _normalise_backward(out, den, d_out):
    """d[N | D] from d_out, for out = N / D':  dN = d_out / D',  dD = -<d_out, out> / D'."""
    xp = array_module(out)
    return xp.concatenate([d_out / den, -(d_out * out).sum(-1, keepdims=True) / den], axis=-1)


def _chunks(x, c):
    """(..., n, d) -> (..., ceil(n / c), c, d), zero-padded at the end."""
    xp = array_module(x)
    pad = -x.shape[-2] % c
    if pad:
        x = xp.concatenate([x, xp.zeros(x.shape[:-2] + (pad, x.shape[-1]), dtype=x.dtype)], -2)
    return x.reshape(x.shape[:-2] + (-1, c, x.shape[-1]))


def _unchunk(x, n):
    """Inverse of :func:`_chunks`: (..., n_c, c, d) -> (..., n, d)."""
    return x.reshape(x.shape[:-3] + (-1, x.shape[-1]))[..., :n, :]


def _exclusive_cumsum(x, reverse=False):
    """Sum over the chunks strictly before each chunk (axis -3); ``reverse``: strictly after."""
    xp = array_module(x)
    if reverse:
        return _exclusive_cumsum(x[..., ::-1, :, :])[..., ::-1, :, :]
    total = xp.cumsum(x, axis=-3)
    return xp.concatenate([xp.zeros_like(x[..., :1, :, :]), total[..., :-1, :, :]], axis=-3)


def _kernel_sums(f_q, f_k, w, causal, chunk_size):
    """N_i = f_q_i^T sum_j f_k_j w_j^T  (j over all keys, or j <= i if causal): (..., n, d_w).

    Non-causal: f_q (f_k^T w), the associativity trick.  Causal, in chunks c of C positions:

        N_c = f_q_c H_c + tril(f_q_c f_k_c^T) w_c,    H_c = sum_{c' < c} f_k_c'^T w_c'
    """
    if not causal:
        return f_q @ (_t(f_k) @ w)
    xp, n = array_module(f_q), f_q.shape[-2]
    fq, fk, wc = _chunks(f_q, chunk_size), _chunks(f_k, chunk_size), _chunks(w, chunk_size)
    h = _exclusive_cumsum(_t(fk) @ wc)                       # (..., n_c, d_k, d_w)
    a = xp.where(_causal_mask(chunk_size, xp), fq @ _t(fk), 0)  # (..., n_c, C, C)
    return _unchunk(fq @ h + a @ wc, n)


def _kernel_sums_backward(f_q, f_k, w, d_n, causal, chunk_size):
    """(d f_q, d f_k, d w) of :func:`_kernel_sums` given d_n = dL/dN.

    Non-causal, with H = f_k^T w:  d f_q = d_n H^T,  d_H = f_q^T d_n,  d f_k = w d_H^T,
    d w = f_k d_H.  Causal (section 3.3.1 of the paper, by chunks): the state H_c feeds every
    *later* chunk, so its gradient is the reverse cumulative sum G_c = sum_{c' > c} f_q_c'^T d_n_c';
    inside a chunk the lower triangle A = tril(f_q f_k^T) has d_A = tril(d_n w^T):

        d f_q_c = d_n_c H_c^T + d_A_c f_k_c
        d f_k_c = w_c G_c^T   + d_A_c^T f_q_c
        d w_c   = f_k_c G_c   + A_c^T d_n_c
    """
    if not causal:
        h = _t(f_k) @ w
        d_h = _t(f_q) @ d_n
        return d_n @ _t(h), w @ _t(d_h), f_k @ d_h
    xp, n = array_module(f_q), f_q.shape[-2]
    fq, fk, wc, dn = (_chunks(x, chunk_size) for x in (f_q, f_k, w, d_n))
    tri = _causal_mask(chunk_size, xp)
    h = _exclusive_cumsum(_t(fk) @ wc)
    g = _exclusive_cumsum(_t(fq) @ dn, reverse=True)
    a = xp.where(tri, fq @ _t(fk), 0)
    d_a = xp.where(tri, dn @ _t(wc), 0)
    d_fq = dn @ _t(h) + d_a @ fk
    d_fk = wc @ _t(g) + _t(d_a) @ fq
    d_w = fk @ g + _t(a) @ dn
    return _unchunk(d_fq, n), _unchunk(d_fk, n), _unchunk(d_w, n)


def _check_chunk_size(chunk_size):
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def linear_attention(q, k, v, causal=False, eps=1e-6, alpha=1.0, key_mask=None, chunk_size=64):
    """out_i = phi(Q_i)^T S / (phi(Q_i)^T Z + eps) with phi = elu(., alpha) + 1.

    Non-causal: S = sum_j phi(K_j) V_j^T, Z = sum_j phi(K_j), computed once: O((n + m) d_k d_v).
    Causal: S_i, Z_i sum over j <= i, computed in chunks (see the module docstring): O(n)
    time and memory, never an n x n matrix.  ``key_mask`` (..., m): True = keep.
    """
    q, k, v = _qkv(q, k, v, causal=causal)
    _check_linear_args(eps, alpha)
    f_q, f_k, w, _ = _linear_features(q, k, v, key_mask, alpha)
    out, _ = _normalise(_kernel_sums(f_q, f_k, w, causal, _check_chunk_size(chunk_size)), eps)
    return out


def linear_attention_naive(q, k, v, causal=False, eps=1e-6, alpha=1.0, key_mask=None):
    """The explicit O(n m) formula, for tests and teaching, written out on its own (it shares
    no maths helper with :func:`linear_attention`, so comparing the two tests both)::

        out_i = sum_j A_ij V_j / (sum_j A_ij + eps),   A_ij = phi(Q_i) . phi(K_j)  (0 if j > i
        when causal, 0 for a padded key),   phi(x) = x + 1 (x > 0), alpha (e^x - 1) + 1 (x <= 0)
    """
    q, k, v = _qkv(q, k, v, causal=causal)
    _check_linear_args(eps, alpha)
    xp = array_module(q)
    keep = _key_mask(key_mask, k, xp)

    def phi(x):
        return xp.where(x > 0, x + 1, alpha * xp.expm1(xp.minimum(x, 0)) + 1).astype(x.dtype)

    a = phi(q) @ _t(phi(k))                                        # (..., n, m)
    if causal:
        a = xp.where(_causal_mask(q.shape[-2], xp), a, 0)
    if keep is not None:
        a = xp.where(keep[..., None, :], a, 0)
    den = a.sum(axis=-1, keepdims=True) + eps
    if eps == 0 and bool((den == 0).any()):
        raise ValueError(ZERO_DENOMINATOR)
    return (a @ v) / den


def linear_attention_backward(q, k, v, d_out, causal=False, eps=1e-6, alpha=1.0,
                              key_mask=None, chunk_size=64):
    """(d_q, d_k, d_v) of :func:`linear_attention`: the normalisation's VJP, then that of the
    kernel sums (:func:`_kernel_sums_backward`), then phi' = elu'.  Causal: O(n) memory."""
    q, k, v, d_out = _qkv(q, k, v, d_out, causal=causal)
    _check_linear_args(eps, alpha)
    chunk_size = _check_chunk_size(chunk_size)
    f_q, f_k, w, keep = _linear_features(q, k, v, key_mask, alpha)
    out, den = _normalise(_kernel_sums(f_q, f_k, w, causal, chunk_size), eps)
    d_n = _normalise_backward(out, den, d_out)
    d_fq, d_fk, d_w = _kernel_sums_backward(f_q, f_k, w, d_n, causal, chunk_size)
    d_k = d_fk * elu_grad(k, alpha)
    if keep is not None:
        d_k = d_k * keep[..., None]
    return d_fq * elu_grad(q, alpha), d_k, d_w[..., :-1]


class LinearAttentionState:
    """Causal linear attention as an RNN, for autoregressive decoding (constant cost per token).

        S_t = S_{t-1} + phi(k_t) v_t^T,   Z_t = Z_{t-1} + phi(k_t),
        out_t = phi(q_t)^T S_t / (phi(q_t)^T Z_t + eps)

    ``S``: (*batch_shape, d_k, d_v), ``Z``: (*batch_shape, d_k), both zero at the start.
    ``step`` takes q_t, k_t: (*batch_shape, d_k), v_t: (*batch_shape, d_v) (cast to the state's
    dtype) and returns out_t: (*batch_shape, d_v).  ``key_mask_t`` (bool, broadcastable to
    batch_shape; True = keep): a padded key adds nothing to S or Z, its query still gets an
    output.  Stepping through a sequence gives exactly
    ``linear_attention(q, k, v, causal=True, key_mask=...)`` up to rounding.
    """

    def __init__(self, d_k: int, d_v: int, batch_shape=(), dtype="float32", eps: float = 1e-6,
                 alpha: float = 1.0, xp=np):
        if int(d_k) < 1 or int(d_v) < 1:
            raise ValueError(f"d_k and d_v must be >= 1, got {d_k}, {d_v}")
        _check_linear_args(eps, alpha)
        self.d_k, self.d_v, self.batch_shape = int(d_k), int(d_v), tuple(batch_shape)
        self.dtype, self.eps, self.alpha, self.xp = float_dtype(dtype), eps, alpha, xp
        self.reset()

    def reset(self):
        """Back to the empty prefix: S = 0, Z = 0, t = 0."""
        self.S = self.xp.zeros(self.batch_shape + (self.d_k, self.d_v), dtype=self.dtype)
        self.Z = self.xp.zeros(self.batch_shape + (self.d_k,), dtype=self.dtype)
        self.t = 0

    def _arg(self, x, name, d):
        x = as_float_array(x, name, dtype=self.dtype, xp=self.xp)
        if tuple(x.shape) != self.batch_shape + (d,):
            raise ValueError(f"{name} must have shape {self.batch_shape + (d,)}, "
                             f"got {tuple(x.shape)}")
        return x

    def step(self, q_t, k_t, v_t, key_mask_t=None):
        """Add token t's key/value to the state (unless masked) and return its output
        (*batch_shape, d_v)."""
        q_t, k_t = self._arg(q_t, "q_t", self.d_k), self._arg(k_t, "k_t", self.d_k)
        v_t = self._arg(v_t, "v_t", self.d_v)
        f_k, f_q = feature_map(k_t, self.alpha), feature_map(q_t, self.alpha)
        keep = _bool_mask(key_mask_t, self.batch_shape, "key_mask_t (*batch_shape,)", self.xp)
        if keep is not None:
            f_k = f_k * keep[..., None]
        self.S += f_k[..., :, None] * v_t[..., None, :]
        self.Z += f_k
        self.t += 1
        num = (f_q[..., None, :] @ self.S)[..., 0, :]
        den = (f_q * self.Z).sum(-1, keepdims=True) + self.eps
        if self.eps == 0 and bool((den == 0).any()):
            raise ValueError(ZERO_DENOMINATOR)
        return num / den

    def __repr__(self):
        return (f"LinearAttentionState(d_k={self.d_k}, d_v={self.d_v}, "
                f"batch_shape={self.batch_shape}, dtype={self.dtype}, eps={self.eps}, t={self.t})")
