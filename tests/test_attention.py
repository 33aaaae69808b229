"""Attention, scratch against torch: every variant's output and its three gradients (scratch's
hand-written backward against torch autograd), float64 to 1e-10 and float32 to 1e-5 relative,
over 0-2 leading axes, n, m in 1..64, d_k, d_v in 1..32, with and without masks."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import attention as R
from reference import compare
from scratch import attention as A

TOL = {np.float64: 1e-10, np.float32: 1e-5}


def assert_close(mine, ref, tol, what="", floor=0.0):
    """|mine - ref| <= tol (|ref| + max |ref|) + floor: relative, with an absolute part at the
    array's own scale (gradients have entries that cancel to ~0) and ``floor`` for arrays
    whose true value is exactly 0 (a few rounding errors of the problem's scale)."""
    ref = np.asarray(ref, dtype=np.float64)
    assert mine.shape == ref.shape, (what, mine.shape, ref.shape)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = np.abs(mine.astype(np.float64) - ref)
    bound = tol * (np.abs(ref) + scale) + floor
    assert (err <= bound).all(), f"{what}: max err {err.max():.3e}, scale {scale:.3e}"


@st.composite
def problems(draw, causal=False, dtype=None, mask_kinds=("none", "lengths", "random")):
    """(q, k, v, d_out, key_mask or None) with random shapes, scales and key padding.

    Key 0 is always kept, so no query (causal or not) is left without a key.
    """
    dtype = dtype or draw(st.sampled_from([np.float64, np.float32]))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n = draw(st.integers(1, 64))
    m = n if causal else draw(st.integers(1, 64))
    d_k, d_v = draw(st.integers(1, 32)), draw(st.integers(1, 32))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    q, k = (scale * rng.standard_normal(lead + (s, d_k)) for s in (n, m))
    v = rng.standard_normal(lead + (m, d_v))
    d_out = rng.standard_normal(lead + (n, d_v))
    kind = draw(st.sampled_from(mask_kinds))
    if kind == "lengths":
        key_mask = A.key_mask_from_lengths(rng.integers(1, m + 1, size=lead), m)
    elif kind == "random":
        key_mask = rng.random(lead + (m,)) < 0.6
        key_mask[..., 0] = True
    else:
        key_mask = None
    return tuple(x.astype(dtype) for x in (q, k, v, d_out)) + (key_mask,)


def torch_truth(fn, q, k, v, d_out, **kw):
    """Output and gradients from torch autograd in float64 (the truth for both dtypes)."""
    t = (torch.from_numpy(x.astype(np.float64)) for x in (q, k, v, d_out))
    kw = {key: (torch.from_numpy(val) if isinstance(val, np.ndarray) else val)
          for key, val in kw.items()}
    return [x.numpy() for x in R.with_grads(fn, *t, **kw)]


def check(mine, truth, dtype):
    assert all(x.dtype == dtype for x in mine)
    floor = 64 * np.finfo(dtype).eps * max(float(np.max(np.abs(t))) for t in truth)
    for name, a, b in zip(("out", "d_q", "d_k", "d_v"), mine, truth, strict=True):
        assert_close(a, b, TOL[dtype], name, floor)


@given(problems(), st.booleans(), st.data())
def test_softmax_attention_matches_torch(p, causal, data):
    q, k, v, d_out, key_mask = p
    if causal:
        q, k, v, d_out, key_mask = data.draw(problems(causal=True, dtype=q.dtype.type))
    mask = None if key_mask is None else key_mask[..., None, :]
    mine = (A.softmax_attention(q, k, v, mask=mask, causal=causal),
            *A.softmax_attention_backward(q, k, v, d_out, mask=mask, causal=causal))
    check(mine, torch_truth(R.softmax_attention, q, k, v, d_out, mask=mask, causal=causal),
          q.dtype.type)


@given(problems(dtype=np.float64), st.booleans(), st.data())
def test_softmax_attention_full_mask_matches_torch_sdpa(p, causal, data):
    """A general (..., n, m) mask, checked against torch's scaled_dot_product_attention."""
    q, k, v, d_out, _ = data.draw(problems(causal=True, dtype=np.float64)) if causal else p
    rng = np.random.default_rng(q.size)
    mask = rng.random(q.shape[:-1] + (k.shape[-2],)) < 0.5
    mask[..., 0] = True
    mine = (A.softmax_attention(q, k, v, mask=mask, causal=causal),
            *A.softmax_attention_backward(q, k, v, d_out, mask=mask, causal=causal))
    check(mine, torch_truth(R.softmax_attention_sdpa, q, k, v, d_out, mask=mask, causal=causal),
          np.float64)


@given(problems(), st.sampled_from(["softmax", "scaling"]))
def test_efficient_attention_matches_torch(p, normalization):
    q, k, v, d_out, key_mask = p
    kw = dict(key_mask=key_mask, normalization=normalization)
    mine = (A.efficient_attention(q, k, v, **kw),
            *A.efficient_attention_backward(q, k, v, d_out, **kw))
    check(mine, torch_truth(R.efficient_attention, q, k, v, d_out, **kw), q.dtype.type)


@given(problems(), st.booleans(), st.data(), st.sampled_from([0.0, 1e-6, 1e-2]),
       st.sampled_from([1.0, 0.5, 0.1]), st.sampled_from([1, 5, 16, 64]))
def test_linear_attention_matches_torch(p, causal, data, eps, alpha, chunk_size):
    q, k, v, d_out, key_mask = data.draw(problems(causal=True)) if causal else p
    kw = dict(causal=causal, eps=eps, alpha=alpha, key_mask=key_mask)
    mine = (A.linear_attention(q, k, v, chunk_size=chunk_size, **kw),
            *A.linear_attention_backward(q, k, v, d_out, chunk_size=chunk_size, **kw))
    check(mine, torch_truth(R.linear_attention, q, k, v, d_out, **kw), q.dtype.type)


def test_torch_references_agree_with_each_other():
    """The torch references themselves: explicit softmax == SDPA, cumsum linear == masked."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    km = torch.arange(40) < torch.tensor([[40], [25]])[:, None]       # (2, 1, 40)
    for causal in (False, True):
        torch.testing.assert_close(R.softmax_attention(q, k, v, causal=causal),
                                   R.softmax_attention_sdpa(q, k, v, causal=causal))
        torch.testing.assert_close(R.linear_attention(q, k, v, causal=causal, key_mask=km),
                                   R.linear_attention_masked(q, k, v, causal=causal, key_mask=km))


def test_compare_rows_are_accurate():
    rows = compare.attention_rows(repeat=1)
    assert len(rows) == 6
    for r in rows:
        assert r.max_abs_err < 1e-10, r


@pytest.mark.parametrize("fn", [A.softmax_attention, A.efficient_attention, A.linear_attention])
def test_float32_stays_float32(fn):
    x = np.ones((2, 3, 4), dtype=np.float32)
    assert fn(x, x, x).dtype == np.float32
