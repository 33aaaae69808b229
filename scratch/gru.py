r"""``torch.nn.GRU`` from scratch: forward and backward through time, fast, in NumPy or CuPy.

One step is :mod:`scratch.gru_cell` (equations there, torch's: ``b_hn`` inside the reset gate,
gates stacked r | z | n).  This module runs that step over whole sequences, for stacked layers
and both directions, with ``pack_padded_sequence`` semantics when ``lengths`` are given.

Shapes (time-major; ``batch_first`` only transposes the input and the output)::

    x    (T, B, I)          output (T, B, D H)       D = 2 if bidirectional else 1
    h0   (L D, B, H)        h_n    (L D, B, H)       ordered [l0 fwd, l0 bwd, l1 fwd, ...]

Two layouts.  The user's arrays are (T, B, F), (B, T, F) if ``batch_first``, or (T, F)
unbatched, in the user's batch order.  Inside, every sequence array is (T, B, F), time-major,
with the batch sorted by decreasing length (and every state (L D, B, H) in that order).
:class:`Layout` converts between the two, both ways, for x, h0, the output, h_n, their
gradients and the dropout masks: nothing else transposes or reorders.

Where the time goes, and what is done about it:

* The input projections of all T steps of a layer, both directions at once, are **one** matrix
  product ``(T B, I) x (I, D 3H)``; so are, in the backward, d_x and d_W_ih.  d_W_hh is one
  product per direction after the loop.  Only ``h W_hh^T`` (forward) and ``d_gh W_hh``
  (backward) run per step.
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
  d_x and d_W_ih are still one product each, over valid rows only.  Padded steps cost nothing:
  scratch with lengths costs less than without.
* sigmoid is evaluated in place as ``(1 + tanh(x / 2)) / 2``: no overflow for any finite x, four
  vectorised passes (:func:`scratch.functional.sigmoid`, the readable stable form, is used by
  the cell reference and is ~15x slower on float32 here).
* On CuPy the per-step element-wise work is **one** kernel (:func:`gru_step_kernels`: the gates,
  g_hn and the new h in the forward; every d_a and d_h z in the backward, whose product
  ``d_gh W_hh`` is then accumulated into d_h by cuBLAS), so a step is two launches, the
  product and the kernel, instead of about a dozen small ones.  NumPy keeps the element-wise
  passes written out beside it (the same equations, one ``out=`` pass each).
  ``SCRATCH_FUSED=0`` (or ``scratch.gru.FUSED = False``) makes CuPy take the NumPy passes too.
* Denormals: through hundreds of steps the gradient underflows below float32's smallest normal
  number (1.2e-38), where x86 CPUs may compute many times slower.  On NumPy, float32,
  :func:`scan_backward` flushes those values to zero at every step (:func:`denormal_flush`:
  d_h, d_gi_t and d_gh_t's n block), so no denormal reaches a product; values below 1.2e-38
  may become 0, as on torch's side under ``set_flush_denormal``.  The forward needs no flush:
  its gates and states are O(1) (a sigmoid here is never below 3e-8) unless x itself holds
  denormals.

Gradients are spelled ``d_<quantity>`` throughout: ``d_h_n`` is dL/dh_n, ``d_gi`` dL/d gi,
``d_a_n`` dL/da_n (a_n the pre-activation of n), ``d_w_hh`` dL/dW_hh.

Reading order: :class:`GRU` (constructor, parameters, forward, backward), then the pieces in
the order the forward uses them: :class:`Layout`, :func:`active_rows`, :class:`Workspace`,
:func:`pack` (and :func:`unpack`), :func:`scan_forward` beside :func:`scan_backward`, and
last what the forward keeps for the backward, :class:`ForwardCache`.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from .backend import array_module, as_float_array, float_dtype, get_xp, state_arrays
from .flush_to_zero import flush_to_zero, is_on
from .gru_cell import split3
from .gru_checks import check_dropout, check_flag, check_h0, check_lengths, check_size, check_x

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
    values 0 or 1 / (1 - p); all 0 for p = 1), so torch can be made to apply the very same
    masks.

    Arguments are checked like torch's: sizes must be ints (TypeError for 3.0 or "10"), flags
    must be bools (TypeError for "False", also for ``bidirectional``, where torch is lenient),
    ``dropout`` a number in [0, 1].  An empty batch (B = 0) gives empty outputs, as in torch.

    Beyond torch's signature: ``lengths`` and ``enforce_sorted`` (packed sequences),
    ``training`` (dropout), ``cache=False`` (inference), ``seed``, ``xp`` (array module), and
    ``workspace`` (big buffers kept between calls; ``gru.workspace.clear()`` frees them).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 dtype="float32", seed=None, xp=None):
        self.input_size = check_size("input_size", input_size)
        self.hidden_size = check_size("hidden_size", hidden_size)
        self.num_layers = check_size("num_layers", num_layers)
        self.bias = check_flag("bias", bias)
        self.batch_first = check_flag("batch_first", batch_first)
        self.bidirectional = check_flag("bidirectional", bidirectional)
        self.dropout = check_dropout(dropout)
        self.num_directions = 2 if bidirectional else 1
        self.dtype = float_dtype(dtype)
        self.xp = xp if xp is not None else get_xp()
        self.generator = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.params = {name: self.xp.asarray(
            self.generator.uniform(-bound, bound, size=shape).astype(self.dtype))
            for name, shape in self.param_shapes().items()}
        self.grads: dict = {}
        self.dropout_masks: list = []
        self._cache: ForwardCache | None = None
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
            for suffix in self._suffixes():
                shapes[f"weight_ih_l{layer}{suffix}"] = (3 * H, in_size)
                shapes[f"weight_hh_l{layer}{suffix}"] = (3 * H, H)
                if self.bias:
                    shapes[f"bias_ih_l{layer}{suffix}"] = (3 * H,)
                    shapes[f"bias_hh_l{layer}{suffix}"] = (3 * H,)
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
        params = self.params
        return [(params[f"weight_ih_l{layer}{suffix}"], params[f"weight_hh_l{layer}{suffix}"],
                 params.get(f"bias_ih_l{layer}{suffix}"), params.get(f"bias_hh_l{layer}{suffix}"))
                for suffix in self._suffixes()]

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
        xp, H, D, dtype = self.xp, self.hidden_size, self.num_directions, self.dtype
        for name, flag in (("training", training), ("enforce_sorted", enforce_sorted),
                           ("cache", cache)):
            check_flag(name, flag)
        x, h0, lengths, layout = self._check_input(x, h0, lengths, enforce_sorted)
        T, B = x.shape[0], x.shape[1]
        n_active = active_rows(lengths, T, B)
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
            u_p = pack(u, valid)                                # (N, I_k)
            gi = ws.get("gi", (u_p.shape[0], D * 3 * H), dtype, xp)
            xp.matmul(u_p, w_cat.T, out=gi)                     # all steps: one product
            if self.bias:
                gi += xp.concatenate([b_ih + xp.concatenate([b_hh[:2 * H], 0 * b_hh[2 * H:]])
                                      for _, _, b_ih, b_hh in dirs])
            last = layer == self.num_layers - 1
            out = (xp.empty((T, B, D * H), dtype=dtype) if last    # handed back: never reused
                   else ws.get(f"out{layer}", (T, B, D * H), dtype, xp))
            gates, g_hn = [], []
            for d, (_, w_hh, _, b_hh) in enumerate(dirs):
                b_hn = b_hh[2 * H:] if self.bias else xp.zeros(H, dtype=dtype)
                state, slots = layer * D + d, T if cache else 1
                kind = "all" if cache else "step"     # one name per kind, whatever T: a name
                h_n[state], gates_d, g_hn_d = scan_forward(        # per T would keep them all
                    gi[:, d * 3 * H:(d + 1) * 3 * H], w_hh, b_hn, h0[state],
                    out[..., d * H:(d + 1) * H], n_active, reverse=d == 1,
                    gates=ws.get(f"gates{layer}.{d}.{kind}", (slots, B, 3 * H), dtype, xp),
                    g_hn=ws.get(f"g_hn{layer}.{d}.{kind}", (slots, B, H), dtype, xp))
                gates.append(gates_d)
                g_hn.append(g_hn_d)
            layers.append(LayerCache(u_p, out, gates, g_hn))
            u = out
            if training and self.dropout > 0 and not last:
                u = out * self._draw_mask(layout, out.shape)
        if cache:
            self._cache = ForwardCache(layers, h0, lengths, n_active, valid, layout)
        return layout.to_user(u), layout.to_user(h_n, state=True)

    def _draw_mask(self, layout, shape):
        """A dropout mask for a layer output of internal shape (T, B, F): drawn and recorded
        in the user's layout (``dropout_masks``), returned in the internal one."""
        p = self.dropout
        keep = self.generator.random(layout.user_shape(shape)) >= p
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0       # p = 1: every unit dropped
        mask = self.xp.asarray((keep * scale).astype(self.dtype))
        self.dropout_masks.append(mask)
        return layout.to_internal(mask)

    # ---- backward --------------------------------------------------------------------------

    def backward(self, d_output, d_h_n=None, need_dx: bool = True):
        r"""(d_x, d_h0) after :meth:`forward`; fills ``self.grads`` ({name: array}, replaced,
        not accumulated).  d_output: the output's shape, or None (zero: only h_n is used, as
        in a classifier head); d_h_n: h_n's shape or None (zero).  ``need_dx=False`` skips the
        first layer's input gradient (a frozen encoder's features) and returns d_x = None.

        Layer k, last to first (dL/d output of layer k comes from layer k+1's d_x)::

            d_gi, d_gh, d_h0[k D + d] = scan_backward(...) per direction d
            d_W_ih = d_gi^T u    d_b_ih = sum d_gi    d_u = d_gi W     (one product each)
            d_W_hh = sum_t d_gh_t^T h_{t-1}           d_b_hh = sum d_gh

        Float32 on NumPy runs under the CPU's flush-to-zero mode where it can be set
        (:mod:`scratch.flush_to_zero`; else :func:`denormal_flush` flushes arrays): values below
        1.2e-38 become 0, as on torch's side in ``fit``.
        """
        with flush_to_zero(denormals_flushed_by_cpu(self.xp, self.dtype)):
            return self._backward(d_output, d_h_n, need_dx)

    def _backward(self, d_output, d_h_n, need_dx):
        """:meth:`backward`'s layers, last to first."""
        cache = self._cache
        d_out, d_h_n = self._check_backward_input(d_output, d_h_n)
        xp, H, D, dtype = self.xp, self.hidden_size, self.num_directions, self.dtype
        T, B, h0, n_active = cache.T, cache.B, cache.h0, cache.n_active
        lengths = cache.lengths if cache.lengths is not None else np.full(B, T)
        rows = xp.arange(B)
        d_h0 = xp.empty_like(h0)
        grads = {}
        for layer in range(self.num_layers - 1, -1, -1):
            layer_cache, dirs = cache.layers[layer], self._layer(layer)
            if layer < self.num_layers - 1 and self.dropout_masks:
                d_out = d_out * cache.layout.to_internal(self.dropout_masks[layer])
            d_gi = self.workspace.get("d_gi", (layer_cache.u.shape[0], D * 3 * H), dtype, xp)
            for d, (_, w_hh, _, _) in enumerate(dirs):
                state, suffix = layer * D + d, ("", "_reverse")[d]
                y = layer_cache.out[..., d * H:(d + 1) * H]
                d_gh = self.workspace.get(f"d_gh{d}", (T, B, 3 * H), dtype, xp)
                d_h0[state] = scan_backward(
                    None if d_out is None else d_out[..., d * H:(d + 1) * H], d_h_n[state],
                    layer_cache.gates[d], layer_cache.g_hn[d],
                    states_entering(y, h0[state], n_active, reverse=d == 1), w_hh,
                    d_gi[:, d * 3 * H:(d + 1) * 3 * H], d_gh, n_active, reverse=d == 1)
                # d_W_hh = sum_t d_gh_t^T h_{t-1}: the state entering step t is y[t-1]
                # (forward) or y[t+1] (reverse; zero past the end), or h0 at the sequence's
                # first step.
                if d == 0:
                    d_w_hh = d_gh[1:].reshape(-1, 3 * H).T @ y[:-1].reshape(-1, H)
                    first = d_gh[0]
                else:
                    d_w_hh = d_gh[:-1].reshape(-1, 3 * H).T @ y[1:].reshape(-1, H)
                    first = d_gh[xp.asarray(lengths - 1), rows]
                grads[f"weight_hh_l{layer}{suffix}"] = d_w_hh + first.T @ h0[state]
                if self.bias:
                    grads[f"bias_hh_l{layer}{suffix}"] = d_gh.sum(axis=(0, 1))
            d_w_ih = d_gi.T @ layer_cache.u
            d_b_ih = d_gi.sum(axis=0) if self.bias else None
            if layer > 0 or need_dx:
                w_cat = xp.concatenate([w_ih for w_ih, _, _, _ in dirs], axis=0)
                d_out = unpack(d_gi @ w_cat, cache.valid, T, B)     # dL/d(this layer's input)
            for d, suffix in enumerate(self._suffixes()):
                grads[f"weight_ih_l{layer}{suffix}"] = d_w_ih[d * 3 * H:(d + 1) * 3 * H]
                if self.bias:
                    grads[f"bias_ih_l{layer}{suffix}"] = d_b_ih[d * 3 * H:(d + 1) * 3 * H]
        self.grads = {name: grads[name] for name in self.param_shapes()}
        return (cache.layout.to_user(d_out) if need_dx else None,
                cache.layout.to_user(d_h0, state=True))

    # ---- argument checks (scratch.gru_checks) ----------------------------------------------

    def _check_input(self, x, h0, lengths, enforce_sorted):
        """Validate the forward's arguments and bring them to the internal layout.

        Returns x (T, B, I) contiguous, h0 (L D, B, H), lengths (B,) int64 in decreasing
        order (None without lengths), and the :class:`Layout` that undoes the change.
        """
        xp, H, LD = self.xp, self.hidden_size, self.num_layers * self.num_directions
        x, T, B, unbatched = check_x(x, self.input_size, self.dtype, self.batch_first, xp)
        h0 = check_h0(h0, (LD, H) if unbatched else (LD, B, H), self.dtype, xp)
        order = None
        if lengths is not None:
            lengths, order = check_lengths(lengths, T, B, enforce_sorted, unbatched)
        layout = Layout(self.batch_first, unbatched, order, xp)
        x = xp.ascontiguousarray(layout.to_internal(x))
        h0 = (xp.zeros((LD, B, H), dtype=self.dtype) if h0 is None
              else layout.to_internal(h0, state=True))
        return x, h0, lengths, layout

    def _check_backward_input(self, d_output, d_h_n):
        """Validate backward's arguments against the cached forward and bring them to the
        internal layout: (d_out (T, B, D H) or None, d_h_n (L D, B, H), zeros if None)."""
        cache = self._cache
        if cache is None:
            raise RuntimeError("call forward (with cache=True) before backward")
        xp, LD, H = self.xp, self.num_layers * self.num_directions, self.hidden_size
        if d_output is not None:
            d_output = as_float_array(d_output, "d_output", dtype=self.dtype, xp=xp)
            want = cache.layout.user_shape((cache.T, cache.B, self.num_directions * H))
            if tuple(d_output.shape) != want:
                raise ValueError(f"d_output must have the output's shape {want}, got "
                                 f"{tuple(d_output.shape)}")
            d_output = cache.layout.to_internal(d_output)
        if d_h_n is None:
            return d_output, xp.zeros_like(cache.h0)
        d_h_n = as_float_array(d_h_n, "d_h_n", dtype=self.dtype, xp=xp)
        want = (LD, H) if cache.layout.unbatched else (LD, cache.B, H)
        if tuple(d_h_n.shape) != want:
            raise ValueError(f"d_h_n must have h_n's shape {want}, got {tuple(d_h_n.shape)}")
        return d_output, cache.layout.to_internal(d_h_n, state=True)

    def __repr__(self):
        return (f"GRU({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}, dtype={self.dtype})")


# --------------------------------------------------------------------------------------------
# The pieces, in the order the forward uses them.
# --------------------------------------------------------------------------------------------

class Layout:
    """The user's layout <-> the internal one, for sequences and states alike.

    User: sequences (T, B, F), or (B, T, F) if ``batch_first``, or (T, F) if ``unbatched``;
    states (L D, B, H) or (L D, H); batch in the user's order.  Internal: sequences (T, B, F),
    states (L D, B, H), batch rows in ``order`` (user row ``order[i]`` is internal row i;
    None: the same order).  Both directions return views where no reordering is needed.
    """

    def __init__(self, batch_first: bool, unbatched: bool, order=None, xp=np):
        self.batch_first, self.unbatched = batch_first, unbatched
        self.order = None if order is None else xp.asarray(order)        # index arrays
        self.inverse = None if order is None else xp.asarray(np.argsort(order))  # with the data

    def to_internal(self, a, state: bool = False):
        """A user-layout sequence (or, with ``state=True``, a state) -> internal layout."""
        if self.unbatched:
            return a[:, None, :]
        if self.batch_first and not state:
            a = a.transpose(1, 0, 2)
        return a if self.order is None else a[:, self.order]

    def to_user(self, a, state: bool = False):
        """An internal sequence (T, B, F) (or, with ``state=True``, a state) -> user layout."""
        if self.order is not None:
            a = a[:, self.inverse]
        if self.unbatched:
            return a[:, 0]
        return a.transpose(1, 0, 2) if self.batch_first and not state else a

    def user_shape(self, shape):
        """The user-layout shape of an internal sequence shape (T, B, F)."""
        T, B, F = shape
        return (T, F) if self.unbatched else ((B, T, F) if self.batch_first else (T, B, F))


def active_rows(lengths, T, B):
    """n_t = #{b : L_b > t} for t < T: with decreasing lengths, rows [:n_t] run at step t
    (all B of them at every step without lengths)."""
    if lengths is None:
        return [B] * T
    return np.searchsorted(-lengths, -np.arange(T), side="left").tolist()


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


def pack(u, valid):
    """(T, B, F) -> (N, F): the valid (t, b) rows, time-major (a view without padding)."""
    return u.reshape(-1, u.shape[-1]) if valid is None else u[valid]


def unpack(a, valid, T, B):
    """(N, F) -> (T, B, F), zero at the padded (t, b)."""
    if valid is None:
        return a.reshape(T, B, a.shape[-1])
    full = array_module(a).zeros((T, B, a.shape[-1]), dtype=a.dtype)
    full[valid] = a
    return full


# --------------------------------------------------------------------------------------------
# One layer, one direction: the scan and its backward, side by side.
# --------------------------------------------------------------------------------------------

def scan_forward(gi, w_hh, b_hn, h0, out, n_active, reverse=False, gates=None, g_hn=None):
    r"""Run the recurrence of one direction of one layer.

    gi (N, 3H): ``x_t W_ih^T + b_ih + [b_hr, b_hz, 0]`` for the N = sum_t n_t valid (t, b)
    pairs, time-major: torch's ``PackedSequence.data`` layout, where step t's rows are
    ``gi[s_t : s_t + n_t]`` with s_t = n_0 + ... + n_{t-1} (without lengths: (T B, 3H), the
    (T, B, 3H) array flattened).  w_hh (3H, H), b_hn (H,), h0 (B, H).  ``out`` (T, B, H), a
    view to write h_t into (and 0 where a sequence has ended).  ``n_active[t]``: rows [:n_t]
    run at step t (sorted batch).
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
    w_hh_T = xp.ascontiguousarray(w_hh.T)    # (H, 3H): copied, the step runs 13% faster
    fused = gru_step_kernels(xp)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        n_t, slot = n_active[t], t if keep else 0
        if n_t < B:
            out[t, n_t:] = 0                              # ended (or not yet started)
        if n_t == 0:
            continue
        h_run, g, tmp = h[:n_t], g_buf[:n_t], tmp_buf[:n_t]          # the running rows
        gi_t, gates_t, g_hn_t = gi[starts[t]:starts[t] + n_t], gates[slot, :n_t], g_hn[slot, :n_t]
        xp.matmul(h_run, w_hh_T, out=g)
        if fused:                                       # CuPy: everything below, one kernel
            fused.forward(*split3(gi_t), *split3(g), b_hn, *split3(gates_t), g_hn_t, h_run,
                          out[t, :n_t])
            continue
        rz = gates_t[:, :2 * H]
        xp.add(gi_t[:, :2 * H], g[:, :2 * H], out=rz)
        _sigmoid_(rz, xp)
        r, z, n = gates_t[:, :H], gates_t[:, H:2 * H], gates_t[:, 2 * H:]
        xp.add(g[:, 2 * H:], b_hn, out=g_hn_t)
        xp.multiply(r, g_hn_t, out=n)
        n += gi_t[:, 2 * H:]
        xp.tanh(n, out=n)
        xp.subtract(h_run, n, out=tmp)
        tmp *= z
        xp.add(n, tmp, out=h_run)
        out[t, :n_t] = h_run
    return h, gates, g_hn


def scan_backward(d_out, d_h_n, gates, g_hn, h_prev, w_hh, d_gi, d_gh, n_active, reverse=False):
    r"""Backpropagation through time for :func:`scan_forward`, steps in reverse order.

    d_out (T, B, H) or None: dL/d out; d_h_n (B, H): dL/d h_T.  ``h_prev(t, n_t)`` gives the
    state that entered step t, rows [:n_t].  Writes, for every step, into d_gi (N, 3H) =
    [d_a_r, d_a_z, d_a_n] (packed like :func:`scan_forward`'s gi) and d_gh (T, B, 3H) =
    [d_a_r, d_a_z, d_a_n * r] (the gradients of the input and recurrent projections; d_gh's
    rows that do not run are set to 0).  Per step, running rows::

        d_h  += d_out[t]
        d_h   = flush(d_h)                                   float32 on NumPy: below
        d_a_n = d_h (1 - z) (1 - n^2)                        :func:`flush_denormals_`
        d_a_z = d_h (h_prev - n) z (1 - z)
        d_a_r = d_a_n g_hn r (1 - r)
        d_h   = d_h z + d_gh W_hh                            one (n, 3H) x (3H, H) product

    Rows that have ended keep d_h unchanged (their state passed through).  Returns dL/dh0.
    """
    xp = array_module(gates)
    T, B, H3 = gates.shape
    H = H3 // 3
    starts = packed_starts(n_active)
    d_h = d_h_n.copy()
    one_minus_z_buf, tmp_buf, d_gh_w_buf = (xp.empty((B, H), dtype=gates.dtype) for _ in range(3))
    flush = denormal_flush((B, H3), gates.dtype, xp)
    fused = gru_step_kernels(xp)
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        n_t = n_active[t]
        if n_t < B:
            d_gh[t, n_t:] = 0
        if n_t == 0:
            continue
        d_h_run = d_h[:n_t]                                          # the running rows
        one_minus_z, tmp, d_gh_w = one_minus_z_buf[:n_t], tmp_buf[:n_t], d_gh_w_buf[:n_t]
        r, z, n = split3(gates[t, :n_t])
        d_gi_t, d_gh_t = d_gi[starts[t]:starts[t] + n_t], d_gh[t, :n_t]
        if fused:                    # CuPy: the element-wise part in one kernel, then the product
            fused.backward(r, z, n, g_hn[t, :n_t], h_prev(t, n_t),
                           0 if d_out is None else d_out[t, :n_t],
                           *split3(d_gi_t), *split3(d_gh_t), d_h_run)
            fused.accumulate(d_gh_t, w_hh, d_h_run)     # d_h += d_gh W_hh
            continue
        if d_out is not None:
            d_h_run += d_out[t, :n_t]
        if flush:
            flush(d_h_run)
        d_a_r, d_a_z, d_a_n = split3(d_gi_t)
        xp.subtract(1, z, out=one_minus_z)
        xp.multiply(n, n, out=d_a_n)                    # d_a_n = d_h (1 - z) (1 - n^2)
        xp.subtract(1, d_a_n, out=d_a_n)
        d_a_n *= one_minus_z
        d_a_n *= d_h_run
        xp.subtract(h_prev(t, n_t), n, out=d_a_z)       # d_a_z = d_h (h_prev - n) z (1 - z)
        d_a_z *= d_h_run
        d_a_z *= z
        d_a_z *= one_minus_z
        xp.subtract(1, r, out=tmp)                      # d_a_r = d_a_n g_hn r (1 - r)
        tmp *= r
        xp.multiply(d_a_n, g_hn[t, :n_t], out=d_a_r)
        d_a_r *= tmp
        if flush:
            flush(d_gi_t)
        d_gh_t[:, :2 * H] = d_gi_t[:, :2 * H]           # d_gh = [d_a_r, d_a_z, d_a_n r]
        xp.multiply(d_a_n, r, out=d_gh_t[:, 2 * H:])
        if flush:
            flush(d_gh_t[:, 2 * H:])
        d_h_run *= z                                    # d_h = d_h z + d_gh W_hh
        xp.matmul(d_gh_t, w_hh, out=d_gh_w)
        d_h_run += d_gh_w
    return d_h


def states_entering(y, h0, n_active, reverse):
    """h_prev(t, n_t): the state entering step t, rows [:n_t] (a view where possible), from the
    direction's outputs y (T, B, H) and its h0 (B, H)."""
    T = y.shape[0]
    if not reverse:
        return lambda t, n_t: y[t - 1, :n_t] if t > 0 else h0[:n_t]
    buf = array_module(y).empty_like(h0)

    def h_prev(t, n_t):
        n_next = n_active[t + 1] if t + 1 < T else 0      # rows that ran at t + 1
        if n_next == 0:
            return h0[:n_t]
        if n_next >= n_t:
            return y[t + 1, :n_t]
        buf[:n_next] = y[t + 1, :n_next]                        # joined earlier
        buf[n_next:n_t] = h0[n_next:n_t]                            # join now, from h0
        return buf[:n_t]
    return h_prev


# --------------------------------------------------------------------------------------------
# CuPy: one step's element-wise work as one kernel (the NumPy passes above, fused).
# --------------------------------------------------------------------------------------------

FUSED = os.environ.get("SCRATCH_FUSED", "1").strip() != "0"


@dataclass(frozen=True)
class StepKernels:
    """The fused CuPy kernels of one step; same equations and order as the NumPy passes of
    :func:`scan_forward` and :func:`scan_backward` (every argument (m, H), b_hn (H,); a
    sigmoid is ``(1 + tanh(a / 2)) / 2`` as in :func:`_sigmoid_`)::

        forward(i_r, i_z, i_n, g_r, g_z, g_n, b_hn,  ->  r, z, n, g_hn, h, y)
            r = sigmoid(i_r + g_r)   z = sigmoid(i_z + g_z)   g_hn = g_n + b_hn
            n = tanh(i_n + r g_hn)   h = n + z (h - n)        y = h        (h read, then written)
        backward(r, z, n, g_hn, h_prev, d_out,
                 ->  d_a_r, d_a_z, d_a_n, d_gh_r, d_gh_z, d_gh_n, d_h)
            d = d_h + d_out   d_a_n = (1 - n^2)(1 - z) d   d_a_z = (h_prev - n) d z (1 - z)
            d_a_r = d_a_n g_hn r (1 - r)   d_gh = [d_a_r, d_a_z, d_a_n r]   d_h = d z
        accumulate(d_gh, w_hh, d_h):  d_h += d_gh W_hh   (one cuBLAS gemm, beta = 1)
    """
    forward: object
    backward: object
    accumulate: object


def gru_step_kernels(xp):
    """The fused :class:`StepKernels` when ``xp`` is CuPy and :data:`FUSED` (default; set
    ``SCRATCH_FUSED=0`` to turn it off), else None: the NumPy passes."""
    if xp is np or not FUSED:
        return None
    return _cupy_step_kernels()


# The kernels' sources: (input parameters, output parameters, body), CuPy ElementwiseKernel
# syntax (T: float or double; every name an element of its (m, H) argument; an output may be
# read before it is written).  tests/test_gru.py runs these very texts through NumPy as well.
FORWARD_STEP = (
    "T xr, T xz, T xn, T gr, T gz, T gn, T bhn",
    "T r, T z, T ng, T ghn, T h, T y",
    """
    const T half = 0.5;
    r = half * tanh(half * (xr + gr)) + half;
    z = half * tanh(half * (xz + gz)) + half;
    ghn = gn + bhn;
    ng = tanh(xn + r * ghn);
    h = ng + z * (h - ng);
    y = h;
    """)
BACKWARD_STEP = (
    "T r, T z, T ng, T ghn, T hp, T dout",
    "T dar, T daz, T dan, T dgr, T dgz, T dgn, T dh",
    """
    const T one = 1;
    const T d = dh + dout;
    const T omz = one - z;
    const T a_n = (one - ng * ng) * omz * d;
    const T a_r = a_n * ghn * ((one - r) * r);
    const T a_z = (hp - ng) * d * z * omz;
    dar = a_r;
    daz = a_z;
    dan = a_n;
    dgr = a_r;
    dgz = a_z;
    dgn = a_n * r;
    dh = d * z;
    """)


@functools.cache
def _cupy_step_kernels() -> StepKernels:
    import cupy
    from cupy import cublas

    forward = cupy.ElementwiseKernel(*FORWARD_STEP, name="scratch_gru_step_forward")
    backward = cupy.ElementwiseKernel(*BACKWARD_STEP, name="scratch_gru_step_backward")

    def accumulate(d_gh, w_hh, d_h):
        cublas.gemm("N", "N", d_gh, w_hh, out=d_h, beta=1.0)

    return StepKernels(forward, backward, accumulate)


def _sigmoid_(a, xp=np):
    """In place: a <- sigmoid(a) = (1 + tanh(a / 2)) / 2, ``xp`` a's array module."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5


# --------------------------------------------------------------------------------------------
# Denormals: the vanishing gradient, flushed to zero (NumPy, float32).
# --------------------------------------------------------------------------------------------

FLUSH_DENORMALS = True
CPU_FLUSH_TO_ZERO = True


def denormals_flushed_by_cpu(xp, dtype) -> bool:
    """Whether :meth:`GRU.backward` asks for the CPU's flush-to-zero mode: float32 on NumPy,
    with ``FLUSH_DENORMALS`` and ``CPU_FLUSH_TO_ZERO`` on (``scratch.gru.CPU_FLUSH_TO_ZERO =
    False`` leaves the flushing to :func:`denormal_flush`'s array passes)."""
    return (xp is np and np.dtype(dtype) == np.float32 and FLUSH_DENORMALS
            and CPU_FLUSH_TO_ZERO)


def denormal_flush(shape, dtype, xp):
    """The flush of :func:`scan_backward`: a function ``flush(a)`` that sets to 0, in place,
    the entries of ``a`` (2-D, at most ``shape``) below float32's smallest normal number,
    |a| < 1.2e-38; or None where no flush is done.

    Backpropagation through hundreds of steps is the vanishing gradient made literal: d_h
    shrinks step by step below 1.2e-38 into *denormal* numbers (at 512 steps, 14% of the
    input projection's gradient), and x86 CPUs without flush-to-zero take microcode assists
    on them (many times slower on some Intel cores; no measurable cost on AMD Zen 3).  NumPy
    has no flush-to-zero switch.  :meth:`GRU.backward` sets the CPU's own mode where it can
    (:mod:`scratch.flush_to_zero`: Linux, glibc, x86-64), and then this returns None.  Else
    scan_backward flushes, at every step, the three arrays through which the gradient goes on:
    d_h before it enters the step, d_gi_t = [d_a_r, d_a_z, d_a_n] and d_gh_t's n block
    (d_a_n r) once computed.  No denormal then reaches a matrix product (``d_gh W_hh`` per
    step, d_W_ih, d_W_hh, d_x after the loop) or the next step; but the element-wise products
    of normal numbers that make d_gi_t can still *produce* denormals before the flush, and on
    an Intel Xeon that was enough to keep the head at 480-512 tokens 2.03x slower than the
    reference, against 0.91x with the CPU's mode (``bench/head.py --ftz``).
    Values below 1.2e-38 become 0, as torch's ``set_flush_denormal(True)``
    (reference.pipeline.train) makes them; nothing else changes (NaN stays NaN, a result differs
    by less than 1.2e-38 times the weights it passes through).  Only float32 on NumPy: float64's
    denormals (below 2.2e-308) lie thousands of steps of a decaying gradient away, and GPUs
    compute on denormals at full speed.  ``scratch.gru.FLUSH_DENORMALS = False`` turns it off.
    Cost: three passes over 5H numbers per row and step; against the unflushed code, forward +
    backward at B 128, T 64, 768 -> 256, 2 layers, both directions: 1.015x (median of 9
    interleaved repeats, 0.96-1.06; ``bench/gru.py --ab``).
    """
    if xp is not np or np.dtype(dtype) != np.float32 or not FLUSH_DENORMALS or is_on():
        return None                         # no denormals here, or the CPU flushes them
    tiny = np.finfo(np.float32).tiny
    magnitude, denormal = np.empty(shape, dtype=dtype), np.empty(shape, dtype=bool)

    def flush(a):                      # copyto writes only where needed: the cheapest of the
        m, n = a.shape                 # NumPy spellings tried (a *= |a| >= tiny: 1.8x its time)
        np.abs(a, out=magnitude[:m, :n])
        np.less(magnitude[:m, :n], tiny, out=denormal[:m, :n])           # False for NaN
        np.copyto(a, 0, where=denormal[:m, :n])
    return flush


def packed_starts(n_active):
    """s_t = n_0 + ... + n_{t-1}: where step t's rows start in the packed (N, F) layout."""
    return np.concatenate([[0], np.cumsum(n_active[:-1])]).astype(int).tolist()


# --------------------------------------------------------------------------------------------
# What the forward keeps for the backward.
# --------------------------------------------------------------------------------------------

@dataclass
class LayerCache:
    """What the backward needs of one layer."""
    u: object            # (N, I_k) the layer's input, packed (x, or the previous layer's
                         #          output after dropout)
    out: object          # (T, B, D H) the layer's output (zero past each sequence's end)
    gates: list          # per direction, (T, B, 3H): [r | z | n] at every step
    g_hn: list           # per direction, (T, B, H): W_hn h_{t-1} + b_hn at every step


@dataclass
class ForwardCache:
    """What :meth:`GRU.forward` keeps for :meth:`GRU.backward` (internal layout)."""
    layers: list         # LayerCache per layer
    h0: object           # (L D, B, H)
    lengths: object      # (B,) int64, decreasing; None without lengths
    n_active: list       # n_t: rows [:n_t] run at step t
    valid: object        # (T, B) bool, True at the (t, b) that exist; None without padding
    layout: Layout

    @property
    def T(self) -> int:
        return len(self.n_active)

    @property
    def B(self) -> int:
        return self.h0.shape[1]
