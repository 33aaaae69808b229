r"""One transformer encoder layer (BERT's post-LayerNorm layer), forward in training mode with
everything the backward needs recorded, and its backward, in NumPy (CuPy unchanged).

It is the layer :mod:`scratch.bert` runs frozen, made trainable: the same weights (read from a
:class:`scratch.bert.BertEncoder` and written back to it), the same forward, plus dropout and
gradients, so that the top layers of the encoder can be fine-tuned.  Parameter names are those
of transformers' ``BertLayer`` state dict (``model.encoder.layer[i].state_dict()``), weights in
torch's ``(out, in)`` layout.

Shapes: ``B`` sequences of ``T`` tokens, hidden size ``H``, ``h`` heads of ``d = H / h``,
feed-forward size ``I``; ``R = B T`` rows.  ``keep (B, T)`` is the key padding mask
(``attention_mask == 1``), ``beta`` an optional frozen additive score bias of shape
``(h, T, T)`` or ``(B, h, T, T)`` (MPNet's relative position bias), ``M_att (B, h, T, T)``,
``M_1, M_2 (B, T, H)`` the dropout masks with entries ``0`` or ``1 / (1 - p)`` (torch's
inverted dropout; all ones, i.e. absent, outside training).

Forward::

    Q = x W_q^T + b_q,  K = x W_k^T + b_k,  V = x W_v^T + b_v     (B, T, H) -> heads (B, h, T, d)
    S  = Q K^T / sqrt(d) + beta + mask      mask = 0 for kept keys, -inf for padded keys
                                                                                 (B, h, T, T)
    P  = softmax(S)  over keys (last axis)                                       (B, h, T, T)
    P~ = P * M_att                           attention-probability dropout       (B, h, T, T)
    C  = P~ V                                heads joined                 (B, h, T, d) -> (B, T, H)
    o  = (C W_o^T + b_o) * M_1                                                   (B, T, H)
    a  = LN_1(x + o)                                                             (B, T, H)
    z  = a W_1^T + b_1;   f = act(z)                                             (B, T, I)
    y  = (f W_2^T + b_2) * M_2                                                   (B, T, H)
    out = LN_2(a + y)                                                            (B, T, H)

    LN(r) = r^ * gamma + beta_LN,   r^ = (r - mean r) * s,   s = 1 / sqrt(var r + eps)
    (over the last axis, var the biased variance)

Backward, from ``G = dL/d out (B, T, H)`` (``sum_rows`` sums over all ``R`` rows)::

    LayerNorm, per row (H features, mean over them):
        d_gamma = sum_rows G * r^,   d_beta_LN = sum_rows G,   g = G * gamma
        d_r = s * (g - mean(g) - r^ * mean(g * r^))
    LN_2:        d_r2 = LN_2'(G);    d_a = d_r2 (residual);    d_y = d_r2 * M_2
    output:      d_W_2 = d_y^T f (H, I),   d_b_2 = sum_rows d_y,   d_f = d_y W_2 (R, I)
    activation:  d_z = d_f * act'(z)
                 gelu (exact):  act'(z) = Phi(z) + z phi(z),   phi(z) = exp(-z^2/2) / sqrt(2 pi)
                 tanh forms (gelu_new, gelu_fast, ...), with u = c (z + k z^3), t = tanh(u):
                                act'(z) = (1 + t) / 2 + z (1 - t^2) c (1 + 3 k z^2) / 2
                 (every other ``hidden_act`` of :data:`scratch.activations.ACTIVATIONS`: see
                 :data:`ACTIVATION_GRADS`)
    intermediate: d_W_1 = d_z^T a (I, H),  d_b_1 = sum_rows d_z,   d_a += d_z W_1
    LN_1:        d_r1 = LN_1'(d_a);   d_x = d_r1 (residual);    d_o = d_r1 * M_1
    attention output: d_W_o = d_o^T C,   d_b_o = sum_rows d_o,   d_C = d_o W_o  -> heads
    attention (per batch item and head):
        d_P~ = d_C V^T,        d_V = P~^T d_C
        d_P  = d_P~ * M_att
        d_S  = P * (d_P - rowsum(d_P * P))      softmax backward (rowsum over keys)
        d_Q  = d_S K / sqrt(d),   d_K = d_S^T Q / sqrt(d)
    (masked keys: P = 0 exactly, so d_S = 0 there and no gradient reaches a padded key; the
    additive ``beta`` and mask are constants: no gradient.)
    projections: d_W_q = d_Q^T x,  d_b_q = sum_rows d_Q  (same for K, V; heads joined),
                 d_x += d_Q W_q + d_K W_k + d_V W_v
    (d_b_k = 0 in exact arithmetic: b_k adds q_i . b_k to every score of row i and softmax
    ignores a shift of its row, so rowsum(d_S) = 0; computed, it is rounding noise.)

Checks (tests/test_bert_layer_backward.py): forward and every gradient equal torch autograd
through transformers' own ``BertLayer`` (float64, relative error <= 1e-9; float32 with the same
dropout masks injected into torch), central differences in float64 without torch, padding
neither influencing real tokens nor receiving gradient from them, the additive bias equal to
torch's float 4-D attention mask, and the weights round-tripping through a ``BertEncoder``.

Padded *query* rows are computed as in transformers (they attend to the real keys).  A loss that
reads real tokens only gives ``G = 0`` on padded rows; then padded positions get ``d_x = 0``
exactly and the real tokens' gradients do not depend on what the padded positions hold.

There is one attention path, the plain one above (the (B, h, T, T) probabilities are kept for
the backward); no blockwise variant.
"""
from __future__ import annotations

import math

import numpy as np

from .activations import ACTIVATIONS, _erf
from .backend import array_module, as_float_array, float_dtype, get_xp, state_arrays, to_numpy
from .functional import sigmoid

__all__ = ["EncoderLayer", "PARAM_NAMES", "DROPOUT_SITES", "ACTIVATION_GRADS", "param_shapes",
           "layer_norm_forward", "layer_norm_backward", "attention_forward",
           "attention_backward"]

# the parameters of one layer, transformers' BertLayer state-dict names and order
PARAM_NAMES = (
    "attention.self.query.weight", "attention.self.query.bias",
    "attention.self.key.weight", "attention.self.key.bias",
    "attention.self.value.weight", "attention.self.value.bias",
    "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias",
    "output.LayerNorm.weight", "output.LayerNorm.bias",
)
# where dropout acts: attention probabilities (B, h, T, T), attention output (B, T, H) before
# the first residual, feed-forward output (B, T, H) before the second residual
DROPOUT_SITES = ("attention", "attention_output", "output")


def param_shapes(hidden_size: int, intermediate_size: int) -> dict:
    """{name: shape} of one layer (torch's ``(out, in)`` weights)."""
    H, I = hidden_size, intermediate_size
    shapes = {}
    for n in ("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense"):
        shapes[n + ".weight"], shapes[n + ".bias"] = (H, H), (H,)
    shapes["attention.output.LayerNorm.weight"] = shapes["attention.output.LayerNorm.bias"] = (H,)
    shapes["intermediate.dense.weight"], shapes["intermediate.dense.bias"] = (I, H), (I,)
    shapes["output.dense.weight"], shapes["output.dense.bias"] = (H, I), (H,)
    shapes["output.LayerNorm.weight"] = shapes["output.LayerNorm.bias"] = (H,)
    return {n: shapes[n] for n in PARAM_NAMES}


# ---------------------------------------------------------------------------------------------
# activation derivatives act'(z), one per ACTIVATIONS entry (the input z, not the output)
# ---------------------------------------------------------------------------------------------

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_grad(z):
    """d/dz z Phi(z) = Phi(z) + z phi(z).  erf in float64 for NumPy float32 (SciPy's float32
    erf is a slow scalar loop), cast back."""
    xp = array_module(z)
    zz = z.astype(np.float64) if (xp is np and z.dtype == np.float32) else z
    phi_cdf = _erf(zz * (1.0 / math.sqrt(2.0)))
    phi_cdf += 1.0
    phi_cdf *= 0.5                                          # Phi(z)
    phi_cdf += zz * xp.exp(-0.5 * zz * zz) * _INV_SQRT_2PI  # + z phi(z)
    return phi_cdf.astype(z.dtype, copy=False)


def _tanh_gelu_grad(c, k):
    """act(z) = z (1 + tanh(c (z + k z^3))) / 2  ->  act'(z) =
    (1 + t) / 2 + z (1 - t^2) c (1 + 3 k z^2) / 2."""
    def grad(z):
        xp = array_module(z)
        t = xp.tanh(c * (z + k * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * k * z * z)
    return grad


def _silu_grad(z):
    """d/dz z sigma(z) = sigma (1 + z (1 - sigma))."""
    s = sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _quick_gelu_grad(z):
    """d/dz z sigma(1.702 z) = sigma + 1.702 z sigma (1 - sigma)."""
    s = sigmoid(1.702 * z)
    return s + 1.702 * z * s * (1.0 - s)


def _sigmoid_grad(z):
    s = sigmoid(z)
    return s * (1.0 - s)


def _tanh_grad(z):
    t = array_module(z).tanh(z)
    return 1.0 - t * t


def _relu_grad(z):
    return (z > 0).astype(z.dtype)                          # 0 at z = 0, as torch


def _linear_grad(z):
    return array_module(z).ones_like(z)


ACTIVATION_GRADS = {
    "gelu": gelu_grad,
    "gelu_python": gelu_grad,
    "gelu_new": _tanh_gelu_grad(math.sqrt(2.0 / math.pi), 0.044715),
    "gelu_pytorch_tanh": _tanh_gelu_grad(math.sqrt(2.0 / math.pi), 0.044715),
    "gelu_python_tanh": _tanh_gelu_grad(math.sqrt(2.0 / math.pi), 0.044715),
    "gelu_fast": _tanh_gelu_grad(0.7978845608, 0.044715),   # 0.7978845608 z (1 + 0.044715 z^2)
    "quick_gelu": _quick_gelu_grad,
    "relu": _relu_grad,
    "silu": _silu_grad,
    "swish": _silu_grad,
    "sigmoid": _sigmoid_grad,
    "tanh": _tanh_grad,
    "linear": _linear_grad,
}
assert set(ACTIVATION_GRADS) == set(ACTIVATIONS), "every hidden_act needs its derivative"


# ---------------------------------------------------------------------------------------------
# the pieces: LayerNorm, attention (forward with what the backward needs, and backward)
# ---------------------------------------------------------------------------------------------

def layer_norm_forward(r, gamma, beta, eps):
    """LN(r) over the last axis -> (out, r_hat, s): ``r_hat = (r - mean) s``,
    ``s = 1 / sqrt(var + eps)`` (..., 1), ``out = r_hat gamma + beta``."""
    xp = array_module(r)
    rc = r - r.mean(axis=-1, keepdims=True)                 # (..., H)
    s = 1.0 / xp.sqrt((rc * rc).mean(axis=-1, keepdims=True) + eps)   # (..., 1)
    r_hat = rc * s                                          # (..., H)
    return r_hat * gamma + beta, r_hat, s


def layer_norm_backward(g_out, r_hat, s, gamma):
    """(d_r, d_gamma, d_beta) of LN given dL/d out (..., H):
    ``g = g_out gamma``, ``d_r = s (g - mean g - r_hat mean(g r_hat))``; d_gamma, d_beta
    summed over every leading axis."""
    lead = tuple(range(g_out.ndim - 1))
    d_gamma = (g_out * r_hat).sum(axis=lead)                # (H,)
    d_beta = g_out.sum(axis=lead)                           # (H,)
    g = g_out * gamma                                       # (..., H)
    d_r = g - g.mean(axis=-1, keepdims=True) - r_hat * (g * r_hat).mean(axis=-1, keepdims=True)
    d_r *= s
    return d_r, d_gamma, d_beta


def attention_forward(q, k, v, keep=None, bias=None, drop=None):
    """Softmax attention of heads ``q, k, v (B, h, T, d)`` -> ``(C, P, P~)``:
    ``S = Q K^T / sqrt(d) + bias``, keys with ``keep (B, T)`` False get -inf (weight 0),
    ``P = softmax(S)``, ``P~ = P * drop`` (``drop (B, h, T, T)`` or None: ``P~ is P``),
    ``C = P~ V (B, h, T, d)``.  ``bias``: None, (h, T, T) or (B, h, T, T), no gradient."""
    xp = array_module(q)
    d = q.shape[-1]
    s = (q @ k.swapaxes(-1, -2)) * (d ** -0.5)              # (B, h, T, T), as torch scales
    if bias is not None:
        s += bias                                           # broadcast over B if (h, T, T)
    if keep is not None:
        s = xp.where(keep[:, None, None, :], s, -xp.inf)    # padded keys: weight exactly 0
    s -= s.max(axis=-1, keepdims=True)                      # every row has a kept key
    p = xp.exp(s, out=s)
    p /= p.sum(axis=-1, keepdims=True)                      # P (B, h, T, T)
    pd = p if drop is None else p * drop                    # P~
    return pd @ v, p, pd                                    # C (B, h, T, d)


def attention_backward(d_c, q, k, v, p, pd, drop=None):
    """(d_q, d_k, d_v) of :func:`attention_forward` given ``d_c = dL/dC (B, h, T, d)``:
    ``d_V = P~^T d_C``, ``d_P = (d_C V^T) * drop``, ``d_S = P (d_P - rowsum(d_P P))``,
    ``d_Q = d_S K / sqrt(d)``, ``d_K = d_S^T Q / sqrt(d)``."""
    scale = q.shape[-1] ** -0.5
    d_v = pd.swapaxes(-1, -2) @ d_c                         # (B, h, T, d)
    d_p = d_c @ v.swapaxes(-1, -2)                          # (B, h, T, T)
    if drop is not None:
        d_p *= drop
    d_p -= (d_p * p).sum(axis=-1, keepdims=True)
    d_s = d_p
    d_s *= p                                                # softmax backward
    d_s *= scale                                            # the 1/sqrt(d) of S
    return d_s @ k, d_s.swapaxes(-1, -2) @ q, d_v


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------

class EncoderLayer:
    """One BERT encoder layer with its backward (see the module docstring for the equations).

    ``EncoderLayer(params, num_heads, hidden_act="gelu", layer_norm_eps=1e-12,
    attention_dropout=0.1, hidden_dropout=0.1, dtype="float32", seed=None, xp=None)``:
    ``params`` {name: array or torch tensor} with exactly :data:`PARAM_NAMES` (copied, cast to
    ``dtype``); the dropout probabilities are those of ``config.json``
    (``attention_probs_dropout_prob``, ``hidden_dropout_prob``; BERT's default 0.1), used only
    by a training forward; ``seed`` seeds the dropout masks.

    * ``layer(x, attention_mask=None, bias=None, training=False, masks=None, cache=True)``
      -> (B, T, H); records ``layer.dropout_masks`` ({site: array or None});
    * ``layer.backward(d_out)`` -> d_x (B, T, H), and fills ``layer.grads`` {name: array};
    * ``EncoderLayer.from_encoder(enc, index, ...)`` / ``layer.to_layer()`` /
      ``layer.write_to(enc, index)``: the weights of a :class:`scratch.bert.BertEncoder`;
    * ``layer.params`` (the very arrays used: an :class:`scratch.optim.Adam` over them updates
      the layer), ``state_dict()``, ``load_state_dict(sd)``.
    """

    def __init__(self, params: dict, num_heads: int, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12, attention_dropout: float = 0.1,
                 hidden_dropout: float = 0.1, dtype="float32", seed=None, xp=None):
        self.dtype = float_dtype(dtype)
        self.xp = xp if xp is not None else get_xp()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {hidden_act!r} (known: {', '.join(ACTIVATIONS)})")
        for name, p in (("attention_dropout", attention_dropout),
                        ("hidden_dropout", hidden_dropout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {p!r}")
        if not (isinstance(layer_norm_eps, (int, float)) and layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be > 0, got {layer_norm_eps!r}")
        H = _shape_of(params, "attention.self.query.weight")[0]
        I = _shape_of(params, "intermediate.dense.weight")[0]
        if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) \
                or num_heads < 1 or H % num_heads:
            raise ValueError(f"num_heads must be a positive divisor of hidden size {H}, "
                             f"got {num_heads!r}")
        self.hidden_size, self.intermediate_size, self.num_heads = H, I, int(num_heads)
        self.hidden_act, self.layer_norm_eps = hidden_act, float(layer_norm_eps)
        self.act, self.act_grad = ACTIVATIONS[hidden_act], ACTIVATION_GRADS[hidden_act]
        self.p = {"attention": float(attention_dropout), "attention_output": float(hidden_dropout),
                  "output": float(hidden_dropout)}
        self.params = {n: a.copy() for n, a in
                       state_arrays(params, self.param_shapes(), self.dtype, self.xp).items()}
        self.generator = np.random.default_rng(seed)
        self.grads: dict = {}
        self.dropout_masks: dict = dict.fromkeys(DROPOUT_SITES)
        self._cache = None

    # ---- weights: state dict and the BertEncoder's layers ------------------------------------

    def param_shapes(self) -> dict:
        return param_shapes(self.hidden_size, self.intermediate_size)

    def state_dict(self) -> dict:
        """{name: array} (copies), transformers' BertLayer names."""
        return {n: p.copy() for n, p in self.params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Copy arrays or torch tensors *into* the parameter arrays (an optimiser holding them
        stays bound); a missing, unexpected, mis-shaped or non-finite entry is a ValueError and
        nothing changes."""
        new = state_arrays(state_dict, self.param_shapes(), self.dtype, self.xp)
        for n, a in new.items():
            self.params[n][...] = a

    @classmethod
    def from_encoder(cls, encoder, index: int, attention_dropout: float = 0.1,
                     hidden_dropout: float = 0.1, dtype=None, seed=None) -> EncoderLayer:
        """Layer ``index`` of a :class:`scratch.bert.BertEncoder` (its config gives the heads,
        activation and LayerNorm eps; ``dtype`` defaults to the encoder's).  The encoder stores
        ``W^T`` with Q, K, V stacked (``w_qkv = [W_q; W_k; W_v]^T``): undone here (copies)."""
        cfg = encoder.config
        p = encoder.layers[index]
        H = cfg.hidden_size
        w_qkv, b_qkv = to_numpy(p.w_qkv), to_numpy(p.b_qkv)            # (H, 3H), (3H,)
        params = {}
        for j, n in enumerate(("query", "key", "value")):
            params[f"attention.self.{n}.weight"] = w_qkv[:, j * H:(j + 1) * H].T
            params[f"attention.self.{n}.bias"] = b_qkv[j * H:(j + 1) * H]
        for n, w, b in (("attention.output.dense", p.w_o, p.b_o),
                        ("intermediate.dense", p.w_1, p.b_1),
                        ("output.dense", p.w_2, p.b_2)):
            params[n + ".weight"], params[n + ".bias"] = to_numpy(w).T, to_numpy(b)
        for n, g, b in (("attention.output.LayerNorm", p.ln1_g, p.ln1_b),
                        ("output.LayerNorm", p.ln2_g, p.ln2_b)):
            params[n + ".weight"], params[n + ".bias"] = to_numpy(g), to_numpy(b)
        return cls(params, cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps,
                   attention_dropout, hidden_dropout, encoder.dtype if dtype is None else dtype,
                   seed, encoder.xp)

    def to_layer(self, dtype=None, xp=None):
        """The weights as a :class:`scratch.bert.Layer` (``W^T`` contiguous, Q K V stacked),
        what a ``BertEncoder`` runs; new arrays of ``dtype`` (default this layer's)."""
        from .bert import Layer

        xp = xp or self.xp
        dt = self.dtype if dtype is None else float_dtype(dtype)
        p = self.params
        on = lambda a: xp.ascontiguousarray(xp.asarray(a), dtype=dt)     # noqa: E731
        s = "attention.self."
        return Layer(
            w_qkv=on(self.xp.concatenate([p[s + n + ".weight"]
                                          for n in ("query", "key", "value")]).T),
            b_qkv=on(self.xp.concatenate([p[s + n + ".bias"] for n in ("query", "key", "value")])),
            w_o=on(p["attention.output.dense.weight"].T), b_o=on(p["attention.output.dense.bias"]),
            ln1_g=on(p["attention.output.LayerNorm.weight"]),
            ln1_b=on(p["attention.output.LayerNorm.bias"]),
            w_1=on(p["intermediate.dense.weight"].T), b_1=on(p["intermediate.dense.bias"]),
            w_2=on(p["output.dense.weight"].T), b_2=on(p["output.dense.bias"]),
            ln2_g=on(p["output.LayerNorm.weight"]), ln2_b=on(p["output.LayerNorm.bias"]))

    def write_to(self, encoder, index: int) -> None:
        """Replace layer ``index`` of ``encoder`` by these weights (cast to its dtype): after a
        fine-tuning step the frozen forward runs the updated layer.  (Encoders made by
        ``with_attention`` share the list of layers, so they see it too.)"""
        encoder.layers[index] = self.to_layer(encoder.dtype, encoder.xp)

    # ---- forward -----------------------------------------------------------------------------

    def __call__(self, x, attention_mask=None, bias=None, training: bool = False, masks=None,
                 cache: bool = True):
        return self.forward(x, attention_mask, bias, training, masks, cache)

    def forward(self, x, attention_mask=None, bias=None, training: bool = False, masks=None,
                cache: bool = True):
        """x (B, T, H) -> (B, T, H).  ``attention_mask (B, T)`` 1 = token, 0 = padding (None:
        all tokens); ``bias`` None, (h, T, T) or (B, h, T, T) added to the scores (frozen).
        ``training``: dropout on; each site uses ``masks[site]`` if given (``masks`` a dict
        over :data:`DROPOUT_SITES`, entries 0 or 1/(1-p)), otherwise draws a mask when its
        p > 0; the masks used are in ``self.dropout_masks``.  ``cache=False``: keep nothing for
        :meth:`backward`."""
        xp, dt = self.xp, self.dtype
        H, h = self.hidden_size, self.num_heads
        d = H // h
        x = as_float_array(x, "x", dtype=dt, xp=xp)
        if x.ndim != 3 or x.shape[2] != H or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x must have shape (batch, tokens, {H}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        keep = self._keep(attention_mask, B, T)
        bias = self._bias(bias, B, T)
        drop = self._masks(training, masks, B, T)
        p = self.params
        lin = lambda u, n: u @ p[n + ".weight"].T + p[n + ".bias"]        # noqa: E731
        heads = lambda u: u.reshape(B, T, h, d).transpose(0, 2, 1, 3)    # noqa: E731
        s = "attention.self."
        q, k, v = (heads(lin(x, s + n)) for n in ("query", "key", "value"))  # (B, h, T, d)
        c, prob, pd = attention_forward(q, k, v, keep, bias, drop["attention"])
        c = c.transpose(0, 2, 1, 3).reshape(B, T, H)                     # heads joined
        o = lin(c, "attention.output.dense")                             # (B, T, H)
        if drop["attention_output"] is not None:
            o *= drop["attention_output"]
        a, a_hat, a_s = layer_norm_forward(x + o, p["attention.output.LayerNorm.weight"],
                                           p["attention.output.LayerNorm.bias"],
                                           self.layer_norm_eps)          # (B, T, H)
        z = lin(a, "intermediate.dense")                                 # (B, T, I)
        f = self.act(z)
        y = lin(f, "output.dense")                                       # (B, T, H)
        if drop["output"] is not None:
            y *= drop["output"]
        out, o_hat, o_s = layer_norm_forward(a + y, p["output.LayerNorm.weight"],
                                             p["output.LayerNorm.bias"], self.layer_norm_eps)
        self.dropout_masks = drop
        self._cache = dict(x=x, q=q, k=k, v=v, prob=prob, pd=pd, c=c, a_hat=a_hat, a_s=a_s,
                           a=a, z=z, f=f, o_hat=o_hat, o_s=o_s, drop=drop) if cache else None
        return out

    def _keep(self, attention_mask, B, T):
        if attention_mask is None:
            return None
        m = to_numpy(attention_mask)
        if m.shape != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)}, got {m.shape}")
        if m.dtype != bool and not ((m == 0) | (m == 1)).all():
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
        m = m.astype(bool)
        if not m.any(axis=1).all():
            raise ValueError(f"sequence {int(np.flatnonzero(~m.any(axis=1))[0])} has no token "
                             "with attention_mask 1")
        return None if m.all() else self.xp.asarray(m)

    def _bias(self, bias, B, T):
        if bias is None:
            return None
        b = as_float_array(bias, "bias", dtype=self.dtype, xp=self.xp)
        h = self.num_heads
        if tuple(b.shape) not in ((h, T, T), (B, h, T, T)):
            raise ValueError(f"bias must have shape {(h, T, T)} or {(B, h, T, T)}, "
                             f"got {tuple(b.shape)}")
        return b

    def _masks(self, training, masks, B, T):
        """{site: mask or None} for this forward (see :meth:`forward`)."""
        if not isinstance(training, bool):
            raise TypeError(f"training must be a bool, got {training!r}")
        if not training:
            if masks:
                raise ValueError("dropout masks given to an evaluation forward (training=False)")
            return dict.fromkeys(DROPOUT_SITES)
        masks = dict(masks or {})
        unknown = set(masks) - set(DROPOUT_SITES)
        if unknown:
            raise ValueError(f"unknown dropout sites {sorted(unknown)}: use {DROPOUT_SITES}")
        shapes = {"attention": (B, self.num_heads, T, T),
                  "attention_output": (B, T, self.hidden_size),
                  "output": (B, T, self.hidden_size)}
        out = {}
        for site in DROPOUT_SITES:
            m, p = masks.get(site), self.p[site]
            if m is not None:
                m = as_float_array(m, f"masks[{site!r}]", dtype=self.dtype, xp=self.xp)
                if tuple(m.shape) != shapes[site]:
                    raise ValueError(f"masks[{site!r}] must have shape {shapes[site]}, "
                                     f"got {tuple(m.shape)}")
            elif p > 0:
                keep = self.generator.random(shapes[site]) >= p
                scale = 1.0 / (1.0 - p) if p < 1 else 0.0            # p = 1: all dropped
                m = self.xp.asarray((keep * scale).astype(self.dtype))
            out[site] = m
        return out

    # ---- backward ----------------------------------------------------------------------------

    def backward(self, d_out):
        """dL/d out (B, T, H) -> dL/dx (B, T, H) after a :meth:`forward` with ``cache=True``;
        fills ``self.grads`` {name: dL/d param} (new arrays, every name of :data:`PARAM_NAMES`)."""
        if self._cache is None:
            raise RuntimeError("call forward (with cache=True) before backward")
        c_ = self._cache
        p, drop = self.params, c_["drop"]
        x = c_["x"]
        B, T, H = x.shape
        h = self.num_heads
        d_out = as_float_array(d_out, "d_out", dtype=self.dtype, xp=self.xp)
        if tuple(d_out.shape) != (B, T, H):
            raise ValueError(f"d_out must have the output's shape {(B, T, H)}, "
                             f"got {tuple(d_out.shape)}")
        R = B * T
        rows = lambda u: u.reshape(R, u.shape[-1])                       # noqa: E731
        g = {}
        # LN_2 and the second residual
        d_r2, g["output.LayerNorm.weight"], g["output.LayerNorm.bias"] = layer_norm_backward(
            d_out, c_["o_hat"], c_["o_s"], p["output.LayerNorm.weight"])
        d_a = d_r2.copy()                                                # (B, T, H)
        d_y = d_r2 if drop["output"] is None else d_r2 * drop["output"]
        # output dense and the activation
        g["output.dense.weight"] = rows(d_y).T @ rows(c_["f"])           # (H, I)
        g["output.dense.bias"] = rows(d_y).sum(axis=0)
        d_z = d_y @ p["output.dense.weight"]                             # (B, T, I)
        d_z *= self.act_grad(c_["z"])
        g["intermediate.dense.weight"] = rows(d_z).T @ rows(c_["a"])     # (I, H)
        g["intermediate.dense.bias"] = rows(d_z).sum(axis=0)
        d_a += d_z @ p["intermediate.dense.weight"]                      # (B, T, H)
        # LN_1 and the first residual
        d_r1, g["attention.output.LayerNorm.weight"], g["attention.output.LayerNorm.bias"] = \
            layer_norm_backward(d_a, c_["a_hat"], c_["a_s"], p["attention.output.LayerNorm.weight"])
        d_x = d_r1.copy()
        d_o = d_r1 if drop["attention_output"] is None else d_r1 * drop["attention_output"]
        g["attention.output.dense.weight"] = rows(d_o).T @ rows(c_["c"])  # (H, H)
        g["attention.output.dense.bias"] = rows(d_o).sum(axis=0)
        d_c = (d_o @ p["attention.output.dense.weight"]).reshape(B, T, h, H // h
                                                                 ).transpose(0, 2, 1, 3)
        # attention
        d_q, d_k, d_v = attention_backward(d_c, c_["q"], c_["k"], c_["v"], c_["prob"], c_["pd"],
                                           drop["attention"])            # (B, h, T, d) each
        for n, d_u in (("query", d_q), ("key", d_k), ("value", d_v)):
            d_u = d_u.transpose(0, 2, 1, 3).reshape(R, H)                # heads joined
            g[f"attention.self.{n}.weight"] = d_u.T @ rows(x)            # (H, H)
            g[f"attention.self.{n}.bias"] = d_u.sum(axis=0)
            d_x += (d_u @ p[f"attention.self.{n}.weight"]).reshape(B, T, H)
        self.grads = {n: g[n] for n in PARAM_NAMES}
        return d_x

    def __repr__(self):
        return (f"EncoderLayer(hidden={self.hidden_size}, heads={self.num_heads}, "
                f"intermediate={self.intermediate_size}, act={self.hidden_act!r}, "
                f"dropout=({self.p['attention']}, {self.p['output']}), dtype={self.dtype})")


def _shape_of(params, name):
    if name not in params:
        raise ValueError(f"params has no {name!r}")
    return tuple(params[name].shape)
