r"""The assignment's sentiment head from scratch: BiGRU -> dropout -> Linear, forward and backward.

The model after the frozen encoder (``reference.model.GRUHead``, torch-free)::

    out, h_n = GRU(features, lengths)        features (B, T, E); h_n (L D, B, H), packed lengths
    hidden   = [h_n[-2] | h_n[-1]]           (B, D H): the last layer's final states, fwd | bwd
                                             (h_n[-1] alone when unidirectional)
    hidden   = hidden * mask                 dropout, training only: mask in {0, 1 / (1 - p)}
    logits   = hidden W^T + b                (B, O), W (O, D H), b (O,)

and its backward, given dL/d logits (B, O)::

    dW = d_logits^T hidden       db = sum_b d_logits       (hidden after dropout)
    d_hidden = (d_logits W) * mask                          (B, D H)
    d_h_n[-2], d_h_n[-1] = d_hidden[:, :H], d_hidden[:, H:] (zero for the lower layers)
    GRU.backward(0, d_h_n)                                  BPTT through the GRU, with lengths
                                                            (no d features: the encoder is frozen)

Denormals: the long BPTT underflows below float32's smallest normal number (1.2e-38); the GRU's
backward runs under the CPU's flush-to-zero mode (:mod:`scratch.flush_to_zero`; elsewhere it
flushes arrays at every step, :func:`scratch.gru.denormal_flush`), d_h_n included (d_logits =
(sigmoid(z) - y) / B is itself denormal for a logit beyond about -87), so nothing here needs a
flush of its own: the head's other products are (B, O) x (O, D H).

The training loss is the assignment's: ``BCEWithLogits`` summed over the batch and divided by
its size, ``L = (1/B) sum_b bce(z_b, y_b)``, so ``dL/dz_b = (sigmoid(z_b) - y_b) / B``.

Parameters carry the reference checkpoint's names (``rnn.weight_ih_l0``, ...,
``rnn.bias_hh_l1_reverse``, ``out.weight``, ``out.bias``) and torch's initialisation
(U(-1/sqrt(H), 1/sqrt(H)) for the GRU, U(-1/sqrt(D H), 1/sqrt(D H)) for the Linear).
``head.params`` holds the very arrays the computation uses, updated in place by
:class:`scratch.optim.Adam` and by :meth:`SentimentHead.load_state_dict`.

Dropout masks are recorded after each training forward, so torch can be made to apply the same
ones (``reference.model.GRUHead.head(..., masks=head.dropout_masks)``).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import as_float_array, float_dtype, get_xp, state_arrays
from .functional import bce_with_logits, bce_with_logits_grad, sigmoid
from .gru import GRU

HEAD_ARGS = ("emb_dim", "hidden_dim", "output_dim", "n_layers", "bidirectional", "dropout")


class SentimentHead:
    """``reference.model.GRUHead`` in NumPy/CuPy, with its backward.

    ``SentimentHead(emb_dim, hidden_dim=256, output_dim=1, n_layers=2, bidirectional=True,
    dropout=0.25, dtype="float32", seed=None)``: the reference's constructor arguments (the
    checkpoint's ``config["model"]``), then the array dtype, a seed for the initial weights and
    the dropout masks, and ``xp`` (array module; default from :mod:`scratch.backend`).

    * ``head(features, lengths=None, training=False, cache=True)`` -> logits (B, output_dim);
    * ``head.backward(d_logits)`` -> grads {name: array} after a forward with ``cache=True``;
    * ``head.input_gradient(features, lengths)`` -> (logits, d logits / d features), the
      gradient integrated gradients needs (:mod:`scratch.explain`);
    * ``head.loss_and_grads(features, lengths, labels)`` -> (loss, grads, logits): one
      training step's numbers (then ``Adam(head.params).step(grads)``);
    * ``head.predict(features, lengths)`` -> probabilities (B, output_dim), no dropout, no cache;
    * ``head.state_dict()`` / ``head.load_state_dict(sd)``; ``head.config()``;
    * ``head.dropout_masks`` (the last training forward's), ``head.rng_state()`` /
      ``head.set_rng_state(s)`` (the generators of the masks, for resuming).
    """

    def __init__(self, emb_dim: int, hidden_dim: int = 256, output_dim: int = 1,
                 n_layers: int = 2, bidirectional: bool = True, dropout: float = 0.25,
                 dtype="float32", seed=None, xp=None):
        for name, v in (("emb_dim", emb_dim), ("hidden_dim", hidden_dim),
                        ("output_dim", output_dim), ("n_layers", n_layers)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.emb_dim, self.hidden_dim = int(emb_dim), int(hidden_dim)
        self.output_dim, self.n_layers = int(output_dim), int(n_layers)
        self.bidirectional, self.dropout = bool(bidirectional), float(dropout)
        self.dtype = float_dtype(dtype)
        self.xp = xp if xp is not None else get_xp()
        rnn_seed, head_seed = np.random.SeedSequence(seed).spawn(2)
        # as reference.GRUHead: the GRU's own dropout only between layers
        self.rnn = GRU(emb_dim, hidden_dim, n_layers, batch_first=True,
                       dropout=0.0 if n_layers < 2 else self.dropout,
                       bidirectional=bidirectional, dtype=self.dtype, seed=rnn_seed, xp=self.xp)
        self.generator = np.random.default_rng(head_seed)
        D_H = self.rnn.num_directions * hidden_dim
        k = 1.0 / math.sqrt(D_H)                       # torch's nn.Linear init: U(-k, k)
        self.params = {f"rnn.{n}": p for n, p in self.rnn.params.items()}
        for name, shape in (("out.weight", (output_dim, D_H)), ("out.bias", (output_dim,))):
            self.params[name] = self.xp.asarray(
                self.generator.uniform(-k, k, shape).astype(self.dtype))
        self.hidden_mask = None
        self.d_features = None
        self._cache = None

    # ---- parameters --------------------------------------------------------------------------

    def config(self) -> dict:
        """The constructor arguments a checkpoint stores (``config.json``'s ``"model"``)."""
        return {a: getattr(self, a) for a in HEAD_ARGS}

    def param_shapes(self) -> dict:
        """{name: shape}, the reference checkpoint's names and order."""
        D_H = self.rnn.num_directions * self.hidden_dim
        return {**{f"rnn.{n}": s for n, s in self.rnn.param_shapes().items()},
                "out.weight": (self.output_dim, D_H), "out.bias": (self.output_dim,)}

    def state_dict(self) -> dict:
        """{name: array} (copies), the reference checkpoint's names."""
        return {n: p.copy() for n, p in self.params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Copy torch tensors or arrays (cast to this head's dtype) *into* the parameter arrays
        (an optimiser holding them stays bound).  Missing, unexpected, mis-shaped or non-finite
        entries are a ValueError naming them; nothing is changed then."""
        new = state_arrays(state_dict, self.param_shapes(), self.dtype, self.xp)
        for name, arr in new.items():
            self.params[name][...] = arr

    # ---- forward and backward ----------------------------------------------------------------

    def __call__(self, features, lengths=None, training: bool = False, cache: bool = True):
        return self.forward(features, lengths, training, cache)

    def forward(self, features, lengths=None, training: bool = False, cache: bool = True):
        """features (B, T, emb_dim) of this head's dtype, lengths (B,) ints in [1, T] or None
        (all T steps real) -> logits (B, output_dim).  ``training``: dropout on (masks drawn
        and recorded); ``cache=False``: inference, nothing kept for :meth:`backward`."""
        xp = self.xp
        features = as_float_array(features, "features", xp=xp)
        if features.ndim != 3 or features.shape[2] != self.emb_dim:
            raise ValueError(f"features must be (batch, time, {self.emb_dim}), got "
                             f"{tuple(features.shape)}")
        _, h_n = self.rnn(features, lengths=lengths, training=training, cache=cache)  # (L D, B, H)
        hidden = (xp.concatenate([h_n[-2], h_n[-1]], axis=1) if self.bidirectional
                  else h_n[-1])                                                    # (B, D H)
        self.hidden_mask = None
        if training and self.dropout > 0:
            keep = self.generator.random(hidden.shape) >= self.dropout
            self.hidden_mask = xp.asarray((keep / (1.0 - self.dropout)).astype(self.dtype))
            hidden = hidden * self.hidden_mask
        W, b = self.params["out.weight"], self.params["out.bias"]
        logits = hidden @ W.T + b                                                  # (B, O)
        self._cache = (hidden, h_n.shape) if cache else None
        return logits

    def backward(self, d_logits, need_dx: bool = False) -> dict:
        """dL/d logits (B, output_dim) -> {name: dL/d param} for every parameter (new arrays),
        after :meth:`forward` (``cache=True``); BPTT through the GRU with the forward's lengths
        and dropout masks.  ``need_dx``: also dL/d features (B, T, emb_dim), kept in
        ``self.d_features`` (zero at the padding past each review's length); else that is None."""
        if self._cache is None:
            raise RuntimeError("call forward (with cache=True) before backward")
        xp, H = self.xp, self.hidden_dim
        hidden, hn_shape = self._cache
        d_logits = as_float_array(d_logits, "d_logits", dtype=self.dtype, xp=xp)
        if tuple(d_logits.shape) != (hidden.shape[0], self.output_dim):
            raise ValueError(f"d_logits must have the logits' shape "
                             f"{(hidden.shape[0], self.output_dim)}, got {tuple(d_logits.shape)}")
        W = self.params["out.weight"]
        grads_out = {"out.weight": d_logits.T @ hidden,                            # (O, D H)
                     "out.bias": d_logits.sum(axis=0)}                             # (O,)
        d_hidden = d_logits @ W                                                    # (B, D H)
        if self.hidden_mask is not None:
            d_hidden = d_hidden * self.hidden_mask
        d_h_n = xp.zeros(hn_shape, dtype=self.dtype)                               # (L D, B, H)
        if self.bidirectional:
            d_h_n[-2], d_h_n[-1] = d_hidden[:, :H], d_hidden[:, H:]
        else:
            d_h_n[-1] = d_hidden
        # the GRU's per-step outputs are unused (d_output 0); features are frozen (no d_x),
        # except for attributions (scratch.explain: the gradient with respect to the features)
        self.d_features, _ = self.rnn.backward(None, d_h_n, need_dx=need_dx)
        return {**{f"rnn.{n}": g for n, g in self.rnn.grads.items()}, **grads_out}

    def input_gradient(self, features, lengths=None, d_logits=None):
        """(logits, d features): the logits (B, output_dim) of an inference forward (no dropout)
        and the gradient of ``sum(d_logits * logits)`` with respect to ``features`` (B, T,
        emb_dim), by the head's own backward pass; ``d_logits`` default ones: the gradient of
        each review's logit (summed over outputs) with respect to its own features."""
        logits = self.forward(features, lengths, training=False, cache=True)
        if d_logits is None:
            d_logits = self.xp.ones_like(logits)
        self.backward(d_logits, need_dx=True)
        d_features, self.d_features, self._cache = self.d_features, None, None
        return logits, d_features

    def loss_and_grads(self, features, lengths, labels, training: bool = True):
        """(loss, grads, logits) of the assignment's loss ``(1/B) sum_b bce(z_b, y_b)``.

        labels: (B,) (output_dim 1) or (B, output_dim), values in [0, 1].  loss: a Python
        float; grads: {name: array} as :meth:`backward`; logits (B, output_dim)."""
        logits = self.forward(features, lengths, training=training)
        B = logits.shape[0]
        y = as_float_array(labels, "labels", dtype=self.dtype, xp=self.xp)
        if y.shape not in ((B, self.output_dim), (B,) if self.output_dim == 1 else None):
            raise ValueError(f"labels must have shape ({B},) or ({B}, {self.output_dim}), got "
                             f"{tuple(y.shape)}")
        if bool(((y < 0) | (y > 1)).any()):
            raise ValueError("labels must be in [0, 1]")
        y = y.reshape(B, self.output_dim)
        loss = float(bce_with_logits(logits, y).sum()) / B
        grads = self.backward(bce_with_logits_grad(logits, y) / B)
        return loss, grads, logits

    def predict(self, features, lengths=None):
        """Probabilities sigmoid(logits) (B, output_dim): no dropout, nothing cached."""
        return sigmoid(self.forward(features, lengths, training=False, cache=False))

    # ---- dropout masks and their generators --------------------------------------------------

    @property
    def dropout_masks(self) -> dict:
        """The last training forward's masks: ``{"rnn": [(B, T, D H) per layer but the last],
        "hidden": (B, D H) or None}`` (batch first, forward time; values 0 or 1 / (1 - p)):
        what ``reference.model.GRUHead.head(..., masks=...)`` takes."""
        return {"rnn": list(self.rnn.dropout_masks), "hidden": self.hidden_mask}

    def rng_state(self) -> dict:
        """The dropout generators' states (JSON-serialisable), for resuming a run exactly."""
        return {"rnn": self.rnn.generator.bit_generator.state,
                "head": self.generator.bit_generator.state}

    def set_rng_state(self, state: dict) -> None:
        self.rnn.generator.bit_generator.state = state["rnn"]
        self.generator.bit_generator.state = state["head"]

    def __repr__(self):
        return (f"SentimentHead({self.emb_dim}, hidden_dim={self.hidden_dim}, "
                f"output_dim={self.output_dim}, n_layers={self.n_layers}, "
                f"bidirectional={self.bidirectional}, dropout={self.dropout}, dtype={self.dtype})")
