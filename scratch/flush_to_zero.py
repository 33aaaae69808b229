r"""The CPU's flush-to-zero mode for NumPy, on the calling thread, while a block runs.

x86 CPUs compute on *denormal* float32 numbers (nonzero, below the smallest normal number
2^-126 ~ 1.2e-38) through microcode assists, many times slower than on normal numbers on some
cores.  Two bits of the SSE control register MXCSR switch that off::

    FTZ  (bit 15, 0x8000)  flush-to-zero:       a result below 1.2e-38 is written as 0
    DAZ  (bit 6,  0x0040)  denormals-are-zero:  a denormal operand is read as 0

``torch.set_flush_denormal(True)`` sets both; NumPy has no switch.  MXCSR belongs to a thread,
and the C library reads and writes it through ``fegetenv`` / ``fesetenv``: glibc's x86-64
``fenv_t`` is the 28-byte x87 environment followed by the 32-bit MXCSR (``bits/fenv.h``; part
of the ABI, so it does not move), and ``fesetenv`` loads that word as given.  ctypes calls the
two functions, so no compiled code is needed::

    env = fegetenv()                 (8 x uint32; env[7] is MXCSR)
    env[7] |= FTZ | DAZ ; fesetenv(env)     ... the block ...     fesetenv(saved)

What it reaches: NumPy's element-wise ufuncs and single-threaded BLAS calls run on the calling
thread, so both compute without denormals inside the block.  BLAS *worker* threads (OpenBLAS
with more than one thread, started at import) keep their own MXCSR.  In the GRU's backward
every operand of a matrix product is written by the calling thread (FTZ: never denormal), and
a denormal that a worker writes into a product's result is read by the calling thread as 0
(DAZ): no denormal enters a product or the next step; only a worker's own output may still
underflow on the way (the tail of a sum, not the bulk of the gradient).

Elsewhere (not Linux with glibc on x86-64) :func:`flush_to_zero` does nothing and says so
(it yields False); callers then flush arrays themselves.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import sys

FTZ, DAZ = 0x8000, 0x0040
MXCSR_WORD = 7                   # fenv_t as 8 x uint32 on glibc x86-64: MXCSR is the last word


@functools.cache
def _libm():
    """glibc's libm (fegetenv, fesetenv) on Linux x86-64, or None where the layout above is not
    known to hold."""
    if (sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64")
            or platform.libc_ver()[0] != "glibc"):
        return None
    name = ctypes.util.find_library("m")
    return ctypes.CDLL(name) if name else None


def supported() -> bool:
    """True where :func:`flush_to_zero` can set the mode (Linux, glibc, x86-64)."""
    return _libm() is not None


def _get_env():
    env = (ctypes.c_uint32 * 8)()
    if _libm().fegetenv(env) != 0:
        raise OSError("fegetenv failed")
    return env


def _set_env(env):
    if _libm().fesetenv(env) != 0:
        raise OSError("fesetenv failed")


def is_on() -> bool:
    """True when both FTZ and DAZ are set on the calling thread."""
    return supported() and _get_env()[MXCSR_WORD] & (FTZ | DAZ) == FTZ | DAZ


@contextlib.contextmanager
def flush_to_zero(enabled: bool = True):
    """Inside the block, on the calling thread: float32 (and float64) results below the
    smallest normal number are 0 and denormal operands read as 0.  The thread's previous
    control word is restored on exit, exceptions included (nesting is safe).  Yields True when
    the mode is on, False where it is unsupported or ``enabled`` is False (nothing changed)."""
    if not (enabled and supported()):
        yield False
        return
    saved = _get_env()
    env = (ctypes.c_uint32 * 8)(*saved)
    env[MXCSR_WORD] |= FTZ | DAZ
    _set_env(env)
    try:
        yield True
    finally:
        _set_env(saved)
