r"""Integrated gradients over the head's input, with the head's own backward pass (no autograd).

Which tokens made the head say so?  The head reads the frozen encoder's features ``x`` (B, T, E)
and gives a logit ``f(x)``.  Integrated gradients (Sundararajan et al. 2017) attributes
``f(x) - f(x')`` to the entries of ``x``, against a baseline ``x'`` (here zeros)::

    IG_{t,e}(x) = (x - x')_{t,e} * \int_0^1 d f(x' + a (x - x')) / d x_{t,e} da

and a token's attribution is its row summed over the hidden dimension ``e``.  Completeness: the
attributions add up to ``f(x) - f(x')`` exactly for the exact integral, so the sum's distance
to that difference is the quadrature's error, printed beside every explanation.

The integral is Gauss-Legendre quadrature on ``steps`` nodes (``alphas = (1 + z) / 2``,
``weights = w / 2`` for numpy's ``leggauss(steps)`` nodes ``z`` and weights ``w``), Captum's
``method="gausslegendre"`` (its default), so that :mod:`reference.pipeline.explain` (Captum's
``IntegratedGradients``) computes the same sum.  One difference: Captum rounds the step sizes
to float32 (``torch.tensor(step_sizes).float()`` in captum 0.9), whatever the inputs' dtype, so
its float64 attributions carry a relative error of up to 6e-8 from the weights alone (and its
weights add up to 1 only to that precision).  ``captum_weights=True`` rounds them the same way:
then the two agree to float64 rounding (tests: <= 1e-9 relative); the default keeps them exact.
Gauss-Legendre on n nodes integrates polynomials of degree 2n - 1 exactly; the head's path
integrand is smooth (tanh and sigmoid of affine maps), so the error falls fast with n (the
tests: under 1e-6 of the logit difference at 50 steps on their heads; Captum's
riemann_trapezoid, whose step sizes add up to (n - 1) / n, would be off by about 1/n).

Padding: the features past a review's length are zeros, and so is the baseline there, so their
attribution is exactly 0; the head reads each review only to its length, so the gradient there
is 0 too.  A review's attributions do not depend on the batch it is padded in.
"""
from __future__ import annotations

import numpy as np

METHOD = "gausslegendre"


def gauss_legendre(steps: int, captum_weights: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1]: Captum's ``gausslegendre`` nodes and step sizes (the
    weights rounded to float32 as Captum uses them with ``captum_weights``)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    z, w = np.polynomial.legendre.leggauss(int(steps))
    w = 0.5 * w
    return 0.5 * (1 + z), (w.astype(np.float32).astype(np.float64) if captum_weights else w)


def integrated_gradients(head, features, lengths=None, steps: int = 50, baseline=None,
                         batch_tokens: int = 16_384, captum_weights: bool = False):
    """(attributions (B, T, E), logits (B,), baseline logits (B,)) of ``head``'s first output.

    ``head`` is a :class:`scratch.sentiment.SentimentHead` (its ``input_gradient``, in its own
    dtype); ``features`` (B, T, E), ``lengths`` (B,) or None; ``baseline`` default zeros.  The
    path points run through the head a few steps at a time: each call holds at most
    ``batch_tokens`` tokens (at least one step's B reviews).  ``captum_weights``: the step
    sizes rounded to float32, as Captum has them (module docstring)."""
    xp = head.xp
    x = xp.asarray(features, dtype=head.dtype)
    B, T, _ = x.shape
    base = xp.zeros_like(x) if baseline is None else xp.asarray(baseline, dtype=head.dtype)
    lengths = None if lengths is None else np.asarray(lengths)
    alphas, weights = gauss_legendre(steps, captum_weights)
    d_logits = xp.zeros((0,), dtype=head.dtype)
    total = xp.zeros_like(x)
    per_call = max(1, int(batch_tokens) // max(1, B * T))
    for start in range(0, len(alphas), per_call):
        a = alphas[start:start + per_call]
        k = len(a)
        path = base[None] + xp.asarray(a, dtype=head.dtype)[:, None, None, None] * (x - base)[None]
        d_logits = xp.zeros((k * B, head.output_dim), dtype=head.dtype)
        d_logits[:, 0] = 1
        _, grad = head.input_gradient(path.reshape(k * B, T, -1),
                                      None if lengths is None else np.tile(lengths, k), d_logits)
        w = xp.asarray(weights[start:start + k], dtype=head.dtype)[:, None, None, None]
        total += (w * grad.reshape(k, B, T, -1)).sum(axis=0)
    attributions = (x - base) * total
    end = head.forward(xp.stack([x, base]).reshape(2 * B, T, -1),
                       None if lengths is None else np.tile(lengths, 2), training=False,
                       cache=False)[:, 0]
    return attributions, end[:B], end[B:]


def token_attributions(head, features, lengths=None, steps: int = 50, **kw):
    """(per-token attributions (B, T): IG summed over the hidden dimension, logits (B,),
    baseline logits (B,))."""
    attributions, logits, base = integrated_gradients(head, features, lengths, steps, **kw)
    return attributions.sum(axis=-1), logits, base
