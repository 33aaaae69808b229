r"""``torch.nn.GRU`` from scratch: forward and backward through time, fast, in NumPy or CuPy.

One step is :mod:`scratch.gru_cell` (equations there, torch's: ``b_hn`` inside the reset gate,
gates stacked r | z | n).  This module runs that step over whole sequences, for stacked layers
and both directions, with ``pack_padded_sequence`` semantics when ``lengths`` are given.

Shapes (time-major; ``batch_first`` only transposes the input and the output)::

    x    (T, B, I)          output (T, B, D H)       D = 2 if bidirectional else 1
    h0   (L D, B, H)        h_n    (L D, B, H)       ordered [l0 fwd, l0 bwd, l1 fwd, ...]

Where the time goes, and what is done about it:

* The input projections of all T steps of a layer, both directions at once, are **one** matrix
  product ``(T B, I) x (I, D 3H)``; so are, in the backward, dx and dW_ih.  dW_hh is one product
  per direction after the loop.  Only ``h W_hh^T`` (forward) and ``dgh W_hh`` (backward) run
  per step.
* The per-step element-wise work writes into preallocated buffers (``out=``), never a fresh
  array; gates are stored where they are computed, ready for the backward.  The big arrays
  (cache, gradients of the projections) live in a :class:`Workspace` reused from call to call,
  so the OS does not have to hand out and zero ~1 GB of fresh pages per training step.
  ``cache=False`` (inference) keeps one step's gates instead of all of them.
* ``b_hr`` and ``b_hz`` are added outside the reset product, so they are folded into the input
  projection's bias; only ``b_hn`` is added per step.
* ``lengths``: the batch is put in decreasing-length order once, so at step t the sequences
  still running are a *prefix* of the batch, ``n_t = #{b : L_b > t}``, and the step computes on
  ``[:n_t]`` only.  Finished sequences keep their state untouched (that is the forward
  direction's h_n, taken at step L_b - 1); the reverse direction walks t = T-1 .. 0 and a
  sequence joins, from its h0, when t = L_b - 1.  The layer inputs are packed first (the valid
  (t, b) rows, time-major: torch's ``PackedSequence.data`` layout), so the input projection,
  dx and dW_ih are still one product each, over valid rows only.  Padded steps cost nothing:
  scratch with lengths costs less than without.
* sigmoid is evaluated in place as ``(1 + tanh(x / 2)) / 2``: no overflow for any finite x, four
  vectorised passes (:func:`scratch.functional.sigmoid`, the readable stable form, is used by
  the cell reference and is ~15x slower on float32 here).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import array_module, as_float_array, float_dtype, get_xp, state_arrays, to_numpy
from .gru_cell import split3


def _sigmoid_(a, xp=np):
    """In place: a <- sigmoid(a) = (1 + tanh(a / 2)) / 2, ``xp`` a's array module."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5


def packed_starts(n_active):
    """s_t = n_0 + ... + n_{t-1}: where step t's rows start in the packed (N, F) layout."""
    return np.concatenate([[0], np.cumsum(n_active[:-1])]).astype(int).tolist()


# --------------------------------------------------------------------------------------------
# One layer, one direction: the scan and its backward, side by side.
# --------------------------------------------------------------------------------------------

def scan_forward(gi, w_hh, b_hn, h0, out, n_active, reverse=False, gates=None, g_hn=None):
    r"""Run the recurrence of one direction of one layer.

    gi (N, 3H): ``x_t W_ih^T + b_ih + [b_hr, b_hz, 0]`` for the N = sum_t n_t valid (t, b)
    pairs, time-major: torch's ``PackedSequence.data`` layout, where step t's rows are
    ``gi[s_t : s_t + n_t]`` with s_t = n_0 + ... + n_{t-1} (without lengths: (T B, 3H), the
    (T, B, 3H) array flattened).  w_hh (3H, H), b_hn (H,), h0 (B, H).  ``out`` (T, B, H), a view to write h_t into (and 0
    where a sequence has ended).  ``n_active[t]``: rows [:n_t] run at step t (sorted batch).
    ``gates`` (T, B, 3H) and ``g_hn`` (T, B, H): where to keep the cache (allocated if None);
    with a leading 1 instead of T, every step overwrites the same slot (inference: no cache).

    Per step, on the running rows::

        g   = h W_hh^T                                        one (n, H) x (H, 3H) product
        r, z = sigmoid(gi_r + g_r), sigmoid(gi_z + g_z)       -> gates[t, :, :2H]
        g_n = g[:, 2H:] + b_hn                                -> g_hn[t]
        n   = tanh(gi_n + r * g_n)                            -> gates[t, :, 2H:]
        h   = n + z * (h - n)                                 -> out[t], in place in h

    Returns (h_T, gates (T, B, 3H) = [r | z | n], g_hn (T, B, H)): the cache of the backward.
    """
    xp = array_module(gi)
    T, B, H3 = len(n_active), h0.shape[0], gi.shape[1]
    H = H3 // 3
    starts = packed_starts(n_active)
    if gates is None:
        gates = xp.empty((T, B, H3), dtype=gi.dtype)
        g_hn = xp.empty((T, B, H), dtype=gi.dtype)
    keep = gates.shape[0] == T
    h = h0.copy()
    g_buf = xp.empty((B, H3), dtype=gi.dtype)
    tmp_buf = xp.empty((B, H), dtype=gi.dtype)
    w_t = w_hh.T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        m, s = n_active[t], t if keep else 0
        if m < B:
            out[t, m:] = 0                              # ended (or not yet started)
        if m == 0:
            continue
        hb, g, tmp, gt, it = h[:m], g_buf[:m], tmp_buf[:m], gates[s, :m], gi[starts[t]:starts[t] + m]
        xp.matmul(hb, w_t, out=g)
        rz = gt[:, :2 * H]
        xp.add(it[:, :2 * H], g[:, :2 * H], out=rz)
        _sigmoid_(rz, xp)
        r, z, n = gt[:, :H], gt[:, H:2 * H], gt[:, 2 * H:]
        ghn = g_hn[s, :m]
        xp.add(g[:, 2 * H:], b_hn, out=ghn)
        xp.multiply(r, ghn, out=n)
        n += it[:, 2 * H:]
        xp.tanh(n, out=n)
        xp.subtract(hb, n, out=tmp)
        tmp *= z
        xp.add(n, tmp, out=hb)
        out[t, :m] = hb
    return h, gates, g_hn


def scan_backward(d_out, dh_n, gates, g_hn, h_prev, w_hh, dgi, dgh, n_active, reverse=False):
    r"""Backpropagation through time for :func:`scan_forward`, steps in reverse order.

    d_out (T, B, H) or None: dL/d out; dh_n (B, H): dL/d h_T.  ``h_prev(t, m)`` gives the state
    that entered step t, rows [:m].  Writes, for every step, into dgi (N, 3H) = [da_r, da_z,
    da_n] (packed like :func:`scan_forward`'s gi) and dgh (T, B, 3H) = [da_r, da_z, da_n * r]
    (the gradients of the input and recurrent projections; dgh's rows that do not run are set
    to 0).  Per step, running rows::

        dh  += d_out[t]
        da_n = dh (1 - z) (1 - n^2)
        da_z = dh (h_prev - n) z (1 - z)
        da_r = da_n g_hn r (1 - r)
        dh   = dh z + dgh W_hh                               one (n, 3H) x (3H, H) product

    Rows that have ended keep dh unchanged (their state passed through).  Returns dL/dh0.
    """
    xp = array_module(gates)
    T, B, H3 = gates.shape
    H = H3 // 3
    starts = packed_starts(n_active)
    dh = dh_n.copy()
    omz_buf = xp.empty((B, H), dtype=gates.dtype)
    tmp_buf = xp.empty((B, H), dtype=gates.dtype)
    mm_buf = xp.empty((B, H), dtype=gates.dtype)
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        m = n_active[t]
        if m < B:
            dgh[t, m:] = 0
        if m == 0:
            continue
        dhb, omz, tmp, mm = dh[:m], omz_buf[:m], tmp_buf[:m], mm_buf[:m]
        if d_out is not None:
            dhb += d_out[t, :m]
        r, z, n = split3(gates[t, :m])
        gi_t, gh_t = dgi[starts[t]:starts[t] + m], dgh[t, :m]
        da_r, da_z, da_n = split3(gi_t)
        xp.subtract(1, z, out=omz)                     # 1 - z
        xp.multiply(n, n, out=da_n)                    # da_n = dh (1 - z) (1 - n^2)
        xp.subtract(1, da_n, out=da_n)
        da_n *= omz
        da_n *= dhb
        xp.subtract(h_prev(t, m), n, out=da_z)         # da_z = dh (h_prev - n) z (1 - z)
        da_z *= dhb
        da_z *= z
        da_z *= omz
        xp.subtract(1, r, out=tmp)                     # da_r = da_n g_hn r (1 - r)
        tmp *= r
        xp.multiply(da_n, g_hn[t, :m], out=da_r)
        da_r *= tmp
        gh_t[:, :2 * H] = gi_t[:, :2 * H]
        xp.multiply(da_n, r, out=gh_t[:, 2 * H:])
        dhb *= z                                       # dh = dh z + dgh W_hh
        xp.matmul(gh_t, w_hh, out=mm)
        dhb += mm
    return dh


class Workspace:
    """Big arrays kept from one call to the next and reused when the shape and dtype match.

    A forward + backward at the assignment's shape needs ~1 GB of cache and gradient arrays;
    fresh ones every call cost a page fault (and the OS zeroing the page) on the first touch of
    every 4 KiB, a fifth of the run time.  Nothing handed back to the caller lives here.
    """

    def __init__(self):
        self._arrays = {}

    def get(self, name, shape, dtype, xp):
        a = self._arrays.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype or array_module(a) is not xp:
            self._arrays[name] = None                   # free the old one first
            a = self._arrays[name] = xp.empty(shape, dtype=dtype)
        return a

    def clear(self):
        self._arrays.clear()


# --------------------------------------------------------------------------------------------
# The module.
# --------------------------------------------------------------------------------------------

class GRU:
    """``torch.nn.GRU`` in NumPy/CuPy: same constructor, parameter names, shapes, init and
    semantics, plus :meth:`backward`.

    ``gru(x, h0=None, lengths=None, training=False)`` -> (output, h_n);
    ``gru.backward(d_output, d_h_n=None)`` -> (d_x, d_h0), filling ``gru.grads``.

    Parameters are ``weight_ih_l{k}`` (3H, I_k), ``weight_hh_l{k}`` (3H, H), ``bias_ih_l{k}``,
    ``bias_hh_l{k}`` (3H,), with ``_reverse`` for the backward direction; every entry is drawn
    from U(-1/sqrt(H), 1/sqrt(H)) like torch (from ``seed``).  Dropout (between layers, only
    when ``training=True``) draws its masks from the same seeded generator and records them
    in ``dropout_masks`` (one per layer but the last, the layer output's shape and layout,
    values 0 or 1 / (1 - p)), so torch can be made to apply the very same masks.

    Beyond torch's signature: ``lengths`` and ``enforce_sorted`` (packed sequences),
    ``training`` (dropout), ``cache=False`` (inference), ``seed``, ``xp`` (array module), and
    ``workspace`` (big buffers kept between calls; ``gru.workspace.clear()`` frees them).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 dtype="float32", seed=None, xp=None):
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers, self.bias = int(num_layers), bool(bias)
        self.batch_first, self.dropout = bool(batch_first), float(dropout)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.dtype = float_dtype(dtype)
        self.xp = xp if xp is not None else get_xp()
        self.generator = np.random.default_rng(seed)
        k = 1.0 / math.sqrt(hidden_size)
        self.params = {name: self.xp.asarray(
            self.generator.uniform(-k, k, size=shape).astype(self.dtype))
            for name, shape in self.param_shapes().items()}
        self.grads: dict = {}
        self.dropout_masks: list = []
        self._cache = None
        self.workspace = Workspace()

    # ---- parameters ------------------------------------------------------------------------

    def _suffixes(self):
        return ("", "_reverse")[:self.num_directions]

    def param_shapes(self) -> dict:
        """{name: shape} in torch's order."""
        H, D = self.hidden_size, self.num_directions
        shapes = {}
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else D * H
            for sfx in self._suffixes():
                shapes[f"weight_ih_l{layer}{sfx}"] = (3 * H, in_size)
                shapes[f"weight_hh_l{layer}{sfx}"] = (3 * H, H)
                if self.bias:
                    shapes[f"bias_ih_l{layer}{sfx}"] = (3 * H,)
                    shapes[f"bias_hh_l{layer}{sfx}"] = (3 * H,)
        return shapes

    def state_dict(self) -> dict:
        """{name: array} (copies), torch's names and order."""
        return {name: p.copy() for name, p in self.params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Load torch tensors or arrays (cast to this GRU's dtype).  A missing, unexpected or
        mis-shaped entry is a ValueError naming it; nothing is changed then."""
        new = state_arrays(state_dict, self.param_shapes(), self.dtype, self.xp)
        self.params = {name: arr.copy() for name, arr in new.items()}

    def _layer(self, layer):
        """Per direction of ``layer``: (W_ih, W_hh, b_ih or None, b_hh or None)."""
        p = self.params
        return [(p[f"weight_ih_l{layer}{s}"], p[f"weight_hh_l{layer}{s}"],
                 p.get(f"bias_ih_l{layer}{s}"), p.get(f"bias_hh_l{layer}{s}"))
                for s in self._suffixes()]

    # ---- input checks ----------------------------------------------------------------------

    def _check_input(self, x, h0, lengths, enforce_sorted):
        xp = self.xp
        x = as_float_array(x, "x", xp=xp)
        if x.ndim not in (2, 3):
            layout = "(batch, time, input_size)" if self.batch_first else "(time, batch, input_size)"
            raise ValueError(f"x must be 3-D {layout} or 2-D (time, input_size) unbatched, "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the GRU's parameters are {self.dtype}; "
                             "convert one of them (nothing is cast silently)")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"x has feature size {x.shape[-1]} but input_size is "
                             f"{self.input_size}")
        unbatched = x.ndim == 2
        if unbatched:
            x = x[:, None, :]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        T, B = x.shape[0], x.shape[1]
        if T == 0 or B == 0:
            raise ValueError(f"x must have at least one time step and one sequence, got "
                             f"time={T}, batch={B}")
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        if h0 is None:
            h0 = xp.zeros((LD, B, H), dtype=self.dtype)
        else:
            h0 = as_float_array(h0, "h0", xp=xp)
            want = (LD, H) if unbatched else (LD, B, H)
            if tuple(h0.shape) != want:
                raise ValueError(f"h0 must have shape {want} (num_layers * num_directions"
                                 f"{'' if unbatched else ', batch'}, hidden_size), got "
                                 f"{tuple(h0.shape)}")
            if h0.dtype != self.dtype:
                raise ValueError(f"h0 has dtype {h0.dtype} but the GRU's parameters are "
                                 f"{self.dtype}")
            if unbatched:
                h0 = h0[:, None, :]
        order = None
        if lengths is None:
            n_active = [B] * T
        else:
            if unbatched:
                raise ValueError("lengths needs batched input (packed sequences are batches)")
            lengths = to_numpy(lengths)
            if lengths.ndim != 1 or lengths.shape[0] != B:
                raise ValueError(f"lengths must have shape ({B},) (one per sequence), got "
                                 f"{tuple(lengths.shape)}")
            if lengths.dtype.kind not in "iu" and not (
                    lengths.dtype.kind == "f" and np.all(np.isfinite(lengths))
                    and np.all(lengths == np.round(lengths))):
                raise ValueError(f"lengths must be integers, got {lengths!r}")
            lengths = lengths.astype(np.int64)
            if lengths.min() < 1 or lengths.max() > T:
                raise ValueError(f"lengths must be in [1, {T}] (the time steps of x), got "
                                 f"min {lengths.min()}, max {lengths.max()}")
            if np.any(np.diff(lengths) > 0):
                if enforce_sorted:
                    raise ValueError("lengths are not sorted in decreasing order but "
                                     "enforce_sorted=True; sort the batch or pass "
                                     "enforce_sorted=False")
                order_np = np.argsort(-lengths, kind="stable")
                lengths = lengths[order_np]
                order = xp.asarray(order_np)              # index arrays live with the data
                x, h0 = x[:, order], h0[:, order]
            # n_active[t] = #{b : L_b > t}: with decreasing lengths, rows [:n_t] run at step t
            n_active = np.searchsorted(-lengths, -np.arange(T), side="left").tolist()
        return xp.ascontiguousarray(x), h0, lengths, order, n_active, unbatched

    # ---- forward ---------------------------------------------------------------------------

    def __call__(self, x, h0=None, lengths=None, training: bool = False,
                 enforce_sorted: bool = False, cache: bool = True):
        return self.forward(x, h0, lengths, training, enforce_sorted, cache)

    def forward(self, x, h0=None, lengths=None, training: bool = False,
                enforce_sorted: bool = False, cache: bool = True):
        r"""(output, h_n), as ``torch.nn.GRU`` (with ``pack_padded_sequence`` if ``lengths``).

        x: (T, B, I) [(B, T, I) if batch_first] or (T, I) unbatched; h0: (L D, B, H) or
        (L D, H), zeros if None.  lengths: (B,) ints in [1, T]; then output is zero past each
        sequence's end (it keeps T steps, like ``pad_packed_sequence(total_length=T)``).
        ``enforce_sorted=True`` makes unsorted lengths an error (as torch's default);
        otherwise any order is fine.  ``cache=False``: inference, keep nothing for
        :meth:`backward` (as torch under ``no_grad``).

        Layer k, with u the layer input (x, or the previous layer's output, dropped out if
        training)::

            GI = u W^T + c     W = [W_ih_fwd; W_ih_bwd] (D 3H, I_k), c = b_ih + [b_hr, b_hz, 0]
            output[..., dH:(d+1)H], h_n[k D + d] = scan(GI[..., d 3H:(d+1) 3H]) per direction d
        """
        xp, H, D, dt = self.xp, self.hidden_size, self.num_directions, self.dtype
        x, h0, lengths, order, n_active, unbatched = self._check_input(
            x, h0, lengths, enforce_sorted)
        T, B = x.shape[0], x.shape[1]
        ws = self.workspace
        # valid (t, b) pairs, if any padding: the layers' inputs are packed (N, I) time-major
        valid = None if sum(n_active) == T * B else xp.asarray(
            np.arange(B)[None, :] < np.asarray(n_active)[:, None])
        h_n = xp.empty_like(h0)
        layers, self.dropout_masks, self._cache = [], [], None
        u = x
        for layer in range(self.num_layers):
            dirs = self._layer(layer)
            w_cat = xp.concatenate([w_ih for w_ih, _, _, _ in dirs], axis=0)       # (D 3H, I)
            u_p = self._pack(u, valid)                          # (N, I_k)
            gi = ws.get("gi", (u_p.shape[0], D * 3 * H), dt, xp)
            xp.matmul(u_p, w_cat.T, out=gi)                     # all steps: one product
            if self.bias:
                gi += xp.concatenate([b_ih + xp.concatenate([b_hh[:2 * H], 0 * b_hh[2 * H:]])
                                      for _, _, b_ih, b_hh in dirs])
            last = layer == self.num_layers - 1
            out = (xp.empty((T, B, D * H), dtype=dt) if last    # handed back: never reused
                   else ws.get(f"out{layer}", (T, B, D * H), dt, xp))
            caches = []
            for d, (_, w_hh, _, b_hh) in enumerate(dirs):
                b_hn = b_hh[2 * H:] if self.bias else xp.zeros(H, dtype=dt)
                idx, slots = layer * D + d, T if cache else 1
                h_last, gates, g_hn = scan_forward(
                    gi[:, d * 3 * H:(d + 1) * 3 * H], w_hh, b_hn, h0[idx],
                    out[..., d * H:(d + 1) * H], n_active, reverse=d == 1,
                    gates=ws.get(f"gates{layer}.{d}.{slots}", (slots, B, 3 * H), dt, xp),
                    g_hn=ws.get(f"g_hn{layer}.{d}.{slots}", (slots, B, H), dt, xp))
                h_n[idx] = h_last
                caches.append((gates, g_hn))
            layers.append((u_p, out, caches))
            u = out
            if training and self.dropout > 0 and layer < self.num_layers - 1:
                mask = self._draw_mask(out.shape, B, T, order, unbatched)
                u = out * mask
        if cache:
            self._cache = dict(layers=layers, h0=h0, lengths=lengths, order=order, valid=valid,
                               n_active=n_active, unbatched=unbatched, T=T, B=B)
        return self._to_user(u, order, unbatched, time_major=False), \
            self._h_to_user(h_n, order, unbatched)

    def _draw_mask(self, shape, B, T, order, unbatched):
        """A dropout mask, drawn and recorded in the user's layout; returned time-major and in
        the internal (sorted) batch order."""
        p = self.dropout
        T, B, F = shape
        user_shape = (T, F) if unbatched else ((B, T, F) if self.batch_first else (T, B, F))
        keep = self.generator.random(user_shape) >= p
        mask = self.xp.asarray((keep / (1.0 - p)).astype(self.dtype))
        self.dropout_masks.append(mask)
        if unbatched:
            return mask[:, None, :]
        m = mask.transpose(1, 0, 2) if self.batch_first else mask
        return m[:, order] if order is not None else m

    def _to_user(self, a, order, unbatched, time_major):
        """Internal (T, B, F), sorted batch -> the user's layout and batch order."""
        if order is not None:
            a = a[:, self.xp.argsort(order)]
        if unbatched:
            return a[:, 0]
        return a.transpose(1, 0, 2) if self.batch_first and not time_major else a

    def _h_to_user(self, h, order, unbatched):
        if order is not None:
            h = h[:, self.xp.argsort(order)]
        return h[:, 0] if unbatched else h

    # ---- backward --------------------------------------------------------------------------

    def backward(self, d_output, d_h_n=None, need_dx: bool = True):
        r"""(d_x, d_h0) after :meth:`forward`; fills ``self.grads`` ({name: array}, replaced,
        not accumulated).  d_output: the output's shape, or None (zero: only h_n is used, as
        in a classifier head); d_h_n: h_n's shape or None (zero).  ``need_dx=False`` skips the
        first layer's input gradient (a frozen encoder's features) and returns d_x = None.

        Layer k, last to first (dL/d output of layer k comes from layer k+1's dx)::

            dgi, dgh, dh0[k D + d] = scan_backward(...) per direction d
            dW_ih = dgi^T u      db_ih = sum dgi      du = dgi W      (one product each)
            dW_hh = sum_t dgh_t^T h_{t-1}             db_hh = sum dgh
        """
        if self._cache is None:
            raise RuntimeError("call forward (with cache=True) before backward")
        c, xp, H, D = self._cache, self.xp, self.hidden_size, self.num_directions
        T, B, order, n_active, unbatched = c["T"], c["B"], c["order"], c["n_active"], c["unbatched"]
        out_shape = (T, D * H) if unbatched else (
            (B, T, D * H) if self.batch_first else (T, B, D * H))
        d_y = None                                      # dL/d (this layer's output)
        if d_output is not None:
            d_output = as_float_array(d_output, "d_output", dtype=self.dtype, xp=xp)
            if tuple(d_output.shape) != out_shape:
                raise ValueError(f"d_output must have the output's shape {out_shape}, got "
                                 f"{tuple(d_output.shape)}")
            d_y = self._from_user(d_output, order, unbatched)
        h0 = c["h0"]
        if d_h_n is None:
            d_hn = xp.zeros_like(h0)
        else:
            d_h_n = as_float_array(d_h_n, "d_h_n", dtype=self.dtype, xp=xp)
            want = (h0.shape[0], H) if unbatched else tuple(h0.shape)
            if tuple(d_h_n.shape) != want:
                raise ValueError(f"d_h_n must have h_n's shape {want}, got "
                                 f"{tuple(d_h_n.shape)}")
            d_hn = d_h_n[:, None, :] if unbatched else d_h_n
            if order is not None:
                d_hn = d_hn[:, order]
        lengths = c["lengths"] if c["lengths"] is not None else np.full(B, T)
        rows = xp.arange(B)
        d_h0 = xp.empty_like(h0)
        grads = {}
        for layer in range(self.num_layers - 1, -1, -1):
            u, out, caches = c["layers"][layer]
            dirs = self._layer(layer)
            if layer < self.num_layers - 1 and self.dropout_masks:
                d_y = d_y * self._mask_internal(layer, order, unbatched)
            d_gi = self.workspace.get("d_gi", (u.shape[0], D * 3 * H), self.dtype, xp)
            for d, ((_, w_hh, _, _), (gates, g_hn)) in enumerate(zip(dirs, caches)):
                idx, sfx = layer * D + d, ("", "_reverse")[d]
                y = out[..., d * H:(d + 1) * H]
                h_prev = self._h_prev(y, h0[idx], n_active, reverse=d == 1)
                dgh = self.workspace.get(f"dgh{d}", (T, B, 3 * H), self.dtype, xp)
                d_y_d = None if d_y is None else d_y[..., d * H:(d + 1) * H]
                d_h0[idx] = scan_backward(d_y_d, d_hn[idx], gates, g_hn,
                                          h_prev, w_hh, d_gi[:, d * 3 * H:(d + 1) * 3 * H],
                                          dgh, n_active, reverse=d == 1)
                # dW_hh = sum_t dgh_t^T h_{t-1}: the state entering step t is y[t-1] (forward)
                # or y[t+1] (reverse; zero past the end), or h0 at the sequence's first step.
                if d == 0:
                    dw_hh = dgh[1:].reshape(-1, 3 * H).T @ y[:-1].reshape(-1, H)
                    first = dgh[0]
                else:
                    dw_hh = dgh[:-1].reshape(-1, 3 * H).T @ y[1:].reshape(-1, H)
                    first = dgh[xp.asarray(lengths - 1), rows]
                grads[f"weight_hh_l{layer}{sfx}"] = dw_hh + first.T @ h0[idx]
                if self.bias:
                    grads[f"bias_hh_l{layer}{sfx}"] = dgh.sum(axis=(0, 1))
            dw_ih = d_gi.T @ u
            db_ih = d_gi.sum(axis=0) if self.bias else None
            if layer > 0 or need_dx:
                w_cat = xp.concatenate([w_ih for w_ih, _, _, _ in dirs], axis=0)
                d_y = self._unpack(d_gi @ w_cat, c["valid"], T, B)
            for d, sfx in enumerate(self._suffixes()):
                grads[f"weight_ih_l{layer}{sfx}"] = dw_ih[d * 3 * H:(d + 1) * 3 * H]
                if self.bias:
                    grads[f"bias_ih_l{layer}{sfx}"] = db_ih[d * 3 * H:(d + 1) * 3 * H]
        self.grads = {name: grads[name] for name in self.param_shapes()}
        return (self._to_user(d_y, order, unbatched, time_major=False) if need_dx else None,
                self._h_to_user(d_h0, order, unbatched))

    @staticmethod
    def _pack(u, valid):
        """(T, B, F) -> (N, F): the valid (t, b) rows, time-major (a view without padding)."""
        return u.reshape(-1, u.shape[-1]) if valid is None else u[valid]

    def _unpack(self, a, valid, T, B):
        """(N, F) -> (T, B, F), zero at the padded (t, b)."""
        if valid is None:
            return a.reshape(T, B, -1)
        full = self.xp.zeros((T, B, a.shape[-1]), dtype=a.dtype)
        full[valid] = a
        return full

    @staticmethod
    def _h_prev(y, h0, n_active, reverse):
        """h_prev(t, m): the state entering step t, rows [:m] (a view where possible)."""
        T = y.shape[0]
        if not reverse:
            return lambda t, m: y[t - 1, :m] if t > 0 else h0[:m]
        buf = array_module(y).empty_like(h0)

        def h_prev(t, m):
            k = n_active[t + 1] if t + 1 < T else 0      # rows that ran at t + 1
            if k == 0:
                return h0[:m]
            if k >= m:
                return y[t + 1, :m]
            buf[:k] = y[t + 1, :k]                        # joined earlier
            buf[k:m] = h0[k:m]                            # join now, from h0
            return buf[:m]
        return h_prev

    def _mask_internal(self, layer, order, unbatched):
        m = self.dropout_masks[layer]
        if unbatched:
            return m[:, None, :]
        m = m.transpose(1, 0, 2) if self.batch_first else m
        return m[:, order] if order is not None else m

    def _from_user(self, a, order, unbatched):
        """The user's layout and batch order -> internal (T, B, F), sorted batch."""
        if unbatched:
            return a[:, None, :]
        a = a.transpose(1, 0, 2) if self.batch_first else a
        return a[:, order] if order is not None else a

    def __repr__(self):
        return (f"GRU({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}, dtype={self.dtype})")
