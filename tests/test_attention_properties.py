"""Attention properties, each against an independent formula written here (never scratch's own
values): causal linear attention in three forms (with eps and key masks), causality,
permutation equi/invariance, convex combinations, padded keys without influence, Shen's
scaling = (Q K^T) V / n, associativity, the three backwards against central differences
(no torch), zero denominators, and clear errors for bad input.  The recurrent-state test runs
on each backend (``xp``), CuPy included."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratch import attention as A

from .helpers import assert_close, central_differences, dtypes, on, tol
from .helpers import attention_problems as problems


def score_mask(key_mask):
    """softmax_attention's (..., 1, m) mask of a (..., m) key mask; None stays None."""
    return None if key_mask is None else key_mask[..., None, :]


def phi(x, alpha=1.0):
    """elu(x) + 1 written out: x + 1 for x > 0, alpha (e^x - 1) + 1 otherwise."""
    return np.where(x > 0, x + 1.0, alpha * (np.exp(np.minimum(x, 0)) - 1.0) + 1.0)


def explicit_causal_linear(q, k, v, alpha, eps=0.0, key_mask=None):
    """out_i = sum_{j<=i, kept} a_ij v_j / (sum_{j<=i, kept} a_ij + eps),
    a_ij = phi(q_i).phi(k_j): a loop over i."""
    fq, fk = phi(q, alpha), phi(k, alpha)
    if key_mask is not None:
        fk = fk * key_mask[..., None]
    out = np.empty(q.shape[:-1] + v.shape[-1:])
    for i in range(q.shape[-2]):
        a = np.einsum("...d,...jd->...j", fq[..., i, :], fk[..., : i + 1, :])
        out[..., i, :] = (np.einsum("...j,...jv->...v", a, v[..., : i + 1, :])
                          / (a.sum(-1)[..., None] + eps))
    return out


@given(problems(causal=True, dtype=np.float64), st.sampled_from([1, 2, 7, 64]),
       st.sampled_from([1.0, 0.3]), st.sampled_from([0.0, 1e-6, 1e-2, 1.0]))
def test_recurrent_state_equals_prefix_sums_equals_explicit_formula(xp, p, chunk, alpha, eps):
    """LinearAttentionState stepped token by token (padded keys masked per step) == the chunked
    prefix sums == the naive O(n^2) path == the explicit formula above (NumPy), for eps >= 0;
    the three scratch forms on each backend (``xp``).
    Tolerance 1e-11: four summation orders of at most 64 positive weights, ~64 eps apart."""
    explicit = explicit_causal_linear(p[0], p[1], p[2], alpha, eps, p[4])
    q, k, v, key_mask = on(xp, p[0], p[1], p[2], p[4])
    kw = dict(causal=True, eps=eps, alpha=alpha, key_mask=key_mask)
    parallel = A.linear_attention(q, k, v, chunk_size=chunk, **kw)
    state = A.LinearAttentionState(q.shape[-1], v.shape[-1], batch_shape=q.shape[:-2],
                                   dtype="float64", eps=eps, alpha=alpha, xp=xp)
    recurrent = xp.stack([state.step(q[..., t, :], k[..., t, :], v[..., t, :],
                                     None if key_mask is None else key_mask[..., t])
                          for t in range(q.shape[-2])], axis=-2)
    for name, got in (("parallel", parallel), ("recurrent", recurrent),
                      ("naive", A.linear_attention_naive(q, k, v, **kw))):
        assert_close(got, explicit, 1e-11, name)
    assert state.t == q.shape[-2] and state.S.shape == q.shape[:-2] + (q.shape[-1], v.shape[-1])


@given(problems(causal=True, mask_kinds=("none", "lengths")), st.data())
def test_causality_future_inputs_never_change_past_outputs(p, data):
    q, k, v, _, key_mask = p
    n = q.shape[-2]
    i = data.draw(st.integers(0, n - 1))
    rng = np.random.default_rng(i)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for x in (q2, k2, v2):
        x[..., i + 1:, :] = rng.standard_normal(x[..., i + 1:, :].shape) * 5
    km2 = None if key_mask is None else key_mask.copy()
    if km2 is not None:
        km2[..., i + 1:] = True                   # un-padding future keys changes nothing either
    for f, f2 in [
        (lambda *a: A.softmax_attention(*a, causal=True, mask=score_mask(key_mask)),
         lambda *a: A.softmax_attention(*a, causal=True, mask=score_mask(km2))),
        (lambda *a: A.linear_attention(*a, causal=True, key_mask=key_mask, chunk_size=8),
         lambda *a: A.linear_attention(*a, causal=True, key_mask=km2, chunk_size=8)),
    ]:
        np.testing.assert_array_equal(f(q, k, v)[..., : i + 1, :], f2(q2, k2, v2)[..., : i + 1, :])


VARIANTS = {
    "softmax": lambda q, k, v, km: A.softmax_attention(q, k, v, score_mask(km)),
    "efficient": lambda q, k, v, km: A.efficient_attention(q, k, v, key_mask=km),
    "efficient-scaling": lambda q, k, v, km: A.efficient_attention(q, k, v, key_mask=km,
                                                                  normalization="scaling"),
    "linear": lambda q, k, v, km: A.linear_attention(q, k, v, key_mask=km, eps=0.0),
}


@given(problems(dtype=np.float64), st.sampled_from(sorted(VARIANTS)), st.data())
def test_query_permutation_equivariance_and_key_value_permutation_invariance(p, name, data):
    q, k, v, _, key_mask = p
    f = VARIANTS[name]
    out = f(q, k, v, key_mask)
    pq = np.asarray(data.draw(st.permutations(range(q.shape[-2]))))
    pk = np.asarray(data.draw(st.permutations(range(k.shape[-2]))))
    # only the order of the sums over <= 64 keys changes: ~64 eps = 1.4e-14 relative
    assert_close(f(q[..., pq, :], k, v, key_mask), out[..., pq, :], 1e-12, "queries permuted")
    km = None if key_mask is None else key_mask[..., pk]
    assert_close(f(q, k[..., pk, :], v[..., pk, :], km), out, 1e-12, "keys permuted")


@given(problems(), st.sampled_from(["softmax", "efficient", "linear"]), st.booleans())
def test_each_output_row_is_a_convex_combination_of_kept_value_rows(p, name, causal):
    """Inside the per-column [min, max] of V over the keys the row can see (eps = 0)."""
    q, k, v, _, key_mask = p
    if causal and name != "efficient" and q.shape[-2] == k.shape[-2]:
        out = (A.softmax_attention(q, k, v, score_mask(key_mask), causal=True) if name == "softmax"
               else A.linear_attention(q, k, v, True, eps=0.0, key_mask=key_mask))
        visible = np.tril(np.ones((q.shape[-2],) * 2, bool))         # (n, m): j <= i
    else:
        out = VARIANTS[name](q, k, v, key_mask)
        visible = np.ones((q.shape[-2], k.shape[-2]), bool)
    if key_mask is not None:
        visible = visible & key_mask[..., None, :]
    visible = np.broadcast_to(visible, q.shape[:-1] + k.shape[-2:-1])[..., None]   # (..., n, m, 1)
    vv = v[..., None, :, :]                                                      # (..., 1, m, d_v)
    lo = np.where(visible, vv, np.inf).min(-2)
    hi = np.where(visible, vv, -np.inf).max(-2)
    slack = 16 * np.finfo(q.dtype).eps * np.abs(v).max()     # a weighted mean's rounding
    assert (out >= lo - slack).all() and (out <= hi + slack).all()


@given(problems(mask_kinds=("lengths",)), st.sampled_from(sorted(VARIANTS)))
def test_padded_keys_have_no_influence(p, name):
    """Padded (masked) keys: same output as with those keys cut off, and zero gradients."""
    q, k, v, d_out, key_mask = p
    f = VARIANTS[name]
    out = f(q, k, v, key_mask)
    rtol = 1e-12 if q.dtype == np.float64 else 1e-5     # only the order of the sums differs
    for idx in np.ndindex(q.shape[:-2]):
        keep = key_mask[idx]
        alone = f(q[idx], k[idx][keep], v[idx][keep], None)
        assert_close(out[idx], alone, rtol, f"batch {idx}")
    backward = {
        "softmax": lambda: A.softmax_attention_backward(q, k, v, d_out,
                                                        mask=key_mask[..., None, :]),
        "efficient": lambda: A.efficient_attention_backward(q, k, v, d_out, key_mask=key_mask),
        "efficient-scaling": lambda: A.efficient_attention_backward(
            q, k, v, d_out, key_mask=key_mask, normalization="scaling"),
        "linear": lambda: A.linear_attention_backward(q, k, v, d_out, key_mask=key_mask),
    }[name]
    _, d_k, d_v = backward()
    assert (d_k[~key_mask] == 0).all() and (d_v[~key_mask] == 0).all()


@given(problems(dtype=np.float64))
def test_shen_scaling_variant_is_dot_product_attention_without_softmax(p):
    q, k, v, _, key_mask = p
    if key_mask is None:
        expected = (q @ np.swapaxes(k, -1, -2)) @ v / k.shape[-2]
    else:     # padded keys removed: (Q K^T) V / (number of kept keys)
        w = (q @ np.swapaxes(k, -1, -2)) * key_mask[..., None, :]
        expected = w @ v / key_mask.sum(-1)[..., None, None]
    got = A.efficient_attention(q, k, v, key_mask=key_mask, normalization="scaling")
    assert_close(got, expected, tol(np.float64), "scaling")


@given(problems(dtype=np.float64), st.sampled_from(["softmax", "scaling"]))
def test_efficient_attention_associativity(p, normalization):
    """rho_q (rho_k^T V) == (rho_q rho_k^T) V, and softmax's rho_q rho_k^T rows sum to 1."""
    q, k, v, _, key_mask = p
    kw = dict(key_mask=key_mask, normalization=normalization)
    assert_close(A.efficient_attention(q, k, v, **kw), A.efficient_attention_naive(q, k, v, **kw),
                 tol(np.float64), normalization)
    if normalization == "softmax":   # V = identity columns: the n x m weights themselves
        m = k.shape[-2]
        w = A.efficient_attention_naive(q, k, np.broadcast_to(np.eye(m), k.shape[:-2] + (m, m)),
                                        key_mask=key_mask)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-12)   # sums of <= 64 weights


@given(problems(dtype=np.float64), st.booleans())
def test_linear_attention_fast_path_equals_naive_path_with_eps(p, causal):
    q, k, v, _, key_mask = p
    if causal:
        n = min(q.shape[-2], k.shape[-2])
        q, k, v = q[..., :n, :], k[..., :n, :], v[..., :n, :]
        key_mask = None if key_mask is None else key_mask[..., :n]
    kw = dict(causal=causal, eps=1e-3, key_mask=key_mask)
    # two orders of the same sums over <= 64 keys (~64 eps apart), at the output's scale
    assert_close(A.linear_attention(q, k, v, chunk_size=5, **kw),
                 A.linear_attention_naive(q, k, v, **kw), 1e-11, "fast vs naive")


# --------------------------------------------------------------------------------------------
# the backwards against central differences (no torch)
# --------------------------------------------------------------------------------------------

BACKWARDS = {   # name -> (forward, backward, keyword arguments drawn for it)
    "softmax": (A.softmax_attention, A.softmax_attention_backward,
                st.fixed_dictionaries({"causal": st.booleans()})),
    "efficient": (A.efficient_attention, A.efficient_attention_backward,
                  st.fixed_dictionaries(
                      {"normalization": st.sampled_from(["softmax", "scaling"])})),
    "linear": (A.linear_attention, A.linear_attention_backward,
               st.fixed_dictionaries({"causal": st.booleans(),
                                      "eps": st.sampled_from([0.0, 1e-6, 0.1]),
                                      "alpha": st.sampled_from([1.0, 0.5]),
                                      "chunk_size": st.sampled_from([1, 2, 64])})),
}


@settings(max_examples=40)
@given(st.sampled_from(sorted(BACKWARDS)), st.data())
def test_backward_matches_central_differences(name, data):
    """d/dq, d/dk, d/dv of L = <attention(q, k, v), d_out> by central differences in float64, on
    every entry, against the hand-written backward; with masks (a mask for softmax, key masks
    for the other two).  Tolerance: the rounding error of a central difference is absolute,
    about eps |L| / h ~ 2e-10 |L| at h = 1e-6, the same for every entry, so the bound is
    1e-6 of the gradient's largest entry (helpers.assert_close) plus 1e-8 max(1, |L|) (for
    gradients that are exactly 0): loose for the differences, tight for a wrong term."""
    fwd, bwd, kw_strategy = BACKWARDS[name]
    kw = data.draw(kw_strategy)
    q, k, v, d_out, key_mask = data.draw(problems(
        causal=kw.get("causal", False), dtype=np.float64, regimes=("normal",), max_n=5, max_d=3))
    if name == "softmax":
        kw["mask"] = score_mask(key_mask)
    else:
        kw["key_mask"] = key_mask

    def loss():
        return float(np.sum(fwd(q, k, v, **kw) * d_out))

    grads, atol = bwd(q, k, v, d_out, **kw), 1e-8 * max(1.0, abs(loss()))
    for arr, grad, what in zip((q, k, v), grads, ("d_q", "d_k", "d_v"), strict=True):
        assert_close(grad, central_differences(loss, arr), 1e-6, what, atol=atol)


def test_zero_denominator_is_a_clear_error_where_torch_gives_nan():
    """Every phi(q_i) underflows to 0 (q below -17 in float32): with eps = 0 the denominator
    is 0 (torch: 0/0 = NaN).  Scratch raises a ValueError saying so, in every form; with
    eps > 0 the output is 0 there, as the formula says."""
    rng = np.random.default_rng(0)
    q = np.full((2, 4, 3), -30.0, np.float32)
    k, v = rng.standard_normal((2, 4, 3)).astype(np.float32), np.ones((2, 4, 2), np.float32)
    assert not phi(q).any() and (A.feature_map(q) == 0).all()
    for causal in (False, True):
        with pytest.raises(ValueError, match="denominator 0.*underflowed"):
            A.linear_attention(q, k, v, causal=causal, eps=0.0)
        with pytest.raises(ValueError, match="denominator 0"):
            A.linear_attention_naive(q, k, v, causal=causal, eps=0.0)
        with pytest.raises(ValueError, match="denominator 0"):
            A.linear_attention_backward(q, k, v, v, causal=causal, eps=0.0)
        assert (A.linear_attention(q, k, v, causal=causal, eps=1e-6) == 0).all()
    state = A.LinearAttentionState(3, 2, batch_shape=(2,), eps=0.0)
    with pytest.raises(ValueError, match="denominator 0"):
        state.step(q[:, 0], k[:, 0], v[:, 0])
    state = A.LinearAttentionState(3, 2, batch_shape=(2,), eps=0.0)   # the first key padded
    with pytest.raises(ValueError, match="no unmasked key"):
        state.step(k[:, 0], k[:, 0], v[:, 0], key_mask_t=np.array([True, False]))


@settings(max_examples=10)
@given(dtypes, st.lists(st.integers(1, 3), max_size=2))
def test_state_shapes_dtype_and_reset(dtype, batch):
    batch = tuple(batch)
    s = A.LinearAttentionState(3, 5, batch_shape=batch, dtype=dtype)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(batch + (3,)), rng.standard_normal(batch + (3,)),
               rng.standard_normal(batch + (5,)))
    out = s.step(q, k, v)
    assert out.shape == batch + (5,) and out.dtype == dtype
    # one token: the output is that token's value (up to eps)
    np.testing.assert_allclose(out, v, rtol=1e-5)
    s.reset()
    assert s.t == 0 and not s.S.any() and not s.Z.any()
    with pytest.raises(ValueError, match=r"key_mask_t .* must be boolean"):
        s.step(q, k, v, key_mask_t=np.ones(batch))
    with pytest.raises(ValueError, match=r"k_t must have shape"):
        s.step(q, np.ones(batch + (4,)), v)


def test_fully_masked_rows_and_keys():
    x = np.ones((2, 3, 4))
    none = np.zeros((2, 3), bool)
    with pytest.raises(ValueError, match="fully masked row"):
        A.softmax_attention(x, x, x, mask=none[..., None, :])
    with pytest.raises(ValueError, match="every key is masked"):
        A.efficient_attention(x, x, x, key_mask=none)
    with pytest.raises(ValueError, match="every key is masked"):
        A.efficient_attention(x, x, x, key_mask=none, normalization="scaling")
    with pytest.raises(ValueError, match="no unmasked key"):
        A.linear_attention(x, x, x, key_mask=none, eps=0.0)
    assert (A.linear_attention(x, x, x, key_mask=none, eps=1e-6) == 0).all()   # documented zero
    # causal with the first key padded: row 0 has no key
    first_padded = np.array([False, True, True])
    with pytest.raises(ValueError, match="fully masked row"):
        A.softmax_attention(x, x, x, mask=first_padded, causal=True)
    out = A.linear_attention(x, x, x, causal=True, key_mask=first_padded)
    assert (out[:, 0] == 0).all() and np.allclose(out[:, 1:], 1.0)


def test_key_mask_from_lengths():
    np.testing.assert_array_equal(A.key_mask_from_lengths(np.array([0, 2, 3]), 3),
                                  [[False] * 3, [True, True, False], [True] * 3])
    with pytest.raises(ValueError, match="lengths must lie"):
        A.key_mask_from_lengths(np.array([4]), 3)
    with pytest.raises(ValueError, match="integers"):
        A.key_mask_from_lengths(np.array([1.0]), 3)


def test_bad_input_is_a_clear_error():
    q, k, v = np.ones((2, 5, 4)), np.ones((2, 6, 4)), np.ones((2, 6, 3))
    for f in (A.softmax_attention, A.efficient_attention, A.linear_attention):
        with pytest.raises(ValueError, match="same d_k"):
            f(q, np.ones((2, 6, 3)), v)
        with pytest.raises(ValueError, match=r"agree on \(\.\.\., m\)"):
            f(q, k, np.ones((2, 7, 3)))
        with pytest.raises(ValueError, match="leading"):
            f(q, np.ones((3, 6, 4)), np.ones((3, 6, 3)))
        with pytest.raises(ValueError, match="NaN or inf"):
            f(q, k, np.full((2, 6, 3), np.nan))
        with pytest.raises(ValueError, match="positions, features"):
            f(np.ones(4), k, v)
        with pytest.raises(ValueError, match="one dtype"):
            f(q.astype(np.float32), k, v)
    with pytest.raises(ValueError, match="n == m"):
        A.softmax_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="n == m"):
        A.linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        A.softmax_attention(q, k, v, mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="boolean"):
        A.efficient_attention(q, k, v, key_mask=np.ones(6))
    with pytest.raises(ValueError, match="does not broadcast"):
        A.linear_attention(q, k, v, key_mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="d_out must have"):
        A.linear_attention_backward(q, k, v, np.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="alpha"):
        A.linear_attention(q, k, v, alpha=2.0)
    with pytest.raises(ValueError, match="eps"):
        A.linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        A.linear_attention(q, q, q, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="normalization"):
        A.efficient_attention(q, k, v, normalization="l2")
