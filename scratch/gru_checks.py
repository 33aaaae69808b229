"""The argument checks of :class:`scratch.gru.GRU`, kept out of the maths.

They raise what ``torch.nn.GRU`` raises (ValueError for a bad shape or value, TypeError for a
bad type), and raise where torch is silently lenient: a flag given as the string "False", a
dtype that differs from the parameters', unsorted lengths read as sorted.  Each returns the
checked value in the form the GRU computes with.
"""
from __future__ import annotations

import numbers

import numpy as np

from .backend import as_float_array, to_numpy


def check_size(name, value) -> int:
    """An int >= 1 (not a bool, not a float such as 3.0, not a string): TypeError / ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_flag(name, value) -> bool:
    """True or False only: the string "False" is truthy, and reading it as True would silently
    change the layout or the model, so it is a TypeError (torch.nn.GRU itself accepts a string
    for ``bidirectional``)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got "
                        f"{type(value).__name__} {value!r}")
    return bool(value)


def check_dropout(value) -> float:
    """A real number in [0, 1] (not a bool, not NaN)."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
            or not 0.0 <= value <= 1.0):
        raise ValueError(f"dropout must be a number in [0, 1], got {value!r}")
    return float(value)


def check_x(x, input_size, dtype, batch_first, xp):
    """x of shape (T, B, I), (B, T, I) if ``batch_first``, or (T, I) unbatched, of the GRU's
    dtype, T >= 1 -> (x as an array of ``xp``, T, B, unbatched)."""
    x = as_float_array(x, "x", xp=xp)
    if x.ndim not in (2, 3):
        layout = "(batch, time, input_size)" if batch_first else "(time, batch, input_size)"
        raise ValueError(f"x must be 3-D {layout} or 2-D (time, input_size) unbatched, "
                         f"got shape {tuple(x.shape)}")
    check_dtype("x", x, dtype)
    if x.shape[-1] != input_size:
        raise ValueError(f"x has feature size {x.shape[-1]} but input_size is {input_size}")
    unbatched = x.ndim == 2
    if unbatched:
        T, B = x.shape[0], 1
    else:
        T, B = (x.shape[1], x.shape[0]) if batch_first else x.shape[:2]
    if T == 0:
        raise ValueError("x must have at least one time step, got time=0")
    return x, T, B, unbatched


def check_h0(h0, shape, dtype, xp):
    """h0 of ``shape`` ((L D, B, H), or (L D, H) unbatched) and the GRU's dtype, or None."""
    if h0 is None:
        return None
    h0 = as_float_array(h0, "h0", xp=xp)
    if tuple(h0.shape) != shape:
        batch = ", batch" if len(shape) == 3 else ""
        raise ValueError(f"h0 must have shape {shape} (num_layers * num_directions{batch}, "
                         f"hidden_size), got {tuple(h0.shape)}")
    check_dtype("h0", h0, dtype)
    return h0


def check_dtype(name, a, dtype):
    if a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype} but the GRU's parameters are {dtype}; "
                         "convert one of them (nothing is cast silently)")


def check_lengths(lengths, T, B, enforce_sorted, unbatched):
    """lengths (B,) integers in [1, T] -> (lengths int64 in decreasing order, order) with
    ``order`` the stable sort (user row ``order[i]`` is sorted row i), None if already sorted.
    Unsorted lengths are an error if ``enforce_sorted`` (torch's default)."""
    if unbatched:
        raise ValueError("lengths needs batched input (packed sequences are batches)")
    lengths = to_numpy(lengths)
    if lengths.ndim != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must have shape ({B},) (one per sequence), got "
                         f"{tuple(lengths.shape)}")
    whole = lengths.dtype.kind in "iu" or (lengths.dtype.kind == "f"
                                           and np.all(np.isfinite(lengths))
                                           and np.all(lengths == np.round(lengths)))
    if not whole:
        raise ValueError(f"lengths must be integers, got {lengths!r}")
    lengths = lengths.astype(np.int64)
    if B and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"lengths must be in [1, {T}] (the time steps of x), got "
                         f"min {lengths.min()}, max {lengths.max()}")
    if not np.any(np.diff(lengths) > 0):
        return lengths, None
    if enforce_sorted:
        raise ValueError("lengths are not sorted in decreasing order but "
                         "enforce_sorted=True; sort the batch or pass enforce_sorted=False")
    order = np.argsort(-lengths, kind="stable")
    return lengths[order], order
