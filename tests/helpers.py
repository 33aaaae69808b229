"""What the test modules share: one ``assert_close``, the tolerances and why, central
differences, moving test data to the backend under test, the common hypothesis strategies,
and a training run killed right after a mid-epoch save."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

from scratch.attention import key_mask_from_lengths
from scratch.backend import cupy_usable, to_numpy

# The array backends every scratch-vs-torch test runs on (the ``xp`` fixture of conftest.py).
# The CuPy case carries the ``gpu`` marker (``pytest -m gpu`` selects it) and is skipped, with
# one line, where CuPy cannot run: the check imports cupy once per session (an ImportError
# here, so collection stays cheap).  ``@pytest.mark.parametrize("xp", [CUPY], indirect=True)``
# runs a test on CuPy only.
CUPY = pytest.param("cupy", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_usable(), reason="CuPy with a working GPU is not available")])
BACKENDS = ["numpy", CUPY]

# Relative tolerances against an independent reference in the same precision.  A correct
# computation here is a few sums of at most a few hundred terms, repeated over at most ~40
# recurrent steps: rounding grows like (terms x steps) x eps, about 1e3-1e4 eps in the worst
# cases drawn.  float64: eps 2.2e-16 -> 1e-10 leaves a margin of ~100 and still catches any
# real mistake (a wrong term or sign is an O(1) relative error).  float32: eps 1.2e-7 -> 1e-5.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def tol(dtype) -> float:
    return TOL[np.dtype(dtype)]


def assert_close(got, want, rtol, what="", atol=0.0, dtype=None):
    """Element by element: |got - want| <= rtol (|want| + max |want|) + atol, same shape (and
    ``got.dtype == dtype`` if given).

    The ``max |want|`` part is an absolute error at the array's own scale: entries that cancel
    to ~0 (most gradients have some) carry the rounding error of the large terms they came
    from, not a relative error of their own tiny size.  ``atol`` is for arrays whose true
    value may be exactly 0 everywhere (then the scale is 0 and only ``atol`` is left).
    """
    got, want = to_numpy(got), to_numpy(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if dtype is not None:
        assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    if not want.size:
        return
    want64 = want.astype(np.float64)
    err = np.abs(got.astype(np.float64) - want64)
    bound = rtol * (np.abs(want64) + np.max(np.abs(want64))) + atol
    assert (err <= bound).all(), (f"{what}: max abs error {err.max():.3e} (bound there "
                                  f"{bound.flat[np.argmax(err - bound)]:.3e}), "
                                  f"max |want| {np.max(np.abs(want64)):.3e}")


def assert_as_accurate_as(got, peer, truth, what="", factor=8.0, floor=0.0):
    """max |got - truth| <= factor * max |peer - truth| + floor.

    For float32 results where the problem itself is ill-conditioned (saturated softmax rows,
    features that underflow, inputs near the float32 range): no float32 computation can then
    be accurate to a fixed relative tolerance, and ``peer`` (torch, the same maths on the same
    float32 inputs, in float32) measures how accurate one can be; ``truth`` is the float64
    result on those inputs.  ``factor`` allows for a different order of operations; ``floor``
    (a few ulps of the array's scale) for a peer that is exact by luck.
    """
    got, peer, truth = (to_numpy(a).astype(np.float64) for a in (got, peer, truth))
    assert got.shape == truth.shape, f"{what}: shape {got.shape}, expected {truth.shape}"
    if not truth.size:
        return
    mine, theirs = np.max(np.abs(got - truth)), np.max(np.abs(peer - truth))
    assert mine <= factor * theirs + floor, (
        f"{what}: max error {mine:.3e} vs the peer's {theirs:.3e} (floor {floor:.3e})")


def central_differences(loss, arr, h=1e-6):
    """d loss / d arr by central differences, one entry at a time (arr is changed in place and
    restored).  Truncation error O(h^2), rounding error O(eps |loss| / h): about 1e-10
    relative for float64 at h = 1e-6."""
    numeric = np.empty(arr.shape)
    for i in np.ndindex(arr.shape):
        v = arr[i]
        arr[i] = v + h
        up = loss()
        arr[i] = v - h
        down = loss()
        arr[i] = v
        numeric[i] = (up - down) / (2 * h)
    return numeric


def on(xp, *arrays):
    """The arrays (None stays None) on the backend ``xp``: the test's NumPy data for scratch."""
    moved = tuple(None if a is None else xp.asarray(a) for a in arrays)
    return moved[0] if len(moved) == 1 else moved


def tensor(a, device="cpu", **kw):
    """A torch tensor (a copy) of the NumPy (or CuPy) array ``a`` on ``device`` (None stays
    None)."""
    import torch

    return None if a is None else torch.tensor(to_numpy(a), device=device, **kw)


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------

dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2 ** 32 - 1)

# Attention inputs, by regime (each a reason to exist):
#   normal     q, k ~ N(0, s^2), s in {0.1, 1, 3}
#   saturated  s in {10, 30}: scores of hundreds, softmax rows one-hot to within e^-100
#   underflow  half the entries of q and k shifted by -20 (float32) or -40 (float64): there
#              phi(x) = elu(x) + 1 underflows (below about -17 in float32, -37 in float64),
#              exactly as in torch
#   extreme    near the ends of the float32 range the maths allows: q, k at 1e15 (phi(q).phi(k)
#              summed over d_k, m still below 3.4e38) or 1e-20 (scores subnormal), v at 1e25
#              or 1e-20
# In every regime feature 0 of each query and all of key 0 keep phi > 0 (not shifted, not
# hugely negative), so phi(q_i) . phi(k_0) > 0 and no linear-attention denominator is 0:
# where one is (every product underflowed, eps = 0) is a test of its own.
ATTENTION_REGIMES = ("normal", "saturated", "underflow", "extreme")


class MemoryStore:
    """Features in memory (a list of (L_i, H) arrays), the feature store's interface: zero-padded
    batches as NumPy (scratch) or torch float64 tensors (reference, ``torch_batches``)."""

    def __init__(self, feats, torch_batches: bool = False):
        self.feats, self.torch_batches = feats, torch_batches
        self.lengths = np.array([len(f) for f in feats])
        self.hidden_size = feats[0].shape[1]

    def __len__(self):
        return len(self.feats)

    def batch(self, indices, dtype=np.float64):
        L = self.lengths[indices]
        x = np.zeros((len(indices), L.max(), self.hidden_size))
        for b, i in enumerate(indices):
            x[b, :L[b]] = self.feats[i]
        if self.torch_batches:
            import torch

            return torch.from_numpy(x), torch.from_numpy(L)
        return x.astype(dtype), L


@st.composite
def attention_problems(draw, causal=False, dtype=None, mask_kinds=("none", "lengths", "random"),
                       regimes=ATTENTION_REGIMES, max_n=64, max_d=32):
    """(q, k, v, d_out, key_mask or None) with random shapes, scales and key padding.

    0-2 leading axes, n, m in 1..max_n (m = n if causal), d_k, d_v in 1..max_d.  Key 0 is
    always kept, so no query (causal or not) is left without a key.
    """
    dtype = dtype or draw(dtypes)
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n = draw(st.integers(1, max_n))
    m = n if causal else draw(st.integers(1, max_n))
    d_k, d_v = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    regime = draw(st.sampled_from(regimes))
    scale, v_scale, shift = 1.0, 1.0, 0.0
    if regime == "normal":
        scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    elif regime == "saturated":
        scale = draw(st.sampled_from([10.0, 30.0]))
    elif regime == "underflow":
        shift = -20.0 if dtype == np.float32 else -40.0
    else:
        scale, v_scale = draw(st.sampled_from([(1e15, 1.0), (1e-20, 1.0), (1.0, 1e25),
                                               (1.0, 1e-20)]))
    rng = np.random.default_rng(draw(seeds))
    q, k = (scale * rng.standard_normal(lead + (s, d_k)) for s in (n, m))
    if shift:                           # never feature 0 of a query, never key 0
        shift_q, shift_k = rng.random(q.shape) < 0.5, rng.random(k.shape) < 0.5
        shift_q[..., 0], shift_k[..., 0, :] = False, False
        q, k = q + shift * shift_q, k + shift * shift_k
    if scale >= 10:                     # -10 s would underflow phi: keep those entries >= 0
        q[..., 0], k[..., 0, :] = np.abs(q[..., 0]), np.abs(k[..., 0, :])
    v = v_scale * rng.standard_normal(lead + (m, d_v))
    d_out = rng.standard_normal(lead + (n, d_v))
    kind = draw(st.sampled_from(mask_kinds))
    if kind == "lengths":
        key_mask = key_mask_from_lengths(rng.integers(1, m + 1, size=lead), m)
    elif kind == "random":
        key_mask = rng.random(lead + (m,)) < 0.6
        key_mask[..., 0] = True
    else:
        key_mask = None
    return tuple(x.astype(dtype) for x in (q, k, v, d_out)) + (key_mask,)


class Cut(Exception):
    """The kill of a training run, right after it saved an epoch's first batches."""


def cut_after(monkeypatch, ckpt_module, epoch: int, batches: int) -> None:
    """``ckpt_module.save_state`` (the reference's or scratch's) raises :class:`Cut` once it
    has saved the state after batch ``batches`` of ``epoch`` (``--save-every``)."""
    save = ckpt_module.save_state

    def save_then_cut(folder, state):
        save(folder, state)
        cut = state.get("partial")
        if cut and state["epoch"] + 1 == epoch and cut["batches"] == batches:
            raise Cut

    monkeypatch.setattr(ckpt_module, "save_state", save_then_cut)
