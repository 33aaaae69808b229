"""The toy recurrence: loop == closed form == torch, the unrolled sum, the verdict rule for even
and odd lengths, ties, saturation, no overflow warnings, and float32 cancellation.  The torch
comparisons run on each backend (``xp``: NumPy beside torch on the CPU, CuPy beside CUDA)."""
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reference.recurrence import AlternatingRNN as TorchRNN
from scratch.backend import to_numpy
from scratch.recurrence import AlternatingRNN, closed_form, even_beats_odd, readout

from .helpers import dtypes, on, tensor

magnitudes = st.sampled_from([1e-30, 1e-6, 1.0, 1e3, 1e12, 1e30])


@st.composite
def sequences(draw, dtype=None):
    dtype = dtype or draw(dtypes)
    batch, n = draw(st.integers(1, 6)), draw(st.integers(1, 200))
    scale = draw(magnitudes)
    x = draw(arrays(dtype, (batch, n), elements=st.floats(-1, 1, width=32)))
    return (x * dtype(scale)).astype(dtype)


def exact_h_last(row) -> Fraction:
    """h_n = sum_t (-1)^(n-t) x_t in exact rational arithmetic."""
    n = len(row)
    return sum(((-1) ** (n - t)) * Fraction(float(v)) for t, v in enumerate(row, start=1))


@given(sequences(), st.sampled_from(["sigmoid", "tanh"]))
def test_loop_equals_closed_form_equals_torch(xp, device, x, act):
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        y, h = AlternatingRNN(activation=act)(on(xp, x))
        hc = closed_form(on(xp, x))
    assert y.dtype == x.dtype and h.dtype == x.dtype
    y, h, hc = to_numpy(y), to_numpy(h), to_numpy(hc)
    if xp is np:
        np.testing.assert_array_equal(h, hc)      # bit for bit (see closed_form's docstring)
    else:   # CuPy's cumsum is a parallel scan, not sequential: the partial sums' rounding
        n = x.shape[1]
        bound = 2 * n * np.finfo(x.dtype).eps * np.abs(x.astype(np.float64)).sum(axis=1)
        assert (np.abs(h.astype(np.float64) - hc).max(axis=1) <= bound).all()
    ty, th = TorchRNN(activation=act, dtype=torch.float64).to(device)(tensor(x, device))
    np.testing.assert_array_equal(h, to_numpy(th))
    tol = 1e-6 if x.dtype == np.float32 else 1e-15
    np.testing.assert_allclose(y, to_numpy(ty), rtol=tol, atol=tol)


@given(sequences(np.float64))
def test_unrolled_sum_and_verdict_rule_for_even_and_odd_lengths(x):
    _, h = AlternatingRNN()(x)
    n = x.shape[1]
    verdict = even_beats_odd(x)
    for b, row in enumerate(x):
        exact = exact_h_last(row)
        # h_n = sum_t (-1)^(n-t) x_t, to float64 rounding of the partial sums
        bound = 2 * n * np.finfo(np.float64).eps * float(sum(abs(Fraction(float(v))) for v in row))
        assert abs(Fraction(float(h[b, -1])) - exact) <= Fraction(bound)
        even_minus_odd = sum(Fraction(float(v)) * (1 if t % 2 == 0 else -1)
                             for t, v in enumerate(row, start=1))
        assert verdict[b] == (even_minus_odd > 0)
        # for even n, h_n = even - odd; for odd n the rule flips: h_n = odd - even
        assert exact == (even_minus_odd if n % 2 == 0 else -even_minus_odd)


def test_readout_high_for_even_n_when_even_wins_and_flips_for_odd_n():
    rnn = AlternatingRNN()
    even_n = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])   # even wins, odd wins
    y, _ = rnn(even_n)
    assert y[0, -1] > 0.9999 and y[1, -1] < 1e-4
    odd_n = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])              # even wins, odd wins
    y, _ = rnn(odd_n)
    assert y[0, -1] < 1e-4 and y[1, -1] > 0.9999                      # flipped
    assert even_beats_odd(odd_n).tolist() == [True, False]


@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 30)),
              elements=st.integers(-1000, 1000).map(float)))
def test_ties_give_exactly_half_or_zero(half):
    x = np.repeat(half, 2, axis=1)          # x_{2k-1} = x_{2k}: even and odd sums tie exactly
    ys, _ = AlternatingRNN(activation="sigmoid")(x)
    yt, _ = AlternatingRNN(activation="tanh")(x)
    assert (ys[:, -1] == 0.5).all() and (yt[:, -1] == 0.0).all()
    assert not even_beats_odd(x).any()


@given(st.floats(0.01, 1e30).filter(lambda v: v > 0.01), st.booleans())
def test_saturated_once_h_beyond_a_hundredth(mag, positive):
    v = mag if positive else -mag
    x = np.array([[0.0, v]])                        # h_2 = v
    for act, lo, hi in [("sigmoid", 0.0, 1.0), ("tanh", -1.0, 1.0)]:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            y, h = AlternatingRNN(activation=act)(x)
        assert h[0, -1] == v
        limit = hi if positive else lo
        assert abs(y[0, -1] - limit) <= 1e-4
    # the bound is tight-ish: at |h| = 0.005, sigmoid(5) is far from saturated
    y, _ = AlternatingRNN()(np.array([[0.0, 0.005]]))
    assert abs(y[0, -1] - 1.0) > 1e-3


@given(dtypes, st.sampled_from(["sigmoid", "tanh"]),
       st.sampled_from([1000.0, 10.0, 1e6]), st.floats(-0.01, 1.0), st.booleans())
def test_readout_at_the_overflow_edge_saturates_without_overflow(xp, device, dtype, act, gain,
                                                                  u, positive):
    """|h| from just below finfo(dtype).max / gain (the edge where gain * h overflows) up to
    finfo.max itself: the readout is saturated, equals torch's (whose gain * h overflows to inf
    and saturates), and NumPy's overflow, raised as an error here, never happens.  Without the
    readout's clip this test fails for both dtypes and both activations."""
    big, edge = float(np.finfo(dtype).max), float(np.finfo(dtype).max) / gain
    v = dtype(edge * (big / edge) ** u)             # u < 0: just below the edge; u = 1: max
    v = v if positive else -v
    x = np.array([[0.0, v]], dtype)                   # h_2 = v
    with np.errstate(over="raise", invalid="raise"):
        y, h = AlternatingRNN(gain=gain, activation=act)(on(xp, x))
        y_closed = readout(closed_form(on(xp, x)), gain, act)
    y, h, y_closed = to_numpy(y), to_numpy(h), to_numpy(y_closed)
    assert h[0, -1] == v and np.array_equal(y, y_closed)
    ty, _ = TorchRNN(gain=gain, activation=act, dtype=torch.float64).to(device)(tensor(x, device))
    np.testing.assert_array_equal(y, to_numpy(ty))
    low = 0.0 if act == "sigmoid" else -1.0
    assert y[0, -1] == (1.0 if positive else low)


def test_float32_cancellation_gets_verdict_wrong_and_float64_is_right():
    x = np.array([[2.0 ** 25, 1.0, 0.0, 2.0 ** 25]])
    assert even_beats_odd(x).tolist() == [True]            # 2^25 + 1 > 2^25, exactly
    y32, h32 = AlternatingRNN()(x.astype(np.float32))
    y64, h64 = AlternatingRNN()(x)
    assert h32[0, -1] == 0.0 and y32[0, -1] == 0.5          # float32: rounded into a tie
    assert closed_form(x.astype(np.float32))[0, -1] == 0.0
    assert h64[0, -1] == 1.0 and y64[0, -1] > 0.9999        # float64: right


def test_float32_long_sequences_of_large_values_find_the_failures():
    """Long runs of large values: float32 gets some verdicts wrong, float64 none of them."""
    rng = np.random.default_rng(7)
    k = 500                                             # n = 4k steps
    a = rng.integers(0, 2 ** 20, size=(200, k)).astype(np.float64)
    b = rng.permuted(a, axis=1)
    b[:, -1] += rng.choice([-3, -2, -1, 1, 2, 3], size=200)   # even - odd margin of a few units
    z = np.zeros_like(a)
    # first half: mass at odd steps only (h drifts to -sum a ~ -2.6e8 > 2^24),
    # second half: the same mass (plus the margin) at even steps, bringing h back near 0
    first = np.stack([a, z], axis=2).reshape(200, 2 * k)
    second = np.stack([z, b], axis=2).reshape(200, 2 * k)
    x = np.concatenate([first, second], axis=1)
    x32 = x.astype(np.float32)
    assert np.array_equal(x32.astype(np.float64), x)  # inputs exactly representable
    truth = even_beats_odd(x)
    y32, _ = AlternatingRNN()(x32)
    y64, _ = AlternatingRNN()(x)
    assert ((y64[:, -1] > 0.5) == truth).all()
    wrong32 = (y32[:, -1] > 0.5) != truth
    assert wrong32.sum() >= 20, wrong32.sum()         # float32 fails often here


def test_bad_input_is_a_clear_error():
    rnn = AlternatingRNN()
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        rnn(np.ones(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        rnn(np.array([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="at least one time step"):
        closed_form(np.ones((2, 0)))
    with pytest.raises(ValueError, match="activation must be one of"):
        AlternatingRNN(activation="relu")


def test_torch_reference_gives_autograd_gradients():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    m = TorchRNN(gain=1.0, activation="tanh")
    y, h = m(x)
    h[0, -1].backward()
    # h_3 = x_3 - x_2 + x_1
    np.testing.assert_array_equal(x.grad.numpy(), [[1.0, -1.0, 1.0]])
