r"""The frozen BERT or MPNet encoder, forward only, in NumPy (CuPy unchanged), read from a
Hugging Face folder (``config.json`` + ``model.safetensors``) with ``safetensors.numpy``: no
torch.  :meth:`BertEncoder.from_pretrained` reads the folder's ``model_type`` and builds a
:class:`BertEncoder` ("bert") or an :class:`MPNetEncoder` ("mpnet"); callers need not care.

Shapes: ``B`` sequences of ``T`` tokens, hidden size ``H``, ``h`` heads of ``d = H / h``
features, feed-forward size ``I``, ``L`` layers.  ``input_ids (B, T)`` -> ``(B, T, H)``, the
last hidden states (what ``BertModel`` / ``MPNetModel(...).last_hidden_state`` gives).

Embeddings.  BERT: positions ``0 .. T-1`` whatever the mask, token types 0 unless given::

    x_0 = LayerNorm(E_word[ids] + E_pos[0:T] + E_type[types])                      (B, T, H)

MPNet (differs: no token types; positions count the non-pad tokens after the pad id 1, as
transformers' ``create_position_ids_from_input_ids``, pads keep position 1)::

    real[b, t] = ids[b, t] != 1                                                    (B, T)
    p[b, t]    = 1 + real[b, t] sum_{s <= t} real[b, s]                             (B, T)
    x_0        = LayerNorm(E_word[ids] + E_pos[p])                                 (B, T, H)

Each layer ``l = 1 .. L`` (``W`` as stored by torch, ``(out, in)``; ``x W^T + b`` is a Linear)::

    Q, K, V = x W_q^T + b_q,  x W_k^T + b_k,  x W_v^T + b_v     split into heads (B, h, T, d)
    C       = attention(Q, K, V, key_mask[, R])                  heads joined  (B, T, H)
    a       = LayerNorm(x + C W_o^T + b_o)                                      (B, T, H)
    x_l     = LayerNorm(a + act(a W_1^T + b_1) W_2^T + b_2)                     (B, T, H)

    LayerNorm(y) = (y - mean(y)) / sqrt(var(y) + eps) * gamma + beta  over the last axis,
    var the biased variance; act = config.hidden_act ("gelu": y Phi(y), the exact erf form;
    NumPy float32 evaluates it through a fitted tanh form, |error| <= 2e-7 max(1, |y|)).

(MPNet's names: ``attention.attn.q/k/v/o``, ``attention.LayerNorm``, ``intermediate.dense``,
``output.dense``, ``output.LayerNorm``; the maths is BERT's.)

MPNet's relative position bias (differs: BERT has none).  One learned table ``E_rel``
(buckets, h), shared by all layers, gives each head a bias for each query ``i`` / key ``j``
pair from the bucket of their distance ``r = j - i``; computed once per call and added to every
softmax layer's scores before the softmax::

    R[g, i, j] = E_rel[bucket(j - i), g]                                            (h, T, T)
    bucket(r)  = N/2 [r > 0] + ( |r|                                       if |r| < N/4
                               , min(N/2 - 1, N/4 + floor(log(|r| / (N/4))
                                     / log(D / (N/4)) (N/2 - N/4)))        otherwise )

with ``N = 32`` buckets and ``D = 128`` (transformers' ``relative_position_bucket``, the
logarithm in float32 as there; ``MPNetEncoder`` always passes 32, whatever
``relative_attention_num_buckets`` says, see :class:`scratch.bert_folder.MPNetConfig`).
Distances below 8 get a bucket each, longer ones share logarithmically wider buckets, all
distances of 128 or more one bucket per direction.

``key_mask[b, j] = attention_mask[b, j] == 1``: a padded key takes part in no query's
attention.  Padded *query* rows are computed all the same (as in transformers).  BERT's
positions ignore the mask, so only right padding leaves its real tokens' outputs unchanged;
MPNet's positions skip pad ids and its bias depends on distances only, so padding with the pad
id (1) on either side leaves them unchanged.

The attention switch (same projections, same weights; the per-head ``Q, K, V`` above, with
**no** 1/sqrt(d) applied by the encoder: only the softmax variant scales, inside its formula).
Each swapped layer computes, per sequence and head, with padded keys removed (``m`` real keys):

* ``"softmax"`` (BERT's and MPNet's own): ``softmax(Q K^T / sqrt(d) [+ R]) V``, ``+ R`` for
  MPNet only (:func:`softmax_attention`: :func:`scratch.attention.softmax_attention`'s
  formula with an additive bias).
* ``"efficient"`` (Shen et al.), :func:`scratch.attention.efficient_attention`:
  ``normalization="softmax"``: ``softmax_features(Q) (softmax_positions(K)^T V)``, the softmax
  of each query over its d features and of each key feature over the m real positions;
  ``normalization="scaling"``: ``(Q / sqrt(m)) ((K / sqrt(m))^T V) = Q K^T V / m``.
* ``"linear"`` (Katharopoulos et al.), :func:`scratch.attention.linear_attention`, non-causal:
  ``out_i = phi(Q_i)^T S / (phi(Q_i)^T Z + eps)``, ``S = sum_j phi(K_j) V_j^T``,
  ``Z = sum_j phi(K_j)`` over real keys j, ``phi(x) = elu(x, alpha) + 1`` (options ``alpha``,
  default 1, and ``eps``, default 1e-6).

MPNet's swapped layers drop ``R``: it is a bias on each of the n x m scores, which a linear-time
kernel never forms (it factors through ``K^T V``), so a swapped MPNet layer is the same linear
attention as a swapped BERT layer; its layers that keep softmax still add ``R``.

``swap_layers`` chooses where the switch applies (the other layers keep softmax attention):
``None`` = every layer, an int ``k`` = the top ``k`` layers (indices ``L-k .. L-1``), a set of
ints = those layer indices (0 = the layer next to the embeddings).
:mod:`reference.bert_attention` is the torch mirror of exactly this (for BERT).

Speed: Q, K and V come from one BLAS product over all ``B T`` rows with the stacked
``[W_q; W_k; W_v]`` (stored transposed and contiguous at load time); heads are views (reshape +
transpose, no copy), and attention writes straight into the (B, T, H) layout the output
projection reads; biases, residuals, LayerNorm and GELU work in place.  NumPy streams a whole
array through memory for every elementwise pass, so the two big intermediates are computed in
cache-sized blocks of at most ``CACHE_BLOCK`` elements (1 MiB of float32): the (heads, T, T)
attention scores (blocks of batch items and heads) and the (rows, I) feed-forward activations
(blocks of rows; each block is still one BLAS product per weight).  On CuPy a block is
everything.  float32 GELU on NumPy avoids SciPy's slow float32 erf
(:func:`scratch.activations.gelu_float32`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .activations import ACTIVATIONS
from .attention import NORMALIZATIONS, efficient_attention, linear_attention
from .backend import array_module, float_dtype, get_xp, to_numpy
from .bert_folder import (
    CONFIG,
    MPNET_BUCKETS,
    MPNET_MAX_DISTANCE,
    MPNET_PADDING_IDX,
    RELATIVE_BIAS,
    WEIGHTS,
    BertConfig,
    BertError,
    MPNetConfig,
    layer_name,
    read_weights,
)
from .functional import softmax_parts

ATTENTIONS = ("softmax", "efficient", "linear")
CACHE_BLOCK = 1 << 18       # elements of a big intermediate computed at once on NumPy


def layer_norm(y, gamma, beta, eps):
    """(y - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance)."""
    xp = array_module(y)
    yc = y - y.mean(axis=-1, keepdims=True)                 # (..., H)
    var = (yc * yc).mean(axis=-1, keepdims=True)            # (..., 1)
    yc /= xp.sqrt(var + eps)
    yc *= gamma
    yc += beta
    return yc


def _linear(x, w_t, b):
    """x W^T + b with ``w_t = W^T`` (in, out) stored contiguous: one BLAS product."""
    y = x @ w_t                                             # (rows, out)
    y += b
    return y


def softmax_attention(q, k, v, bias=None, key_mask=None):
    """softmax(Q K^T / sqrt(d) + bias) V over the kept keys.

    ``q, k, v (..., T, d)``; ``bias`` broadcastable to the scores ``(..., T, T)`` (MPNet's
    ``R``; None: BERT); ``key_mask`` broadcastable to ``(..., 1, T)``, True = attend (None:
    every key).  :func:`scratch.attention.softmax_attention`'s formula, computed the same way:
    the scale on Q before the product, bias and mask (0 / -inf) added in place to the one
    scores array, ``(E V) / z`` with ``E = exp(S - rowmax S)`` and ``z`` its row sums."""
    xp = array_module(q)
    s = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.swapaxes(-1, -2)    # (..., T, T)
    if bias is not None:
        s += bias
    if key_mask is not None:
        s += xp.where(key_mask, 0.0, -xp.inf).astype(s.dtype, copy=False)
    e, z = softmax_parts(s, axis=-1, out=s)                          # (..., T, T), (..., T, 1)
    out = e @ v                                                      # (..., T, d)
    out /= z
    return out


def relative_position_bucket(r, num_buckets: int = MPNET_BUCKETS,
                             max_distance: int = MPNET_MAX_DISTANCE):
    """MPNet's bucket of each relative distance ``r = j - i`` (key minus query; NumPy ints):
    ``N/2 [r > 0]`` plus ``|r|`` below ``N/4``, else ``N/4 + floor(log(|r| / (N/4)) /
    log(D / (N/4)) (N/2 - N/4))`` capped at ``N/2 - 1`` (``N = num_buckets``,
    ``D = max_distance``).  transformers' ``relative_position_bucket``, its logarithm in
    float32 as there (a float64 one could cross an integer elsewhere)."""
    r = np.asarray(r, dtype=np.int64)
    half = num_buckets // 2                                # buckets per direction
    exact = half // 2                                      # distances with a bucket each
    n = np.abs(r)
    f32 = np.float32
    log_ratio = np.log(np.maximum(n, exact).astype(f32) / f32(exact))        # >= 0
    far = exact + (log_ratio / f32(math.log(max_distance / exact)) * f32(half - exact)
                   ).astype(np.int64)
    return half * (r > 0) + np.where(n < exact, n, np.minimum(far, half - 1))


def relative_position_bias(table, T: int, xp=np):
    """MPNet's ``R[g, i, j] = E_rel[bucket(j - i), g]`` (h, T, T) from its table ``E_rel``
    (buckets, h), an array of ``xp``: the bias every softmax layer adds to its scores."""
    r = np.arange(1 - T, T)                                              # (2T - 1,) j - i
    per_distance = table[xp.asarray(relative_position_bucket(r))]        # (2T - 1, h)
    i = np.arange(T)
    idx = xp.asarray(i[None, :] - i[:, None] + T - 1)                    # (T, T) j - i + T - 1
    return xp.ascontiguousarray(per_distance.T[:, idx])                  # (h, T, T)


@dataclass(frozen=True)
class Layer:
    """One encoder layer's weights, products stored as ``W^T`` (in, out), contiguous."""
    w_qkv: object      # (H, 3H)  [W_q; W_k; W_v]^T
    b_qkv: object      # (3H,)
    w_o: object        # (H, H)
    b_o: object
    ln1_g: object
    ln1_b: object
    w_1: object        # (H, I)
    b_1: object        # (I,)
    w_2: object        # (I, H)
    b_2: object
    ln2_g: object
    ln2_b: object


# ---------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionChoice:
    """Which attention runs in which layers, with its options (see the module docstring)."""
    attention: str = "softmax"
    layers: tuple = ()                 # layer indices where ``attention`` replaces softmax
    normalization: str = "softmax"     # efficient attention's rho
    alpha: float = 1.0                 # linear attention's phi = elu(., alpha) + 1
    eps: float = 1e-6                  # linear attention's denominator guard

    @classmethod
    def make(cls, num_layers: int, attention="softmax", swap_layers=None,
             normalization="softmax", alpha=1.0, eps=1e-6) -> AttentionChoice:
        if attention not in ATTENTIONS:
            raise BertError(f"unknown attention {attention!r}: use one of {ATTENTIONS}")
        if normalization not in NORMALIZATIONS:
            raise BertError(f"unknown normalization {normalization!r}: use one of "
                            f"{NORMALIZATIONS}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise BertError(f"alpha must be in (0, 1] (phi = elu + 1 > 0), got {alpha!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise BertError(f"eps must be finite and >= 0, got {eps!r}")
        return cls(attention, swapped_layers(num_layers, attention, swap_layers),
                   normalization, float(alpha), float(eps))


def swapped_layers(num_layers: int, attention: str, swap_layers) -> tuple:
    """``swap_layers`` (None = all, int k = top k, set of indices) -> sorted layer indices."""
    if attention == "softmax":
        if swap_layers is not None:
            raise BertError("swap_layers needs attention='efficient' or 'linear' "
                            "(softmax is what the other layers run)")
        return ()
    if swap_layers is None:
        return tuple(range(num_layers))
    if isinstance(swap_layers, (int, np.integer)) and not isinstance(swap_layers, bool):
        if not 0 <= swap_layers <= num_layers:
            raise BertError(f"swap_layers={swap_layers}: the top k layers need "
                            f"0 <= k <= {num_layers}")
        return tuple(range(num_layers - int(swap_layers), num_layers))
    try:
        idx = sorted({int(i) for i in swap_layers})
    except (TypeError, ValueError):
        raise BertError(f"swap_layers must be None, an int (top k) or a set of layer "
                        f"indices, got {swap_layers!r}") from None
    if idx and not (0 <= idx[0] and idx[-1] < num_layers):
        raise BertError(f"swap_layers {idx}: layer indices must lie in 0..{num_layers - 1}")
    return tuple(idx)


class BertEncoder:
    """The frozen BERT encoder: ``enc(input_ids, attention_mask) -> (B, T, H)``.

    Build it with :meth:`from_pretrained` (an MPNet folder gives an :class:`MPNetEncoder`);
    :meth:`with_attention` gives the same weights with another attention.  Arrays live on
    ``xp`` (NumPy, or CuPy when the backend selects it).
    """

    rel = None                # MPNet's relative position table (buckets, h); BERT has none

    def __init__(self, config: BertConfig, weights: dict, dtype="float32",
                 attention: AttentionChoice | None = None, xp=None):
        self.config = config
        self.dtype = float_dtype(dtype)
        self.xp = xp or get_xp()
        self.choice = attention or AttentionChoice()
        e = "embeddings."
        self.word = self._on(weights[e + "word_embeddings.weight"])       # (vocab, H)
        self.pos = self._on(weights[e + "position_embeddings.weight"])    # (max_pos, H)
        self.ln_g = self._on(weights[e + "LayerNorm.weight"])             # (H,)
        self.ln_b = self._on(weights[e + "LayerNorm.bias"])
        self._read_own_tables(weights)
        self.layers = [self._read_layer(weights, i) for i in range(config.num_hidden_layers)]
        self.act = ACTIVATIONS[config.hidden_act]

    def _on(self, a):
        """A stored tensor as a contiguous array of the encoder's dtype on ``xp``."""
        return self.xp.asarray(np.ascontiguousarray(a, dtype=self.dtype))

    def _read_own_tables(self, weights):
        self.type = self._on(weights["embeddings.token_type_embeddings.weight"])  # (types, H)

    def _read_layer(self, weights, index: int) -> Layer:
        """Layer ``index``'s weights (0 = next to the embeddings), products transposed."""
        w = lambda part, kind="weight": weights[f"{layer_name(self.config, index, part)}.{kind}"]  # noqa: E731
        return Layer(
            w_qkv=self._on(np.concatenate([w(p) for p in "qkv"]).T),     # (H, 3H)
            b_qkv=self._on(np.concatenate([w(p, "bias") for p in "qkv"])),
            w_o=self._on(w("o").T), b_o=self._on(w("o", "bias")),
            ln1_g=self._on(w("ln1")), ln1_b=self._on(w("ln1", "bias")),
            w_1=self._on(w("w1").T), b_1=self._on(w("w1", "bias")),        # (H, I)
            w_2=self._on(w("w2").T), b_2=self._on(w("w2", "bias")),        # (I, H)
            ln2_g=self._on(w("ln2")), ln2_b=self._on(w("ln2", "bias")))

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", attention="softmax", *,
                        swap_layers=None, normalization="softmax", alpha=1.0, eps=1e-6,
                        backend=None) -> BertEncoder:
        """Load a BERT or MPNet folder (``config.json`` + ``model.safetensors``): a
        :class:`BertEncoder` or an :class:`MPNetEncoder`, as ``config.json``'s ``model_type``
        says (whichever class this is called on).

        ``dtype``: float32 or float64 (the stored weights are cast).  ``attention``:
        ``"softmax"`` (the model's own), ``"efficient"`` (options
        ``normalization="softmax"|"scaling"``) or ``"linear"`` (options ``alpha`` in (0, 1],
        ``eps``), in the layers ``swap_layers`` selects.  ``backend``:
        ``numpy``/``cupy``/``auto`` (default ``$SCRATCH_BACKEND``).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise BertError(f"{folder}: not a folder (a BERT or MPNet folder holds {CONFIG} "
                            f"and {WEIGHTS})")
        try:
            dtype = float_dtype(dtype)
        except ValueError as e:
            raise BertError(str(e)) from None
        cfg = BertConfig.from_folder(folder)
        choice = AttentionChoice.make(cfg.num_hidden_layers, attention, swap_layers,
                                      normalization, alpha, eps)
        encoder = MPNetEncoder if isinstance(cfg, MPNetConfig) else BertEncoder
        return encoder(cfg, read_weights(folder, cfg), dtype, choice, get_xp(backend))

    def with_attention(self, attention="softmax", *, swap_layers=None, normalization="softmax",
                       alpha=1.0, eps=1e-6) -> BertEncoder:
        """The same weights (shared, not copied) with another attention choice."""
        other = object.__new__(type(self))
        other.__dict__ = dict(self.__dict__)
        other.choice = AttentionChoice.make(self.config.num_hidden_layers, attention,
                                            swap_layers, normalization, alpha, eps)
        return other

    @property
    def attention(self) -> str:
        return self.choice.attention

    # -- forward --------------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, upto=None):
        """Last hidden states ``(B, T, H)`` of ``input_ids (B, T)``; ``attention_mask (B, T)``
        1 = token, 0 = padding (default: all tokens); ``token_type_ids`` default 0 (BERT).
        ``upto``: run layers ``0 .. upto-1`` only and return the hidden states entering layer
        ``upto`` (0: the embeddings' LayerNorm output; None: every layer), the frozen bottom
        of an encoder whose top layers are trained (:mod:`scratch.top_layers`)."""
        n_layers = len(self.layers)
        upto = n_layers if upto is None else upto
        if isinstance(upto, bool) or not isinstance(upto, (int, np.integer)) \
                or not 0 <= upto <= n_layers:
            raise BertError(f"upto must be a layer index in 0..{n_layers}, got {upto!r}")
        ids, keep, types = self._check_inputs(input_ids, attention_mask, token_type_ids)
        B, T = ids.shape
        if bool(keep.all()):
            keep = None                                               # no padding: no mask
        cfg = self.config
        x = self._embed(ids, types)                                   # (B, T, H)
        x = layer_norm(x, self.ln_g, self.ln_b, cfg.layer_norm_eps)   # (B, T, H)
        x = x.reshape(B * T, cfg.hidden_size)                         # (B T, H) rows for BLAS
        bias = self._position_bias(T)                                 # None, or (h, T, T)
        for index, layer in enumerate(self.layers[:upto]):
            kind = self.choice.attention if index in self.choice.layers else "softmax"
            x = self._layer(x, layer, keep, bias, kind, B, T)
        return x.reshape(B, T, cfg.hidden_size)                       # (B, T, H)

    def _embed(self, ids, types):
        """E_word[ids] + E_pos[0:T] + E_type[types] (before the LayerNorm)."""
        x = self.word[ids]                                            # (B, T, H)
        x += self.pos[:ids.shape[1]]                                  # (T, H) broadcast
        x += self.type[0] if types is None else self.type[types]      # (H,) or (B, T, H)
        return x

    def _position_bias(self, T):
        """The bias added to every softmax layer's scores: none for BERT."""
        return None

    def _layer(self, x, p: Layer, keep, bias, kind, B, T):
        """One encoder layer on ``x (B T, H)`` -> ``(B T, H)``."""
        cfg = self.config
        h, d, H = cfg.num_attention_heads, cfg.head_size, cfg.hidden_size
        qkv = _linear(x, p.w_qkv, p.b_qkv)                              # (B T, 3H)
        q, k, v = qkv.reshape(B, T, 3, h, d).transpose(2, 0, 3, 1, 4)  # 3 x (B, h, T, d) views
        c = self.xp.empty((B, T, h, d), dtype=x.dtype)                  # heads joined: (B T, H)
        self._attend(q, k, v, keep, bias, kind, out=c.transpose(0, 2, 1, 3))  # as (B, h, T, d)
        a = _linear(c.reshape(B * T, H), p.w_o, p.b_o)                  # (B T, H)
        a += x
        a = layer_norm(a, p.ln1_g, p.ln1_b, cfg.layer_norm_eps)         # (B T, H)
        y = self._feed_forward(a, p)                                    # (B T, H)
        y += a
        return layer_norm(y, p.ln2_g, p.ln2_b, cfg.layer_norm_eps)      # (B T, H)

    def _block(self) -> int:
        """Most elements of a big intermediate computed at once (see ``CACHE_BLOCK``)."""
        return CACHE_BLOCK if self.xp is np else sys.maxsize

    def _feed_forward(self, a, p: Layer):
        """act(a W_1^T + b_1) W_2^T + b_2 on ``a (B T, H)``, in blocks of rows whose (rows, I)
        activations stay within ``CACHE_BLOCK``."""
        n, inner = a.shape[0], p.w_1.shape[1]                           # B T, I
        rows = max(1, self._block() // inner)
        y = self.xp.empty_like(a)                                       # (B T, H)
        for r in range(0, n, rows):
            f = self.act(_linear(a[r:r + rows], p.w_1, p.b_1))          # (rows, I)
            self.xp.matmul(f, p.w_2, out=y[r:r + rows])                 # (rows, H)
        y += p.b_2
        return y

    def _attend(self, q, k, v, keep, bias, kind, out):
        """Per-head attention of ``q, k, v (B, h, T, d)`` into ``out (B, h, T, d)``; ``keep
        (B, T)`` is the key mask (None: keep every key), ``bias (h, T, T)`` MPNet's ``R`` (None:
        BERT), added by softmax attention only.  Softmax attention runs on blocks of batch items
        and heads whose (heads, T, T) scores stay within ``CACHE_BLOCK``."""
        ch = self.choice
        B, h, T, _ = q.shape
        if kind == "softmax":
            mask = None if keep is None else keep[:, None, None, :]     # (B, 1, 1, T)
            hb = min(h, max(1, self._block() // (T * T)))               # heads per block
            bb = 1 if hb < h else min(B, max(1, self._block() // (h * T * T)))
            for b in range(0, B, bb):
                for g in range(0, h, hb):
                    blk = (slice(b, b + bb), slice(g, g + hb))
                    out[blk] = softmax_attention(
                        q[blk], k[blk], v[blk], None if bias is None else bias[g:g + hb],
                        None if mask is None else mask[b:b + bb])
            return out
        key_mask = None if keep is None else keep[:, None, :]           # (B, 1, T)
        if kind == "efficient":
            out[...] = efficient_attention(q, k, v, key_mask=key_mask,
                                           normalization=ch.normalization)
        else:
            out[...] = linear_attention(q, k, v, key_mask=key_mask, alpha=ch.alpha, eps=ch.eps)
        return out

    # -- inputs ---------------------------------------------------------------------------------

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        """(ids, keep, types) on ``xp``: each input checked, one BertError naming the problem."""
        xp, cfg = self.xp, self.config
        ids = xp.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise BertError(f"input_ids must have shape (batch, tokens) with both >= 1, "
                            f"got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise BertError(f"input_ids must be integers, got dtype {ids.dtype}")
        B, T = ids.shape
        if T > cfg.max_tokens:
            raise BertError(f"{T} tokens exceed {self._positions_text()}: truncate the input")
        if bool((ids < 0).any()) or bool((ids >= cfg.vocab_size).any()):
            bad = int(to_numpy(ids[(ids < 0) | (ids >= cfg.vocab_size)])[0])
            raise BertError(f"token id {bad} is outside the vocabulary 0..{cfg.vocab_size - 1}")
        if attention_mask is None:
            keep = xp.ones((B, T), dtype=bool)
        else:
            mask = xp.asarray(attention_mask)
            if tuple(mask.shape) != (B, T):
                raise BertError(f"attention_mask must have input_ids' shape {(B, T)}, "
                                f"got {tuple(mask.shape)}")
            if mask.dtype != bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise BertError("attention_mask must hold 0 (padding) and 1 (token) only")
            keep = mask.astype(bool)
        if not bool(keep.any(axis=1).all()):
            b = int(to_numpy(xp.flatnonzero(~keep.any(axis=1)))[0])
            raise BertError(f"sequence {b} has no token with attention_mask 1")
        return ids, keep, self._check_types(token_type_ids, B, T)

    def _positions_text(self) -> str:
        return f"max_position_embeddings {self.config.max_position_embeddings}"

    def _check_types(self, token_type_ids, B, T):
        if token_type_ids is None:
            return None
        types = self.xp.asarray(token_type_ids)
        if tuple(types.shape) != (B, T) or types.dtype.kind not in "iu":
            raise BertError(f"token_type_ids must be integers of shape {(B, T)}, got "
                            f"{types.dtype} {tuple(types.shape)}")
        if bool((types < 0).any()) or bool((types >= self.config.type_vocab_size).any()):
            raise BertError(f"token_type_ids must lie in 0..{self.config.type_vocab_size - 1}")
        return types

    def __repr__(self):
        c, ch = self.config, self.choice
        swap = "" if ch.attention == "softmax" else f", swap_layers={list(ch.layers)}"
        return (f"{type(self).__name__}(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, dtype={self.dtype}, "
                f"attention={ch.attention!r}{swap}, xp={self.xp.__name__})")


class MPNetEncoder(BertEncoder):
    """The frozen MPNet encoder: :class:`BertEncoder` with MPNet's embeddings (positions from
    the pad id, no token types) and its relative position bias ``R`` on every softmax layer's
    scores (see the module docstring).  :meth:`BertEncoder.from_pretrained` builds it."""

    def _read_own_tables(self, weights):
        self.rel = self._on(weights[RELATIVE_BIAS])                    # (buckets, h)

    def _embed(self, ids, types):
        """E_word[ids] + E_pos[p], ``p`` counted from the pad id over non-pad tokens (pads
        keep position 1)."""
        xp = self.xp
        real = ids != MPNET_PADDING_IDX                                  # (B, T)
        p = xp.cumsum(real, axis=1) * real + MPNET_PADDING_IDX           # (B, T)
        x = self.word[ids]                                               # (B, T, H)
        x += self.pos[p]                                                 # (B, T, H)
        return x

    def _position_bias(self, T):
        """R[g, i, j] = E_rel[bucket(j - i), g]: ``(h, T, T)``, the same for every layer."""
        return relative_position_bias(self.rel, T, self.xp)

    def _positions_text(self) -> str:
        c = self.config
        return (f"MPNet's {c.max_tokens} positions (max_position_embeddings "
                f"{c.max_position_embeddings}; they start after the pad id {MPNET_PADDING_IDX})")

    def _check_types(self, token_type_ids, B, T):
        if token_type_ids is not None:
            raise BertError("token_type_ids: MPNet has no token types (pass None)")
        return None


__all__ = ["BertEncoder", "MPNetEncoder", "BertConfig", "MPNetConfig", "BertError",
           "AttentionChoice", "ATTENTIONS", "layer_norm", "softmax_attention",
           "relative_position_bucket", "relative_position_bias", "swapped_layers"]
