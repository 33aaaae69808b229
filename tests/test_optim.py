"""scratch.optim.Adam == torch.optim.Adam, step for step: parameters and both moments after
every step, in float64 at 1e-12 (relative to each array's largest entry), on hypothesis-drawn
shapes, hyper-parameters and gradients (zero, tiny, huge); resuming from state_dict gives the
same trajectory; bad hyper-parameters and bad states are refused.  The step-for-step comparison
runs on each backend (``xp``: NumPy beside torch on the CPU, CuPy beside torch on CUDA)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratch.backend import to_numpy
from scratch.optim import Adam

from .helpers import on

TOL64 = 1e-12


def rel_err(got, want) -> float:
    """max |got - want| / max |want| over the finite entries (0 when both are all zero); inf
    where the non-finite entries (v = inf after g^2 overflowed) differ."""
    got, want = to_numpy(got), to_numpy(want)
    bad = ~np.isfinite(want)
    if not np.array_equal(got[bad], want[bad], equal_nan=True):
        return math.inf
    got, want = got[~bad], want[~bad]
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return err / scale if scale > 0 else err


@st.composite
def adam_cases(draw):
    n_params = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
              for _ in range(n_params)]
    hyper = dict(lr=draw(st.sampled_from([1e-4, 1e-3, 0.01, 0.3])),
                 betas=(draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
                        draw(st.sampled_from([0.0, 0.9, 0.999, 0.9999]))),
                 eps=draw(st.sampled_from([1e-12, 1e-8, 1e-3])),
                 weight_decay=draw(st.sampled_from([0.0, 0.0, 0.01, 0.5])),
                 amsgrad=draw(st.booleans()))
    steps = draw(st.integers(1, 8))
    # per step and parameter: gradient scale (zero, tiny: g^2 underflows to 0, normal, huge:
    # g^2 near the float64 maximum; overflow to inf has its own test below),
    # and whether the parameter gets a gradient at all this step (torch skips None)
    scales = [[draw(st.sampled_from([0.0, 1e-200, 1e-8, 1.0, 1e3, 1e150])) for _ in shapes]
              for _ in range(steps)]
    present = [[draw(st.integers(0, 7)) > 0 for _ in shapes] for _ in range(steps)]
    return dict(shapes=shapes, hyper=hyper, scales=scales, present=present,
                seed=draw(st.integers(0, 2 ** 32 - 1)))


def make(c):
    rng = np.random.default_rng(c["seed"])
    params = {f"p{i}": rng.standard_normal(s) for i, s in enumerate(c["shapes"])}
    grads = [{f"p{i}": (rng.standard_normal(s) * sc if on else None)
              for i, (s, sc, on) in enumerate(zip(c["shapes"], scales, present, strict=True))}
             for scales, present in zip(c["scales"], c["present"], strict=True)]
    return params, grads


def torch_trajectory(params, grads, hyper, device="cpu"):
    """torch.optim.Adam on copies (on ``device``): [(params, exp_avg, exp_avg_sq) per step]."""
    ts = {k: torch.tensor(v, requires_grad=True, device=device) for k, v in params.items()}
    opt = torch.optim.Adam(list(ts.values()), **hyper)
    out = []
    for g in grads:
        for k, t in ts.items():
            t.grad = None if g[k] is None else torch.tensor(g[k], device=device)
        opt.step()
        st_ = {k: opt.state.get(t, {}) for k, t in ts.items()}
        out.append({k: (to_numpy(t).copy(),
                        to_numpy(st_[k]["exp_avg"]).copy() if st_[k] else None,
                        to_numpy(st_[k]["exp_avg_sq"]).copy() if st_[k] else None)
                    for k, t in ts.items()})
    return out


def assert_same(scratch: Adam, params, want, step):
    for k, (p, m, v) in want.items():
        assert rel_err(params[k], p) <= TOL64, (step, k, "param", rel_err(params[k], p))
        if m is None:
            assert k not in scratch.state
            continue
        s = scratch.state[k]
        assert rel_err(s["exp_avg"], m) <= TOL64, (step, k, "m")
        assert rel_err(s["exp_avg_sq"], v) <= TOL64, (step, k, "v")


@settings(max_examples=150)
@given(adam_cases())
def test_adam_matches_torch_step_for_step_float64(xp, device, c):
    params, grads = make(c)
    want = torch_trajectory(params, grads, c["hyper"], device)
    ours = {k: xp.array(v) for k, v in params.items()}
    opt = Adam(ours, **c["hyper"])
    for i, g in enumerate(grads):
        opt.step({k: on(xp, a) for k, a in g.items()})
        assert_same(opt, ours, want[i], i)
        for k, s in opt.state.items():
            assert s["step"] == sum(gs[k] is not None for gs in grads[:i + 1])


@settings(max_examples=40)
@given(adam_cases(), st.data())
def test_resume_from_state_dict_gives_the_same_trajectory(c, data):
    """Run all steps; separately run k steps, save params + state_dict, load both into a new
    Adam over new arrays, run the rest: identical (bit for bit) parameters."""
    params, grads = make(c)
    k = data.draw(st.integers(0, len(grads)))
    straight = {n: v.copy() for n, v in params.items()}
    opt = Adam(straight, **c["hyper"])
    for g in grads:
        opt.step(g)
    first = {n: v.copy() for n, v in params.items()}
    opt1 = Adam(first, **c["hyper"])
    for g in grads[:k]:
        opt1.step(g)
    saved_params, saved = {n: v.copy() for n, v in first.items()}, opt1.state_dict()
    for g in grads[k:]:                      # the first run goes on: the saved copy must not move
        opt1.step(g)
    resumed = {n: v.copy() for n, v in saved_params.items()}
    opt2 = Adam(resumed, lr=0.5, betas=(0.1, 0.2), eps=1.0)   # hyper-parameters come from the state
    opt2.load_state_dict(saved)
    for g in grads[k:]:
        opt2.step(g)
    for n in params:
        np.testing.assert_array_equal(resumed[n], straight[n])


def test_gradient_whose_square_overflows_freezes_the_entry_as_in_torch():
    """g = 1e200: g^2 = inf, so v = inf and the entry stops moving (m / inf = 0), in torch and
    here alike, without a warning; the other entries go on normally."""
    params = {"w": np.array([1.0, 2.0])}
    grads = [{"w": np.array([1e200, 1.0])}, {"w": np.array([1.0, -1.0])}]
    want = torch_trajectory(params, grads, dict(lr=0.1))
    opt = Adam(params, lr=0.1)
    for i, g in enumerate(grads):
        opt.step(g)
        assert_same(opt, params, want[i], i)
    assert np.isinf(opt.state["w"]["exp_avg_sq"][0]) and params["w"][0] == 1.0


def test_float32_follows_torch_float32():
    """float32 arrays stay float32; torch in float32 agrees to float32 rounding (a few ulp of
    the parameter per step, over 10 steps: 1e-6 relative)."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal((7, 5)).astype(np.float32)
    t = torch.tensor(p, requires_grad=True)
    topt = torch.optim.Adam([t], lr=0.01, weight_decay=0.1)
    ours = {"w": p.copy()}
    opt = Adam(ours, lr=0.01, weight_decay=0.1)
    for _ in range(10):
        g = rng.standard_normal(p.shape).astype(np.float32)
        t.grad = torch.tensor(g)
        topt.step()
        opt.step({"w": g})
        assert ours["w"].dtype == np.float32 and opt.state["w"]["exp_avg"].dtype == np.float32
    assert rel_err(ours["w"], t.detach().numpy()) <= 1e-6


def test_first_step_is_lr_times_sign():
    """An independent check of the equations: at t = 1, m_hat = g and sqrt(v_hat) = |g|, so
    each entry moves by lr * g / (|g| + eps), almost exactly lr against the gradient's sign."""
    g = np.array([3.0, -0.5, 1e-3])
    p = {"w": np.zeros(3)}
    Adam(p, lr=0.1, eps=1e-8).step({"w": g})
    np.testing.assert_allclose(p["w"], -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-15)


def test_parameters_are_updated_in_place():
    w = np.ones(4)
    params = {"w": w}
    Adam(params).step({"w": np.ones(4)})
    assert params["w"] is w and np.all(w < 1)


@pytest.mark.parametrize("kw,msg", [
    (dict(lr=-1.0), "learning rate"), (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9,)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay")])
def test_invalid_hyper_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Adam({"w": np.zeros(2)}, **kw)


def test_bad_gradients_and_states_are_refused():
    params = {"w": np.zeros((2, 3))}
    opt = Adam(params)
    with pytest.raises(ValueError, match="unknown"):
        opt.step({"v": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": np.zeros(3)})
    opt.step({"w": np.ones((2, 3))})
    good = opt.state_dict()
    bad_shape = {"hyper": good["hyper"],
                 "state": {"w": dict(good["state"]["w"], exp_avg=np.zeros(6))}}
    bad_key = {"hyper": good["hyper"], "state": {"x": good["state"]["w"]}}
    bad_nan = {"hyper": good["hyper"], "state": {"w": dict(good["state"]["w"],
                                                          exp_avg_sq=np.full((2, 3), math.nan))}}
    for sd, msg in ((bad_shape, "shape"), (bad_key, "unknown"), (bad_nan, "NaN"),
                    ({"state": {}}, "incomplete")):
        with pytest.raises(ValueError, match=msg):
            Adam({"w": np.zeros((2, 3))}).load_state_dict(sd)
    fresh = Adam({"w": np.zeros((2, 3))})
    fresh.load_state_dict(good)
    assert fresh.state["w"]["step"] == 1
    np.testing.assert_array_equal(fresh.state["w"]["exp_avg"], opt.state["w"]["exp_avg"])
