"""scratch GRU == torch.nn.GRU: outputs, h_n and every gradient against torch autograd (packed
sequences for lengths, torch fed scratch's dropout masks), a finite-difference check that does
not use torch, the readable cell, state_dict round trips and clear errors.  The comparisons with
torch run on each backend (``xp``: NumPy beside torch on the CPU, CuPy beside torch on CUDA,
there with the fused step kernels, and once more without them)."""
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.gru import TORCH_DTYPES, run_packed, torch_forward_backward, torch_gru_like
from scratch import flush_to_zero
from scratch import gru as gru_module
from scratch.backend import to_numpy
from scratch.gru import GRU
from scratch.gru_cell import gru_cell_backward, gru_cell_forward

from .helpers import CUPY, central_differences, dtypes, on, seeds, tol
from .helpers import assert_close as shared_assert_close


@st.composite
def gru_cases(draw, dtype=None, dropout=False):
    """A GRU configuration, its (scaled, non-zero-bias) weights and the data for one call."""
    c = dict(
        dtype=np.dtype(dtype or draw(dtypes)),
        num_layers=draw(st.integers(2 if dropout else 1, 3)), bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()),
        batch=draw(st.integers(1, 8)), time=draw(st.integers(1, 40)),
        input_size=draw(st.integers(1, 32)), hidden_size=draw(st.integers(1, 32)),
        with_h0=draw(st.booleans()), with_d_hn=draw(st.booleans()),
        scale=draw(st.sampled_from([0.3, 1.0, 3.0])), seed=draw(seeds),
        dropout=draw(st.sampled_from([0.2, 0.5])) if dropout else 0.0)
    c["with_lengths"] = draw(st.booleans())
    c["unbatched"] = not c["with_lengths"] and draw(st.integers(0, 5)) == 0
    return c


def build(c, xp=np, device="cpu"):
    """(scratch GRU with random weights on ``xp``, its torch twin on ``device``, x, h0 or None,
    lengths or None, d_output, d_h_n or None) for case ``c``; the arrays are NumPy."""
    rng = np.random.default_rng(c["seed"])
    gru = GRU(c["input_size"], c["hidden_size"], c["num_layers"], bias=c["bias"],
              batch_first=c["batch_first"], dropout=c["dropout"],
              bidirectional=c["bidirectional"], dtype=c["dtype"], seed=c["seed"], xp=xp)
    k = c["scale"] / np.sqrt(c["hidden_size"])
    gru.load_state_dict({n: rng.uniform(-k, k, s) for n, s in gru.param_shapes().items()})
    B, T, D, LD = c["batch"], c["time"], gru.num_directions, gru.num_directions * c["num_layers"]
    if c["unbatched"]:
        x_shape, h_shape, out_shape = ((T, c["input_size"]), (LD, c["hidden_size"]),
                                       (T, D * c["hidden_size"]))
    else:
        x_shape = (B, T, c["input_size"]) if c["batch_first"] else (T, B, c["input_size"])
        h_shape, out_shape = (LD, B, c["hidden_size"]), x_shape[:2] + (D * c["hidden_size"],)
    dt = c["dtype"]
    x = (rng.standard_normal(x_shape) * c["scale"]).astype(dt)
    h0 = rng.uniform(-1, 1, h_shape).astype(dt) if c["with_h0"] else None
    lengths = rng.integers(1, T + 1, B) if c["with_lengths"] else None
    d_out = rng.standard_normal(out_shape).astype(dt)
    d_hn = rng.standard_normal(h_shape).astype(dt) if c["with_d_hn"] else None
    return gru, torch_gru_like(gru, device=device), x, h0, lengths, d_out, d_hn


def assert_as_accurate_as_torch(name, got, want, truth):
    """float32, where scratch and torch differ by more than 1e-5 of the scale: both are
    float32 roundings of the float64 result, and saturated gates amplify rounding through the
    layers (seen: 3 layers, hidden 3, weights at 3x torch's init: both sides 3e-5 to 6e-5 off
    the float64 result on a 0.94-sized gradient).  Then scratch must be no further from the
    float64 result than 3x torch's own distance (and within 1e-3 of the scale)."""
    scale = max(float(np.abs(truth).max()), 1.0)
    err, torch_err = float(np.abs(got - truth).max()), float(np.abs(want - truth).max())
    assert err <= 3 * torch_err and err <= 1e-3 * scale, (
        f"{name}: scratch {err:.3e} from the float64 result, torch float32 {torch_err:.3e}")


def assert_close(name, got, want, dtype):
    """The shared assert_close at the dtype's tolerance, with an absolute part of the same
    size (GRU states and gradients are O(1) here), and got's dtype checked."""
    shared_assert_close(got, want, tol(dtype), name, atol=tol(dtype), dtype=dtype)


def check_against_torch(c, training=False, xp=np, device="cpu"):
    gru, ref, x, h0, lengths, d_out, d_hn = build(c, xp, device)
    out, h_n = gru(on(xp, x), on(xp, h0), lengths=lengths, training=training)
    d_x, d_h0 = gru.backward(*on(xp, d_out, d_hn))
    out, h_n, d_x, d_h0 = (to_numpy(a) for a in (out, h_n, d_x, d_h0))
    h0_t = h0 if h0 is not None else np.zeros(h_n.shape, c["dtype"])
    masks = gru.dropout_masks if training else None
    if training and c["num_layers"] > 1:
        assert len(masks) == c["num_layers"] - 1
    r = torch_forward_backward(ref, x, h0_t, d_out, d_hn, lengths=lengths, masks=masks)
    dt = c["dtype"]
    got = dict(output=out, h_n=h_n, d_x=d_x, d_h0=d_h0, **gru.grads)
    want = dict(output=r["output"], h_n=r["h_n"], d_x=r["d_x"], d_h0=r["d_h0"], **r["grads"])
    assert list(gru.grads) == list(r["grads"])
    truth = None
    for name in want:
        try:
            assert_close(name, got[name], want[name], dt)
        except AssertionError:
            if dt != np.float32:
                raise
            if truth is None:                    # float64 on the very float32 inputs
                r64 = torch_forward_backward(
                    ref.double(), *(None if a is None else a.astype(np.float64)
                                    for a in (x, h0_t, d_out, d_hn)),
                    lengths=lengths, masks=None if masks is None else
                    [to_numpy(m).astype(np.float64) for m in masks])
                truth = dict(output=r64["output"], h_n=r64["h_n"], d_x=r64["d_x"],
                             d_h0=r64["d_h0"], **r64["grads"])
            assert_as_accurate_as_torch(name, got[name], want[name], truth[name])
    if lengths is not None:                      # padded steps: output 0, no gradient to x
        t = np.arange(c["time"])
        pad = ((t[None, :] >= lengths[:, None]) if c["batch_first"]
               else (t[:, None] >= lengths[None, :]))
        assert not out[pad].any() and not d_x[pad].any()


@given(gru_cases(np.float64))
def test_float64_matches_torch_autograd(xp, device, c):
    check_against_torch(c, xp=xp, device=device)


@given(gru_cases(np.float32))
def test_float32_matches_torch_autograd(xp, device, c):
    check_against_torch(c, xp=xp, device=device)


@settings(max_examples=25)
@given(gru_cases(dropout=True))
def test_dropout_masks_applied_in_torch_reproduce_scratch(xp, device, c):
    check_against_torch(c, training=True, xp=xp, device=device)


@pytest.mark.parametrize("xp", [CUPY], indirect=True)
@settings(max_examples=20)
@given(gru_cases(), st.booleans())
def test_fused_cupy_steps_equal_the_unfused_passes(xp, device, c, training):
    """On CuPy, the fused step kernels (default) == the NumPy-style element-wise passes
    (``FUSED = False``) run on CuPy: outputs and every gradient, to the dtype's tolerance (the
    kernel may contract a * b + c into one rounding, so not bit for bit); and the unfused passes
    on CuPy == torch too."""
    if c["num_layers"] < 2:
        training = False
    results = []
    for fused in (True, False):
        gru_module.FUSED = fused
        try:
            gru, _, x, h0, lengths, d_out, d_hn = build(c, xp, device)
            out, h_n = gru(on(xp, x), on(xp, h0), lengths=lengths, training=training)
            d_x, d_h0 = gru.backward(*on(xp, d_out, d_hn))
            results.append([to_numpy(a) for a in (out, h_n, d_x, d_h0, *gru.grads.values())])
        finally:
            gru_module.FUSED = True
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert_close(f"array {i}", a, b, c["dtype"])
    gru_module.FUSED = False
    try:
        check_against_torch(c, training, xp=xp, device=device)
    finally:
        gru_module.FUSED = True


def test_dropout_only_when_training_and_seeded():
    x = np.random.default_rng(0).standard_normal((6, 4, 5))
    a = GRU(5, 7, num_layers=3, dropout=0.5, dtype="float64", seed=3)
    b = GRU(5, 7, num_layers=3, dropout=0.5, dtype="float64", seed=3)
    out_eval, _ = a(x)
    assert a.dropout_masks == []
    np.testing.assert_array_equal(GRU(5, 7, num_layers=3, dtype="float64", seed=3)(x)[0], out_eval)
    out_a, _ = a(x, training=True)
    out_b, _ = b(x, training=True)
    np.testing.assert_array_equal(out_a, out_b)                  # same seed, same masks
    assert not np.array_equal(out_a, out_eval)
    for m in a.dropout_masks:
        assert m.shape == (6, 4, 7) and set(np.unique(m)) <= {0.0, 2.0}
    big = GRU(5, 50, num_layers=2, dropout=0.25, dtype="float32", seed=1)
    big(np.ones((40, 30, 5), np.float32), training=True)
    assert abs((big.dropout_masks[0] == 0).mean() - 0.25) < 0.01


def numpy_kernel(source):
    """A CuPy ElementwiseKernel source (``scratch.gru.FORWARD_STEP`` / ``BACKWARD_STEP``) run by
    NumPy: the body's statements, each element-wise, executed on whole arrays; inputs read,
    outputs read and then written in place, as the kernel does element by element."""
    ins, outs, body = source
    in_names = [p.split()[-1] for p in ins.split(",")]
    out_names = [p.split()[-1] for p in outs.split(",")]
    statements = [re.sub(r"^(const )?T ", "", st.strip()) for st in body.split(";") if st.strip()]

    def run(*args):
        assert len(args) == len(in_names) + len(out_names)
        outputs = args[len(in_names):]
        dt = outputs[0].dtype
        ns = {"tanh": np.tanh}
        ns.update((n, np.asarray(a) if np.ndim(a) else dt.type(a))
                  for n, a in zip(in_names, args[:len(in_names)], strict=False))
        ns.update((n, a.copy()) for n, a in zip(out_names, outputs, strict=True))
        for statement in statements:
            exec(statement, ns)                                        # noqa: S102 (our own source)
        for n, a in zip(out_names, outputs, strict=True):
            a[...] = ns[n]
    return run


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 7, 1]])
def test_fused_kernel_sources_run_by_numpy_equal_the_numpy_passes(monkeypatch, dtype, lengths):
    """Without a GPU: the fused CuPy kernels' very sources, run by NumPy inside the scans' fused
    branch (``d_h += d_gh W_hh`` for the cuBLAS accumulate), give the NumPy passes' outputs and
    gradients, for training with dropout, inference, and backward with and without d_output.
    Checks the kernels' equations and how the scans call them; on a GPU,
    test_fused_cupy_steps_equal_the_unfused_passes runs the compiled kernels."""
    emulated = gru_module.StepKernels(numpy_kernel(gru_module.FORWARD_STEP),
                                      numpy_kernel(gru_module.BACKWARD_STEP),
                                      lambda d_gh, w_hh, d_h: d_h.__iadd__(d_gh @ w_hh))
    rng = np.random.default_rng(5)
    x, d_out, d_hn = (rng.standard_normal(s).astype(dtype)
                      for s in ((4, 7, 3), (4, 7, 8), (4, 4, 4)))
    results = []
    for kernels in (None, emulated):
        monkeypatch.setattr(gru_module, "gru_step_kernels", lambda xp, k=kernels: k)
        gru = GRU(3, 4, num_layers=2, batch_first=True, dropout=0.3, bidirectional=True,
                  dtype=dtype, seed=1)
        got = list(gru(x, lengths=lengths, training=True))
        got += gru.backward(d_out, d_hn)
        got += gru.grads.values()
        got += gru(x, lengths=lengths, cache=False)
        gru(x, lengths=lengths)
        got += [gru.backward(None, d_hn, need_dx=False)[1], *gru.grads.values()]
        results.append(got)
    assert len(results[1]) == 2 + 2 + 16 + 2 + 1 + 16          # 16 parameters
    for i, (fused, passes) in enumerate(zip(*results, strict=True)):
        assert_close(f"array {i}", fused, passes, np.dtype(dtype))


# --------------------------------------------------------------------------------------------
# independent of torch
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional,lengths", [(False, None), (True, [4, 2, 5])])
def test_finite_difference_gradients(bidirectional, lengths):
    """Central differences of L = <output, d_out> + <h_n, d_hn> in float64, on every entry of
    x, h0 and every parameter, against the analytic backward."""
    rng = np.random.default_rng(11)
    gru = GRU(3, 4, num_layers=2, bidirectional=bidirectional, dtype="float64", seed=5)
    gru.load_state_dict({n: rng.uniform(-0.8, 0.8, s) for n, s in gru.param_shapes().items()})
    D = gru.num_directions
    x, h0 = rng.standard_normal((5, 3, 3)), rng.standard_normal((2 * D, 3, 4))
    d_out, d_hn = rng.standard_normal((5, 3, 4 * D)), rng.standard_normal((2 * D, 3, 4))

    def loss():
        out, h_n = gru(x, h0, lengths=lengths)
        return float(np.sum(out * d_out) + np.sum(h_n * d_hn))

    loss()
    d_x, d_h0 = gru.backward(d_out, d_hn)
    analytic = [(x, d_x), (h0, d_h0)] + [(gru.params[n], g) for n, g in gru.grads.items()]
    for arr, grad in analytic:
        np.testing.assert_allclose(grad, central_differences(loss, arr), rtol=1e-6, atol=1e-8)


def test_fast_path_equals_the_readable_cell_loop(xp):
    """One layer, one direction: scratch.gru == a Python loop over gru_cell_forward/backward
    (on CuPy: the fused step kernels against the cell's separate operations)."""
    rng = np.random.default_rng(2)
    gru = GRU(6, 5, dtype="float64", seed=0, xp=xp)
    p = {k: to_numpy(v) for k, v in gru.params.items()}
    w_ih, w_hh, b_ih, b_hh = (p[k + "_l0"]
                              for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    x, h0, d_out = (rng.standard_normal((9, 4, 6)), rng.standard_normal((4, 5)),
                    rng.standard_normal((9, 4, 5)))
    out, h_n = gru(*on(xp, x, h0[None]))
    d_x, d_h0 = gru.backward(on(xp, d_out))
    out, h_n, d_x, d_h0 = (to_numpy(a) for a in (out, h_n, d_x, d_h0))
    h, caches, hs = h0, [], []
    for t in range(9):
        h, cache = gru_cell_forward(x[t], h, w_ih, w_hh, b_ih, b_hh)
        hs.append(h)
        caches.append(cache)
    np.testing.assert_allclose(out, np.stack(hs), rtol=0, atol=1e-14)
    dh, dxs, acc = np.zeros((4, 5)), [], [0, 0, 0, 0]
    for t in range(8, -1, -1):
        dx_t, dh, *g = gru_cell_backward(dh + d_out[t], caches[t], w_ih, w_hh)
        dxs.append(dx_t)
        acc = [a + b for a, b in zip(acc, g, strict=True)]
    np.testing.assert_allclose(d_x, np.stack(dxs[::-1]), atol=1e-13)
    np.testing.assert_allclose(d_h0[0], dh, atol=1e-13)
    for name, g in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), acc, strict=True):
        np.testing.assert_allclose(to_numpy(gru.grads[name + "_l0"]), g, atol=1e-12)


@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 12), seeds)
def test_cell_matches_torch_gru_cell_autograd(xp, device, batch, input_size, hidden_size, seed):
    rng = np.random.default_rng(seed)
    cell = torch.nn.GRUCell(input_size, hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))
    cell = cell.to(device)
    x = torch.tensor(rng.standard_normal((batch, input_size)), requires_grad=True, device=device)
    h = torch.tensor(rng.standard_normal((batch, hidden_size)), requires_grad=True, device=device)
    dh_new = rng.standard_normal((batch, hidden_size))
    h_new = cell(x, h)
    (h_new * torch.from_numpy(dh_new).to(device)).sum().backward()
    w = on(xp, *(to_numpy(p) for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)))
    ours, cache = gru_cell_forward(*on(xp, to_numpy(x), to_numpy(h)), *w)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(h_new), atol=1e-14)
    got = gru_cell_backward(on(xp, dh_new), cache, w[0], w[1])
    want = [x.grad, h.grad, cell.weight_ih.grad, cell.weight_hh.grad, cell.bias_ih.grad,
            cell.bias_hh.grad]
    for g, t in zip(got, want, strict=True):
        np.testing.assert_allclose(to_numpy(g), to_numpy(t), atol=1e-13)


# --------------------------------------------------------------------------------------------
# parameters, state_dict, dtypes
# --------------------------------------------------------------------------------------------

def test_parameters_names_shapes_and_init_like_torch():
    gru = GRU(7, 20, num_layers=2, bidirectional=True, dtype="float64", seed=0)
    ref = torch.nn.GRU(7, 20, num_layers=2, bidirectional=True)
    assert list(gru.state_dict()) == list(ref.state_dict())
    for name, t in ref.state_dict().items():
        assert gru.state_dict()[name].shape == tuple(t.shape)
    assert (list(GRU(3, 4, bias=False).state_dict())
            == list(torch.nn.GRU(3, 4, bias=False).state_dict()))
    # U(-1/sqrt(H), 1/sqrt(H)): bounded, mean ~0, variance k^2 / 3
    k = 1 / np.sqrt(20)
    w = np.concatenate([v.ravel() for v in gru.state_dict().values()])
    assert np.abs(w).max() <= k and w.size > 10000
    assert abs(w.mean()) < 0.02 * k and abs(w.var() / (k * k / 3) - 1) < 0.05


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_dict_round_trip_through_torch_is_exact(dtype):
    tdt = torch.float32 if dtype == "float32" else torch.float64
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=tdt)
    gru = GRU(5, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=dtype)
    gru.load_state_dict(ref.state_dict())
    back = torch.nn.GRU(5, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=tdt)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in gru.state_dict().items()})
    x = torch.randn(3, 8, 5, dtype=tdt)
    with torch.no_grad():
        for a, b in zip(ref(x), back(x), strict=True):
            assert torch.equal(a, b)
        out, h_n = gru(x.numpy())
        assert_close("output", out, ref(x)[0].numpy(), np.dtype(dtype))
        assert_close("h_n", h_n, ref(x)[1].numpy(), np.dtype(dtype))
    assert all(v.dtype == np.dtype(dtype) for v in gru.state_dict().values())


def test_load_state_dict_errors_name_the_entry():
    gru = GRU(3, 4, num_layers=2)
    sd = gru.state_dict()
    with pytest.raises(ValueError, match="missing.*bias_hh_l1"):
        gru.load_state_dict({k: v for k, v in sd.items() if k != "bias_hh_l1"})
    with pytest.raises(ValueError, match="unexpected.*weight_ih_l2"):
        gru.load_state_dict(sd | {"weight_ih_l2": sd["weight_ih_l1"]})
    with pytest.raises(ValueError, match=r"weight_hh_l0 has shape \(12, 5\), expected \(12, 4\)"):
        gru.load_state_dict(sd | {"weight_hh_l0": np.zeros((12, 5))})
    with pytest.raises(ValueError, match="bias_ih_l0 contains NaN"):
        gru.load_state_dict(sd | {"bias_ih_l0": np.full(12, np.nan)})
    np.testing.assert_array_equal(gru.state_dict()["weight_hh_l0"], sd["weight_hh_l0"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_everywhere(dtype):
    gru = GRU(3, 4, num_layers=2, bidirectional=True, dtype=dtype)
    x = np.ones((5, 2, 3), dtype)
    out, h_n = gru(x, lengths=[5, 3])
    d_x, d_h0 = gru.backward(np.ones_like(out), np.ones_like(h_n))
    assert {a.dtype for a in (out, h_n, d_x, d_h0, *gru.grads.values())} == {np.dtype(dtype)}
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(ValueError, match="dtype"):
        gru(x.astype(other))


def test_extreme_inputs_stay_finite_and_match_torch(xp, device):
    gru = GRU(2, 3, dtype="float32", seed=0, xp=xp)
    x = np.array([[[1e30, -1e30]], [[-3e4, 3e4]], [[0.0, 1.0]]], np.float32)
    out, h_n = gru(on(xp, x))
    d_x, _ = gru.backward(xp.ones_like(out))
    out, d_x = to_numpy(out), to_numpy(d_x)
    assert np.isfinite(out).all() and np.isfinite(d_x).all()
    with torch.no_grad():
        want = to_numpy(torch_gru_like(gru, device=device)(torch.from_numpy(x).to(device))[0])
    np.testing.assert_allclose(out, want, atol=1e-6)


# --------------------------------------------------------------------------------------------
# lengths and bad input
# --------------------------------------------------------------------------------------------

def test_lengths_all_full_equals_no_lengths_and_order_does_not_matter(xp, device):
    rng = np.random.default_rng(4)
    gru = GRU(3, 5, num_layers=2, bidirectional=True, dtype="float64", seed=1, xp=xp)
    x = rng.standard_normal((6, 4, 3))
    run = lambda *a, **kw: [to_numpy(r) for r in gru(on(xp, a[0]), *a[1:], **kw)]  # noqa: E731
    np.testing.assert_array_equal(run(x, lengths=[6] * 4)[0], run(x)[0])
    lengths = np.array([2, 6, 3, 5])
    out, h_n = run(x, lengths=lengths)
    perm = np.argsort(-lengths)
    out_sorted, h_sorted = run(x[:, perm], lengths=lengths[perm], enforce_sorted=True)
    np.testing.assert_array_equal(out[:, perm], out_sorted)
    np.testing.assert_array_equal(h_n[:, perm], h_sorted)
    with torch.no_grad():     # torch with enforce_sorted=False agrees too
        t_out, t_h = run_packed(torch_gru_like(gru, device=device),
                                torch.from_numpy(x).to(device), None, lengths)
    np.testing.assert_allclose(out, to_numpy(t_out), atol=1e-13)
    np.testing.assert_allclose(h_n, to_numpy(t_h), atol=1e-13)


@pytest.mark.parametrize("call,match", [
    (lambda g: g(np.ones((2, 3, 4, 5))), r"3-D \(time, batch, input_size\) or 2-D"),
    (lambda g: g(np.ones(4)), r"3-D .* got shape \(4,\)"),
    (lambda g: g(np.ones((5, 2, 7))), "feature size 7 but input_size is 4"),
    (lambda g: g(np.ones((0, 2, 4))), "at least one time step"),
    (lambda g: g(np.ones((5, 2, 4)), lengths=[5, 0]), r"lengths must be in \[1, 5\]"),
    (lambda g: g(np.ones((5, 2, 4)), lengths=[6, 1]), r"lengths must be in \[1, 5\]"),
    (lambda g: g(np.ones((5, 2, 4)), lengths=[5]), r"lengths must have shape \(2,\)"),
    (lambda g: g(np.ones((5, 2, 4)), lengths=[2.5, 1]), "lengths must be integers"),
    (lambda g: g(np.ones((5, 2, 4)), lengths=[2, 5], enforce_sorted=True), "not sorted"),
    (lambda g: g(np.ones((5, 4)), lengths=[5]), "lengths needs batched input"),
    (lambda g: g(np.array([[[np.nan] * 4]])), "x contains NaN or inf"),
    (lambda g: g(np.array([[[np.inf] * 4]])), "x contains NaN or inf"),
    (lambda g: g(np.ones((5, 2, 4)), h0=np.zeros((1, 2, 3))), r"h0 must have shape \(2, 2, 3\)"),
    (lambda g: g(np.ones((5, 4)), h0=np.zeros((2, 1, 3))), r"h0 must have shape \(2, 3\)"),
    (lambda g: g(np.ones((5, 2, 4)), h0=np.full((2, 2, 3), np.nan)), "h0 contains NaN"),
    (lambda g: g(np.ones((5, 2, 4)), h0=np.zeros((2, 2, 3), np.float32)), "h0 has dtype"),
])
def test_bad_input_is_a_clear_value_error(call, match):
    gru = GRU(4, 3, num_layers=2, dtype="float64")
    with pytest.raises(ValueError, match=match):
        call(gru)


def test_backward_checks():
    gru = GRU(4, 3, dtype="float64")
    with pytest.raises(RuntimeError, match=r"forward \(with cache=True\) before backward"):
        gru.backward(np.ones((5, 2, 3)))
    gru(np.ones((5, 2, 4)))
    with pytest.raises(ValueError, match=r"d_output must have the output's shape \(5, 2, 3\)"):
        gru.backward(np.ones((5, 2, 4)))
    with pytest.raises(ValueError, match=r"d_h_n must have h_n's shape \(1, 2, 3\)"):
        gru.backward(np.ones((5, 2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="d_output contains NaN"):
        gru.backward(np.full((5, 2, 3), np.nan))


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_size=0, hidden_size=3), "input_size must be a positive integer"),
    (dict(input_size=2, hidden_size=3, num_layers=0), "num_layers must be a positive"),
    (dict(input_size=2, hidden_size=3, dropout=1.5), r"dropout must be a number in \[0, 1\]"),
    (dict(input_size=2, hidden_size=3, dropout=-0.1), r"dropout must be a number in \[0, 1\]"),
    (dict(input_size=2, hidden_size=3, dropout=True), r"dropout must be a number in \[0, 1\]"),
    (dict(input_size=2, hidden_size=3, dropout="0.5"), r"dropout must be a number in \[0, 1\]"),
])
def test_bad_constructor_values_are_value_errors_as_in_torch(kwargs, match):
    with pytest.raises(ValueError):
        torch.nn.GRU(**kwargs)
    with pytest.raises(ValueError, match=match):
        GRU(**kwargs)


def test_bad_dtype_and_nan_dropout():
    with pytest.raises(ValueError, match="float32 or float64"):
        GRU(2, 3, dtype="float16")
    with pytest.raises(ValueError, match="dropout must be a number"):
        GRU(2, 3, dropout=float("nan"))


# torch.nn.GRU's own type checks: sizes must be ints, bias and batch_first bools.
TORCH_TYPE_ERRORS = [
    ("input_size", dict(input_size=3.0, hidden_size=5)),
    ("input_size", dict(input_size="10", hidden_size=5)),
    ("hidden_size", dict(input_size=3, hidden_size=5.0)),
    ("hidden_size", dict(input_size=3, hidden_size="10")),
    ("num_layers", dict(input_size=3, hidden_size=5, num_layers=2.0)),
    ("bias", dict(input_size=3, hidden_size=5, bias="True")),
    ("bias", dict(input_size=3, hidden_size=5, bias=1)),
    ("batch_first", dict(input_size=3, hidden_size=5, batch_first="False")),
    ("batch_first", dict(input_size=3, hidden_size=5, batch_first=0)),
]


@pytest.mark.parametrize("name,kwargs", TORCH_TYPE_ERRORS, ids=lambda v: repr(v))
def test_wrong_argument_types_are_type_errors_as_in_torch(name, kwargs):
    with pytest.raises(TypeError):
        torch.nn.GRU(**kwargs)
    with pytest.raises(TypeError, match=f"{name} must be an? (int|bool)"):
        GRU(**kwargs)


def test_batch_first_string_is_not_read_as_true():
    """The bug this guards: GRU(3, 5, batch_first="False") was accepted as True, so a time-major
    input was silently read as batch-first."""
    with pytest.raises(TypeError, match=r"batch_first must be a bool .*'False'"):
        GRU(3, 5, batch_first="False")


def test_stricter_than_torch_where_torch_is_silently_wrong():
    """torch takes bidirectional="False" as True (a bidirectional GRU nobody asked for);
    scratch refuses it, and sizes given as bools (torch reads True as 1)."""
    assert torch.nn.GRU(3, 5, bidirectional="False").bidirectional     # torch's lenient reading
    with pytest.raises(TypeError, match="bidirectional must be a bool"):
        GRU(3, 5, bidirectional="False")
    with pytest.raises(TypeError, match="hidden_size must be an int"):
        GRU(3, True)
    gru = GRU(3, 5, num_layers=np.int64(2), bias=np.bool_(True))        # NumPy scalars are fine
    assert gru.num_layers == 2 and gru.bias is True
    with pytest.raises(TypeError, match="training must be a bool"):
        gru(np.ones((4, 2, 3), np.float32), training="False")


# --------------------------------------------------------------------------------------------
# torch's edge cases: empty batch, dropout = 1
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_empty_batch_matches_torch(batch_first, bidirectional, dtype):
    """Input (5, 0, 3): torch returns an empty output (5, 0, D H) and h_n (L D, 0, H), and its
    backward gives an empty d_x and all-zero parameter gradients.  So does scratch."""
    gru = GRU(3, 4, num_layers=2, batch_first=batch_first, bidirectional=bidirectional,
              dtype=dtype, seed=0)
    ref = torch_gru_like(gru)
    D = gru.num_directions
    x = np.zeros((0, 5, 3) if batch_first else (5, 0, 3), dtype)
    xt = torch.zeros(x.shape, dtype=TORCH_DTYPES[np.dtype(dtype)], requires_grad=True)
    h0t = torch.zeros((2 * D, 0, 4), dtype=xt.dtype, requires_grad=True)
    t_out, t_h = ref(xt, h0t)
    (t_out.sum() + t_h.sum()).backward()
    out, h_n = gru(x, np.zeros((2 * D, 0, 4), dtype))
    assert out.shape == tuple(t_out.shape) and h_n.shape == tuple(t_h.shape)
    assert out.dtype == h_n.dtype == np.dtype(dtype)
    d_x, d_h0 = gru.backward(np.ones_like(out), np.ones_like(h_n))
    assert d_x.shape == tuple(xt.grad.shape) and d_h0.shape == tuple(h0t.grad.shape)
    for name, p in ref.named_parameters():
        np.testing.assert_array_equal(gru.grads[name], p.grad.numpy())
    out_l, h_l = gru(x, lengths=np.zeros(0, np.int64))      # lengths for no sequence: fine too
    assert out_l.shape == out.shape and h_l.shape == h_n.shape


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,with_lengths", [
    (2, False, False, False), (3, True, True, False), (2, True, False, True),
    (3, False, True, True)])
def test_dropout_one_matches_torch_training_mode(num_layers, bidirectional, batch_first,
                                                  with_lengths, xp, device):
    """dropout = 1: every unit between layers is dropped.  torch's own nn.GRU in training mode is
    then deterministic (its masks are all zero), so scratch is checked against torch itself,
    not only against torch fed scratch's masks; output, h_n and every gradient agree."""
    rng = np.random.default_rng(num_layers)
    gru = GRU(3, 4, num_layers, batch_first=batch_first, dropout=1.0,
              bidirectional=bidirectional, dtype="float64", seed=1, xp=xp)
    ref = torch_gru_like(gru, device=device).train()
    D, B, T = gru.num_directions, 3, 5
    x = rng.standard_normal((B, T, 3) if batch_first else (T, B, 3))
    h0 = rng.standard_normal((num_layers * D, B, 4))
    d_out = rng.standard_normal(x.shape[:2] + (D * 4,))
    d_hn = rng.standard_normal(h0.shape)
    lengths = np.array([5, 2, 4]) if with_lengths else None
    out, h_n = gru(*on(xp, x, h0), lengths=lengths, training=True)
    d_x, d_h0 = gru.backward(*on(xp, d_out, d_hn))
    assert len(gru.dropout_masks) == num_layers - 1
    assert all(not m.any() for m in gru.dropout_masks)

    xt = torch.tensor(x, device=device, requires_grad=True)
    h0t = torch.tensor(h0, device=device, requires_grad=True)
    t_out, t_h = run_packed(ref, xt, h0t, lengths)            # torch's own dropout, p = 1
    ((t_out * torch.from_numpy(d_out).to(device)).sum()
     + (t_h * torch.from_numpy(d_hn).to(device)).sum()).backward()
    for name, got, want in [("output", out, t_out.detach()), ("h_n", h_n, t_h.detach()),
                            ("d_x", d_x, xt.grad), ("d_h0", d_h0, h0t.grad)]:
        assert_close(name, got, to_numpy(want), np.dtype("float64"))
    for name, p in ref.named_parameters():
        assert_close(name, gru.grads[name], to_numpy(p.grad), np.dtype("float64"))

    # and through torch fed scratch's (all-zero) masks, layer by layer
    r = torch_forward_backward(ref, x, h0, d_out, d_hn, lengths=lengths, masks=gru.dropout_masks)
    assert_close("output (masks)", out, r["output"], np.dtype("float64"))
    assert_close("d_x (masks)", d_x, r["d_x"], np.dtype("float64"))
    for name, g in r["grads"].items():
        assert_close(name + " (masks)", gru.grads[name], g, np.dtype("float64"))


def test_inference_mode_and_reused_buffers_never_leak_into_results(xp):
    """cache=False gives the same output and keeps nothing for backward; arrays handed back
    stay valid after later calls (the workspace only holds internal buffers)."""
    rng = np.random.default_rng(8)
    gru = GRU(3, 4, num_layers=2, bidirectional=True, dtype="float64", seed=2, xp=xp)
    x1, x2, d_out = on(xp, rng.standard_normal((6, 5, 3)), rng.standard_normal((6, 5, 3)),
                       rng.standard_normal((6, 5, 8)))

    def same(a, b):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))

    out1, h1 = gru(x1, lengths=[6, 2, 5, 1, 3])
    d_x1, _ = gru.backward(d_out)
    g1 = {k: v.copy() for k, v in gru.grads.items()}
    kept = [a.copy() for a in (out1, h1, d_x1)]
    out_inf, h_inf = gru(x1, lengths=[6, 2, 5, 1, 3], cache=False)
    same(out_inf, out1)
    same(h_inf, h1)
    with pytest.raises(RuntimeError, match="forward"):
        gru.backward(d_out)
    gru(x2)                                              # same shapes, other data, no lengths
    gru.backward(d_out)
    for a, b in zip((out1, h1, d_x1), kept, strict=True):
        same(a, b)
    gru(x1, lengths=[6, 2, 5, 1, 3])                      # and back: padded rows zero again
    d_x, _ = gru.backward(d_out)
    same(d_x, d_x1)
    for k in g1:
        same(gru.grads[k], g1[k])


@pytest.mark.parametrize("lengths,dropout", [(None, 0.0), ([5, 2, 7, 1], 0.4)])
def test_backward_without_output_gradient_or_dx(lengths, dropout, xp):
    """backward(None, d_h_n, need_dx=False) (a classifier head on h_n over frozen features) ==
    backward(zeros, d_h_n): the same gradients, bit for bit, and d_x None."""
    rng = np.random.default_rng(4)
    a = GRU(3, 4, num_layers=3, batch_first=True, dropout=dropout, bidirectional=True,
            dtype="float64", seed=1, xp=xp)
    b = GRU(3, 4, num_layers=3, batch_first=True, dropout=dropout, bidirectional=True,
            dtype="float64", seed=1, xp=xp)
    x, d_hn = on(xp, rng.standard_normal((4, 7, 3)), rng.standard_normal((6, 4, 4)))
    out, _ = a(x, lengths=lengths, training=True)
    b(x, lengths=lengths, training=True)
    d_x, d_h0 = a.backward(xp.zeros_like(out), d_hn)
    none_x, none_h0 = b.backward(None, d_hn, need_dx=False)
    assert none_x is None and float(abs(d_x).max()) > 0
    np.testing.assert_array_equal(to_numpy(none_h0), to_numpy(d_h0))
    for name, g in a.grads.items():
        np.testing.assert_array_equal(to_numpy(b.grads[name]), to_numpy(g))


# --------------------------------------------------------------------------------------------
# denormals
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpu_mode", [True, False], ids=["cpu-flush-to-zero", "array-flush"])
def test_backward_flushes_denormals_and_changes_nothing_else(monkeypatch, cpu_mode):
    """600 steps: the vanishing gradient falls below float32's smallest normal (1.2e-38).
    Unflushed (``FLUSH_DENORMALS = False``), the gradients of the projections hold denormals;
    flushed (the default: the CPU's flush-to-zero mode where scratch.flush_to_zero can set it,
    else the array passes of ``denormal_flush``), none is left in any array that enters a
    matrix product (d_gi, d_gh), and every result agrees with the unflushed one to float32
    rounding of its scale (values below 1.2e-38 become 0; growing back out of that range, a
    gradient carries the few lost bits as a ~1e-7 relative difference, no more than denormals'
    own lost bits).  The CPU mode is on during the backward only."""
    if cpu_mode and not flush_to_zero.supported():
        pytest.skip("the CPU mode is set on Linux/glibc/x86-64 only")
    tiny = np.finfo(np.float32).tiny
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 8, 16), dtype=np.float32)
    lengths = rng.integers(550, 601, 8)
    d_out = np.zeros((600, 8, 32), np.float32)
    d_out[[0, -1]] = 1.0
    monkeypatch.setattr(gru_module, "CPU_FLUSH_TO_ZERO", cpu_mode)
    modes = []
    scan = gru_module.scan_backward
    monkeypatch.setattr(gru_module, "scan_backward",
                        lambda *a, **k: modes.append(flush_to_zero.is_on()) or scan(*a, **k))

    def run(flush):
        monkeypatch.setattr(gru_module, "FLUSH_DENORMALS", flush)
        modes.clear()
        gru = GRU(16, 16, num_layers=2, bidirectional=True, dtype="float32", seed=0)
        gru(x, lengths=lengths)
        results = [*gru.backward(d_out), *gru.grads.values()]
        products = [a for name, a in gru.workspace._arrays.items()
                    if name.startswith(("d_gi", "d_gh"))]
        assert not flush_to_zero.is_on()                       # given back after the backward
        return results, products

    def denormal(a):
        return int(((a != 0) & (np.abs(a) < tiny)).sum())

    unflushed, products = run(False)
    assert modes == [False] * 4
    assert sum(denormal(a) for a in products) > 1000
    flushed, products = run(True)
    assert modes == [cpu_mode] * 4                             # 2 layers x 2 directions
    assert [denormal(a) for a in products] == [0] * len(products)
    for i, (got, want) in enumerate(zip(flushed, unflushed, strict=True)):
        shared_assert_close(got, want, 1e-6, f"result {i}", atol=4 * tiny, dtype=np.float32)


def test_workspace_stays_bounded_across_sequence_lengths():
    """Training on batches of ever new lengths (IMDB's: up to 512 of them) must not keep one set
    of cache arrays per length: the workspace holds as many arrays, and no more bytes than the
    longest batch needs, after 12 lengths as after one (it once kept every length's gates:
    gigabytes at full size, and the full run was killed for memory)."""
    rng = np.random.default_rng(0)
    gru = GRU(6, 5, num_layers=2, bidirectional=True, dtype="float32", seed=0)

    def step(T, training=True):
        x = rng.standard_normal((T, 3, 6)).astype(np.float32)
        gru(x, training=training, cache=training)
        if training:
            gru.backward(rng.standard_normal((T, 3, 10)).astype(np.float32))
        return gru.workspace._arrays

    def nbytes(arrays):
        return sum(a.nbytes for a in arrays.values() if a is not None)

    step(40)
    step(40, training=False)                      # inference keeps its one-step buffers apart
    names, longest = set(step(40)), nbytes(gru.workspace._arrays)
    for T in range(12, 40, 2):
        step(T)
        step(T, training=False)
    assert set(gru.workspace._arrays) == names
    assert nbytes(gru.workspace._arrays) <= longest
