"""scratch.flush_to_zero: the CPU's flush-to-zero / denormals-are-zero mode on the calling thread,
set through glibc's fenv, restored on exit."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from scratch import flush_to_zero as ftz

TINY = np.finfo(np.float32).tiny                    # 1.2e-38, the smallest normal float32
needs_mode = pytest.mark.skipif(not ftz.supported(),
                                reason="the CPU mode is set on Linux/glibc/x86-64 only")


def underflows() -> tuple[float, float]:
    """(a product whose exact value is denormal, a denormal operand times 1), in float32."""
    a = np.full(8, 1e-30, np.float32) * np.float32(1e-10)           # 1e-40: a denormal result
    b = np.full(8, 1e-40, np.float32) * np.float32(1.0)             # a denormal operand
    return float(a[0]), float(b[0])


def test_outside_the_block_numpy_computes_denormals():
    assert not ftz.is_on()
    a, b = underflows()
    assert 0 < a < TINY and 0 < b < TINY


@needs_mode
def test_inside_the_block_results_and_operands_below_tiny_are_zero_and_normals_are_unchanged():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    before = x * np.float32(1e-30)                                # normal: down to ~1e-34
    with ftz.flush_to_zero() as on:
        assert on and ftz.is_on()
        assert underflows() == (0.0, 0.0)
        inside = x * np.float32(1e-30)
        np.testing.assert_array_equal(inside, before)             # normal numbers: exact
        assert float(np.float32(2 * TINY) / np.float32(2)) == float(TINY)   # tiny itself stays
    assert not ftz.is_on()
    a, b = underflows()
    assert 0 < a < TINY and 0 < b < TINY                          # restored


@needs_mode
def test_restored_after_an_exception_and_when_nested():
    with pytest.raises(ZeroDivisionError), ftz.flush_to_zero():
        raise ZeroDivisionError
    assert not ftz.is_on()
    with ftz.flush_to_zero():
        with ftz.flush_to_zero():
            assert ftz.is_on()
        assert ftz.is_on() and underflows() == (0.0, 0.0)         # the outer block still on
    assert not ftz.is_on()


@needs_mode
def test_the_mode_is_the_calling_threads_only():
    seen = {}

    def other():
        seen["other"] = (ftz.is_on(), underflows()[0] > 0)

    with ftz.flush_to_zero():
        t = threading.Thread(target=other)       # created inside: POSIX threads inherit the
        t.start()                                 # creator's floating-point environment
        t.join()
    assert seen["other"] == (True, False)
    started = threading.Event()
    go, done = threading.Event(), threading.Event()

    def worker():                                 # started before the block: keeps its own mode
        started.set()
        go.wait()
        seen["worker"] = (ftz.is_on(), underflows()[0] > 0)
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    with ftz.flush_to_zero():
        go.set()
        done.wait()
    t.join()
    assert seen["worker"] == (False, True)


def test_disabled_or_unsupported_changes_nothing(monkeypatch):
    with ftz.flush_to_zero(enabled=False) as on:
        assert on is False and underflows()[0] > 0
    monkeypatch.setattr(ftz, "_libm", lambda: None)               # e.g. macOS, Windows, arm64
    assert not ftz.supported() and not ftz.is_on()
    with ftz.flush_to_zero() as on:
        assert on is False and underflows()[0] > 0
