"""Attention, scratch against torch: every variant's output and its three gradients (scratch's
hand-written backward against torch autograd), float64 to 1e-10 relative and float32 as
accurate as torch's own float32 (see :func:`check`), over 0-2 leading axes, n, m in 1..64,
d_k, d_v in 1..32, with and without masks, in the regimes of helpers.attention_problems
(saturated softmax rows, phi underflow, the ends of the float32 range).  On each backend
(``xp``): NumPy beside torch on the CPU, CuPy beside torch on CUDA."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import attention as R
from reference import compare
from scratch import attention as A
from scratch.backend import to_numpy

from .helpers import assert_as_accurate_as, assert_close, on, tensor, tol
from .helpers import attention_problems as problems

NAMES = ("out", "d_q", "d_k", "d_v")


def torch_grads(fn, q, k, v, d_out, dtype, device="cpu", **kw):
    """(out, d_q, d_k, d_v) from torch autograd, computed in ``dtype`` on these inputs (on
    ``device``), as NumPy arrays."""
    t = (tensor(x.astype(dtype), device) for x in (q, k, v, d_out))
    kw = {key: (tensor(val, device) if isinstance(val, np.ndarray) else val)
          for key, val in kw.items()}
    return [to_numpy(x) for x in R.with_grads(fn, *t, **kw)]


def scratch_grads(xp, fwd, bwd, q, k, v, d_out, **kw):
    """scratch's (out, d_q, d_k, d_v) on the backend ``xp`` (arrays and masks moved there)."""
    args = on(xp, q, k, v)
    kw = {key: (on(xp, val) if isinstance(val, np.ndarray) else val) for key, val in kw.items()}
    return (fwd(*args, **kw), *bwd(*args, on(xp, d_out), **kw))


def check(mine, fn, q, k, v, d_out, device="cpu", **kw):
    """scratch's (out, d_q, d_k, d_v) against torch's ``fn`` with autograd.

    float64: torch in float64 is the reference; relative error 1e-10 at each array's scale
    (helpers.TOL), plus 64 ulps of the problem's scale (the largest of the four results) for
    entries that are 0 in exact arithmetic: their rounding error is that of the terms that
    cancelled, whatever the array's own (tiny) scale.
    float32: the truth is torch in float64 on the same float32 inputs, and scratch must be
    within 8x of torch's own float32 error (helpers.assert_as_accurate_as): near saturated
    softmax rows, underflowing phi and the ends of the float32 range the problem's
    conditioning, not the code, limits what float32 can get right, and torch's float32 result
    measures that limit.
    """
    dtype = q.dtype
    assert all(x.dtype == dtype for x in mine)
    mine = [to_numpy(x) for x in mine]
    truth = torch_grads(fn, q, k, v, d_out, np.float64, device, **kw)
    peer = None if dtype == np.float64 else torch_grads(fn, q, k, v, d_out, dtype, device, **kw)
    floor = 64 * np.finfo(dtype).eps * max(float(np.max(np.abs(t))) for t in truth)
    for i, name in enumerate(NAMES):
        if peer is None:
            assert_close(mine[i], truth[i], tol(dtype), name, atol=floor)
        else:
            assert_as_accurate_as(mine[i], peer[i], truth[i], name, floor=floor)


@given(problems(), st.booleans(), st.data())
def test_softmax_attention_matches_torch(xp, device, p, causal, data):
    q, k, v, d_out, key_mask = p
    if causal:
        q, k, v, d_out, key_mask = data.draw(problems(causal=True, dtype=q.dtype.type))
    kw = dict(mask=None if key_mask is None else key_mask[..., None, :], causal=causal)
    mine = scratch_grads(xp, A.softmax_attention, A.softmax_attention_backward, q, k, v, d_out,
                         **kw)
    check(mine, R.softmax_attention, q, k, v, d_out, device, **kw)


@given(problems(dtype=np.float64), st.booleans(), st.data())
def test_softmax_attention_full_mask_matches_torch_sdpa(xp, device, p, causal, data):
    """A general (..., n, m) mask, checked against torch's scaled_dot_product_attention."""
    q, k, v, d_out, _ = data.draw(problems(causal=True, dtype=np.float64)) if causal else p
    rng = np.random.default_rng(q.size)
    mask = rng.random(q.shape[:-1] + (k.shape[-2],)) < 0.5
    mask[..., 0] = True
    kw = dict(mask=mask, causal=causal)
    mine = scratch_grads(xp, A.softmax_attention, A.softmax_attention_backward, q, k, v, d_out,
                         **kw)
    check(mine, R.softmax_attention_sdpa, q, k, v, d_out, device, **kw)


@given(problems(), st.sampled_from(["softmax", "scaling"]))
def test_efficient_attention_matches_torch(xp, device, p, normalization):
    q, k, v, d_out, key_mask = p
    kw = dict(key_mask=key_mask, normalization=normalization)
    mine = scratch_grads(xp, A.efficient_attention, A.efficient_attention_backward, q, k, v,
                         d_out, **kw)
    check(mine, R.efficient_attention, q, k, v, d_out, device, **kw)


@given(problems(), st.booleans(), st.data(), st.sampled_from([0.0, 1e-6, 1e-2]),
       st.sampled_from([1.0, 0.5, 0.1]), st.sampled_from([1, 5, 16, 64]))
def test_linear_attention_matches_torch(xp, device, p, causal, data, eps, alpha, chunk_size):
    q, k, v, d_out, key_mask = data.draw(problems(causal=True)) if causal else p
    kw = dict(causal=causal, eps=eps, alpha=alpha, key_mask=key_mask)
    mine = scratch_grads(xp, A.linear_attention, A.linear_attention_backward, q, k, v, d_out,
                         chunk_size=chunk_size, **kw)
    check(mine, R.linear_attention, q, k, v, d_out, device, **kw)


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
def test_float32_stays_float32(fn, xp):
    x = xp.ones((2, 3, 4), dtype=np.float32)
    out = fn(x, x, x)
    assert out.dtype == np.float32 and type(out) is type(x)
