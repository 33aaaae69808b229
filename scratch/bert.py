r"""The frozen BERT encoder, forward only, in NumPy (CuPy unchanged), read from a Hugging Face
folder (``config.json`` + ``model.safetensors``) with ``safetensors.numpy``: no torch.

Shapes: ``B`` sequences of ``T`` tokens, hidden size ``H``, ``h`` heads of ``d = H / h``
features, feed-forward size ``I``, ``L`` layers.  ``input_ids (B, T)`` -> ``(B, T, H)``, the
last hidden states (what ``BertModel(...).last_hidden_state`` gives).

Embeddings (positions ``0 .. T-1`` whatever the mask, token types 0 unless given)::

    x_0 = LayerNorm(E_word[ids] + E_pos[0:T] + E_type[types])                      (B, T, H)

Each layer ``l = 1 .. L`` (``W`` as stored by torch, ``(out, in)``; ``x W^T + b`` is a Linear)::

    Q, K, V = x W_q^T + b_q,  x W_k^T + b_k,  x W_v^T + b_v     split into heads (B, h, T, d)
    C       = attention(Q, K, V, key_mask)                       heads joined  (B, T, H)
    a       = LayerNorm(x + C W_o^T + b_o)                                      (B, T, H)
    x_l     = LayerNorm(a + act(a W_1^T + b_1) W_2^T + b_2)                     (B, T, H)

    LayerNorm(y) = (y - mean(y)) / sqrt(var(y) + eps) * gamma + beta  over the last axis,
    var the biased variance; act = config.hidden_act ("gelu": y Phi(y), the exact erf form;
    NumPy float32 evaluates it through a fitted tanh form, |error| <= 2e-7 max(1, |y|)).

``key_mask[b, j] = attention_mask[b, j] == 1``: a padded key takes part in no query's
attention.  Padded *query* rows are computed all the same (as in transformers); positions
ignore the mask, so only right padding leaves the real tokens' outputs unchanged.

The attention switch (same projections, same weights; the per-head ``Q, K, V`` above, with
**no** 1/sqrt(d) applied by the encoder: only the softmax variant scales, inside its formula).
Each swapped layer computes, per sequence and head, with padded keys removed (``m`` real keys):

* ``"softmax"`` (BERT's own): ``softmax(Q K^T / sqrt(d)) V``
  (:func:`scratch.attention.softmax_attention`, ``mask = key_mask``).
* ``"efficient"`` (Shen et al.), :func:`scratch.attention.efficient_attention`:
  ``normalization="softmax"``: ``softmax_features(Q) (softmax_positions(K)^T V)``, the softmax
  of each query over its d features and of each key feature over the m real positions;
  ``normalization="scaling"``: ``(Q / sqrt(m)) ((K / sqrt(m))^T V) = Q K^T V / m``.
* ``"linear"`` (Katharopoulos et al.), :func:`scratch.attention.linear_attention`, non-causal:
  ``out_i = phi(Q_i)^T S / (phi(Q_i)^T Z + eps)``, ``S = sum_j phi(K_j) V_j^T``,
  ``Z = sum_j phi(K_j)`` over real keys j, ``phi(x) = elu(x, alpha) + 1`` (options ``alpha``,
  default 1, and ``eps``, default 1e-6).

``swap_layers`` chooses where the switch applies (the other layers keep softmax attention):
``None`` = every layer, an int ``k`` = the top ``k`` layers (indices ``L-k .. L-1``), a set of
ints = those layer indices (0 = the layer next to the embeddings).
:mod:`reference.bert_attention` is the torch mirror of exactly this.

Speed: Q, K and V come from one BLAS product over all ``B T`` rows with the stacked
``[W_q; W_k; W_v]`` (stored transposed and contiguous at load time); heads are views (reshape +
transpose, no copy), and attention writes straight into the (B, T, H) layout the output
projection reads; biases, residuals, LayerNorm and GELU work in place.  NumPy streams a whole
array through memory for every elementwise pass, so the two big intermediates are computed in
cache-sized blocks of at most ``CACHE_BLOCK`` elements (1 MiB of float32): the (heads, T, T)
attention scores (blocks of batch items and heads) and the (rows, I) feed-forward activations
(blocks of rows; each block is still one BLAS product per weight).  On CuPy a block is
everything.  float32 GELU on NumPy avoids SciPy's slow float32 erf (:func:`gelu_float32`).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import special

from .attention import NORMALIZATIONS, efficient_attention, linear_attention, softmax_attention
from .backend import array_module, float_dtype, get_xp, to_numpy
from .functional import sigmoid

ATTENTIONS = ("softmax", "efficient", "linear")
CACHE_BLOCK = 1 << 18       # elements of a big intermediate computed at once on NumPy
CONFIG, WEIGHTS = "config.json", "model.safetensors"


class BertError(ValueError):
    """A BERT folder, its weights, an option or an input is not what the encoder can use
    (the message names the file, tensor, option or input and the problem)."""


# ---------------------------------------------------------------------------------------------
# activations (forward only: the encoder is frozen)
# ---------------------------------------------------------------------------------------------

def _erf(x, out=None):
    """erf(x) from SciPy (NumPy arrays) or cupyx (CuPy arrays)."""
    if array_module(x) is np:
        return special.erf(x, out=out)
    from cupyx.scipy.special import erf

    return erf(x, out=out)


def gelu_exact(x):
    """GELU(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 with the library's erf (SciPy, cupyx):
    the exact form, transformers' "gelu".  Written in place into one new array."""
    g = x * (1.0 / math.sqrt(2.0))          # x / sqrt 2
    _erf(g, out=g)                          # erf(x / sqrt 2)
    g += 1.0
    g *= 0.5                                # Phi(x)
    g *= x
    return g


# Phi(x) = (1 + tanh(x P(x^2))) / 2 on |x| <= 4 sqrt 2 (beyond, Phi is 0 or 1 to float32
# precision: Phi(-4 sqrt 2) = 7.6e-9), P of degree 6 with the coefficients below (constant term
# first), fitted here to artanh(2 Phi(x) - 1) / x by least squares reweighted towards the
# smallest largest |Phi error| (Lawson's iteration) in float64.  In float32 arithmetic the
# GELU error is at most 1.3e-7 max(1, |x|) on a dense grid (tests/test_bert.py checks 2e-7).
_PHI_TANH = (0.797884942208162, 0.036333082845684365, -3.2593713047865556e-05,
             -5.5306604302457245e-05, 3.9648145110741505e-06, -1.3226953204494304e-07,
             1.756380213586867e-09)
_PHI_CLIP = 4.0 * math.sqrt(2.0)


def gelu_float32(x):
    """GELU in float32 without erf: x Phi(x) with Phi from the tanh fit above, every step an
    in-place vectorised pass (SciPy's float32 erf is a scalar loop, ~30x torch's GELU).
    |error| <= 2e-7 max(1, |x|) against the exact GELU (tested); exactly 0 below -4 sqrt 2."""
    xp = array_module(x)
    dt = x.dtype.type
    z = xp.clip(x, dt(-_PHI_CLIP), dt(_PHI_CLIP))           # (..., I)
    u = z * z                                               # x^2
    p = u * dt(_PHI_TANH[-1])
    p += dt(_PHI_TANH[-2])
    for c in _PHI_TANH[-3::-1]:                             # Horner: p = P(x^2)
        p *= u
        p += dt(c)
    p *= z
    xp.tanh(p, out=p)                                       # 2 Phi(x) - 1
    p += dt(1.0)
    p *= dt(0.5)                                            # Phi(x)
    p[x < dt(-_PHI_CLIP)] = 0                               # Phi < 7.6e-9 there: 0
    p *= x
    return p


def gelu(x):
    """GELU(x) = x Phi(x), the exact form: the library's erf, except NumPy float32 (SciPy's
    float32 erf is slow), which takes :func:`gelu_float32`.  CuPy always uses cupyx's erf."""
    if array_module(x) is np and x.dtype == np.float32:
        return gelu_float32(x)
    return gelu_exact(x)


def gelu_tanh(x):
    """The tanh approximation ("gelu_new", "gelu_pytorch_tanh"):
    x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2."""
    xp = array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_fast(x):
    """transformers' "gelu_fast": x (1 + tanh(0.7978845608 x (1 + 0.044715 x^2))) / 2."""
    xp = array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _relu(x):
    return array_module(x).maximum(x, 0)


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": lambda x: x * sigmoid(1.702 * x),
    "relu": _relu,
    "silu": lambda x: x * sigmoid(x),
    "swish": lambda x: x * sigmoid(x),
    "sigmoid": sigmoid,
    "tanh": lambda x: array_module(x).tanh(x),
    "linear": lambda x: x,
}


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


# ---------------------------------------------------------------------------------------------
# configuration and weights
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BertConfig:
    """The fields of ``config.json`` the forward pass needs (checked on load)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_folder(cls, folder: Path) -> "BertConfig":
        path = Path(folder) / CONFIG
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise BertError(f"{path}: missing (a BERT folder needs {CONFIG} and "
                            f"{WEIGHTS})") from None
        except (OSError, ValueError) as e:
            raise BertError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(raw, dict):
            raise BertError(f"{path}: not a JSON object")
        if raw.get("model_type") != "bert":
            raise BertError(f"{path}: model_type {raw.get('model_type')!r} is not BERT; "
                            "scratch.bert reads BERT folders only (model_type 'bert')")
        for key, bad in (("position_embedding_type", lambda v: v not in (None, "absolute")),
                         ("is_decoder", bool), ("add_cross_attention", bool)):
            if bad(raw.get(key)):
                raise BertError(f"{path}: {key}={raw[key]!r} is not supported (a plain BERT "
                                "encoder: absolute positions, no decoder, no cross-attention)")
        kw = {}
        for f in fields(cls):
            if f.name in raw:
                kw[f.name] = raw[f.name]
            elif f.default is MISSING:                  # no default: required
                raise BertError(f"{path}: no {f.name!r}")
        cfg = cls(**kw)
        cfg._check(path)
        return cfg

    def _check(self, path):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BertError(f"{path}: {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise BertError(f"{path}: hidden_size {self.hidden_size} is not a multiple of "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise BertError(f"{path}: unknown hidden_act {self.hidden_act!r} "
                            f"(known: {', '.join(ACTIVATIONS)})")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise BertError(f"{path}: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")


def expected_shapes(cfg: BertConfig) -> dict[str, tuple]:
    """Every tensor the encoder reads, by its name in a ``BertModel`` checkpoint, and shape."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (cfg.vocab_size, H),
              "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, H),
              "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, H),
              "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,)}
    for l in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{l}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            shapes |= {p + name + ".weight": (H, H), p + name + ".bias": (H,)}
        shapes |= {p + "intermediate.dense.weight": (I, H), p + "intermediate.dense.bias": (I,),
                   p + "output.dense.weight": (H, I), p + "output.dense.bias": (H,)}
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {p + ln + ".weight": (H,), p + ln + ".bias": (H,)}
    return shapes


def _canonical(name: str) -> str:
    """Checkpoint name -> ``BertModel`` name: drop a ``bert.`` prefix (BertForMaskedLM and the
    original bert-base-uncased), LayerNorm ``gamma``/``beta`` -> ``weight``/``bias``."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def read_weights(folder: Path, cfg: BertConfig) -> dict[str, np.ndarray]:
    """The tensors of :func:`expected_shapes` from ``model.safetensors`` (only those are read),
    each checked for presence, shape, a float dtype and finite values."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise BertError(f"{path}: missing (scratch.bert reads safetensors only; a "
                        "pytorch_model.bin would need torch to open)")
    want = expected_shapes(cfg)
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            stored = {_canonical(k): k for k in f.keys()}
            for name, shape in want.items():
                if name not in stored:
                    raise BertError(f"{path}: tensor {name!r} is missing")
                sl = f.get_slice(stored[name])
                if tuple(sl.get_shape()) != shape:
                    raise BertError(f"{path}: tensor {name!r} has shape "
                                    f"{tuple(sl.get_shape())}, expected {shape} from {CONFIG}")
                if sl.get_dtype() not in ("F16", "F32", "F64"):
                    raise BertError(f"{path}: tensor {name!r} has dtype {sl.get_dtype()} "
                                    "(NumPy reads F16, F32, F64)")
                out[name] = f.get_tensor(stored[name])
    except (SafetensorError, OSError) as e:
        raise BertError(f"{path}: not a readable safetensors file ({e})") from None
    for name, a in out.items():
        if not np.isfinite(a).all():
            raise BertError(f"{path}: tensor {name!r} contains NaN or inf")
    return out


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
             normalization="softmax", alpha=1.0, eps=1e-6) -> "AttentionChoice":
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

    Build it with :meth:`from_pretrained`; :meth:`with_attention` gives the same weights with
    another attention.  Arrays live on ``xp`` (NumPy, or CuPy when the backend selects it).
    """

    def __init__(self, config: BertConfig, weights: dict, dtype="float32",
                 attention: AttentionChoice | None = None, xp=None):
        self.config = config
        self.dtype = float_dtype(dtype)
        self.xp = xp or get_xp()
        self.choice = attention or AttentionChoice()
        on = lambda a: self.xp.asarray(np.ascontiguousarray(a, dtype=self.dtype))  # noqa: E731
        e = "embeddings."
        self.word = on(weights[e + "word_embeddings.weight"])            # (vocab, H)
        self.pos = on(weights[e + "position_embeddings.weight"])         # (max_pos, H)
        self.type = on(weights[e + "token_type_embeddings.weight"])      # (types, H)
        self.ln_g, self.ln_b = on(weights[e + "LayerNorm.weight"]), on(weights[e + "LayerNorm.bias"])
        self.layers = []
        for l in range(config.num_hidden_layers):
            w = lambda name: weights[f"encoder.layer.{l}.{name}"]         # noqa: E731
            s, o = "attention.self.", "attention.output."
            self.layers.append(Layer(
                w_qkv=on(np.concatenate([w(s + n + ".weight") for n in ("query", "key", "value")]).T),
                b_qkv=on(np.concatenate([w(s + n + ".bias") for n in ("query", "key", "value")])),
                w_o=on(w(o + "dense.weight").T), b_o=on(w(o + "dense.bias")),
                ln1_g=on(w(o + "LayerNorm.weight")), ln1_b=on(w(o + "LayerNorm.bias")),
                w_1=on(w("intermediate.dense.weight").T), b_1=on(w("intermediate.dense.bias")),
                w_2=on(w("output.dense.weight").T), b_2=on(w("output.dense.bias")),
                ln2_g=on(w("output.LayerNorm.weight")), ln2_b=on(w("output.LayerNorm.bias"))))
        self.act = ACTIVATIONS[config.hidden_act]

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", attention="softmax", *,
                        swap_layers=None, normalization="softmax", alpha=1.0, eps=1e-6,
                        backend=None) -> "BertEncoder":
        """Load a BERT folder (``config.json`` + ``model.safetensors``).

        ``dtype``: float32 or float64 (the stored weights are cast).  ``attention``:
        ``"softmax"`` (BERT), ``"efficient"`` (options ``normalization="softmax"|"scaling"``) or
        ``"linear"`` (options ``alpha`` in (0, 1], ``eps``), in the layers ``swap_layers``
        selects.  ``backend``: ``numpy``/``cupy``/``auto`` (default ``$SCRATCH_BACKEND``).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise BertError(f"{folder}: not a folder (a BERT folder holds {CONFIG} and {WEIGHTS})")
        try:
            dt = float_dtype(dtype)
        except ValueError as e:
            raise BertError(str(e)) from None
        cfg = BertConfig.from_folder(folder)
        choice = AttentionChoice.make(cfg.num_hidden_layers, attention, swap_layers,
                                      normalization, alpha, eps)
        return cls(cfg, read_weights(folder, cfg), dt, choice, get_xp(backend))

    def with_attention(self, attention="softmax", *, swap_layers=None, normalization="softmax",
                       alpha=1.0, eps=1e-6) -> "BertEncoder":
        """The same weights (shared, not copied) with another attention choice."""
        other = object.__new__(BertEncoder)
        other.__dict__ = dict(self.__dict__)
        other.choice = AttentionChoice.make(self.config.num_hidden_layers, attention,
                                            swap_layers, normalization, alpha, eps)
        return other

    @property
    def attention(self) -> str:
        return self.choice.attention

    # -- inputs ---------------------------------------------------------------------------------

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        xp, cfg = self.xp, self.config
        ids = xp.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise BertError(f"input_ids must have shape (batch, tokens) with both >= 1, "
                            f"got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise BertError(f"input_ids must be integers, got dtype {ids.dtype}")
        B, T = ids.shape
        if T > cfg.max_position_embeddings:
            raise BertError(f"{T} tokens exceed max_position_embeddings "
                            f"{cfg.max_position_embeddings}: truncate the input")
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
        if token_type_ids is None:
            types = None
        else:
            types = xp.asarray(token_type_ids)
            if tuple(types.shape) != (B, T) or types.dtype.kind not in "iu":
                raise BertError(f"token_type_ids must be integers of shape {(B, T)}, got "
                                f"{types.dtype} {tuple(types.shape)}")
            if bool((types < 0).any()) or bool((types >= cfg.type_vocab_size).any()):
                raise BertError(f"token_type_ids must lie in 0..{cfg.type_vocab_size - 1}")
        return ids, keep, types

    # -- forward --------------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        """Last hidden states ``(B, T, H)`` of ``input_ids (B, T)``; ``attention_mask (B, T)``
        1 = token, 0 = padding (default: all tokens); ``token_type_ids`` default 0."""
        ids, keep, types = self._check_inputs(input_ids, attention_mask, token_type_ids)
        B, T = ids.shape
        if bool(keep.all()):
            keep = None                                               # no padding: no mask
        cfg = self.config
        x = self.word[ids]                                            # (B, T, H)
        x += self.pos[:T]                                             # (T, H) broadcast
        x += self.type[0] if types is None else self.type[types]      # (H,) or (B, T, H)
        x = layer_norm(x, self.ln_g, self.ln_b, cfg.layer_norm_eps)   # (B, T, H)
        x = x.reshape(B * T, cfg.hidden_size)                         # (B T, H) rows for BLAS
        for l, layer in enumerate(self.layers):
            kind = self.choice.attention if l in self.choice.layers else "softmax"
            x = self._layer(x, layer, keep, kind, B, T)
        return x.reshape(B, T, cfg.hidden_size)                       # (B, T, H)

    def _layer(self, x, p: Layer, keep, kind, B, T):
        """One encoder layer on ``x (B T, H)`` -> ``(B T, H)``."""
        cfg = self.config
        h, d, H = cfg.num_attention_heads, cfg.head_size, cfg.hidden_size
        qkv = _linear(x, p.w_qkv, p.b_qkv)                              # (B T, 3H)
        q, k, v = qkv.reshape(B, T, 3, h, d).transpose(2, 0, 3, 1, 4)  # 3 x (B, h, T, d) views
        c = self.xp.empty((B, T, h, d), dtype=x.dtype)                  # heads joined: (B T, H)
        self._attend(q, k, v, keep, kind, out=c.transpose(0, 2, 1, 3))  # written as (B, h, T, d)
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
        n, I = a.shape[0], p.w_1.shape[1]
        rows = max(1, self._block() // I)
        y = self.xp.empty_like(a)                                       # (B T, H)
        for r in range(0, n, rows):
            f = self.act(_linear(a[r:r + rows], p.w_1, p.b_1))          # (rows, I)
            self.xp.matmul(f, p.w_2, out=y[r:r + rows])                 # (rows, H)
        y += p.b_2
        return y

    def _attend(self, q, k, v, keep, kind, out):
        """Per-head attention of ``q, k, v (B, h, T, d)`` into ``out (B, h, T, d)``; ``keep
        (B, T)`` is the key mask (None: keep every key).  Softmax attention runs on blocks of
        batch items and heads whose (heads, T, T) scores stay within ``CACHE_BLOCK``."""
        ch = self.choice
        B, h, T, _ = q.shape
        if kind == "softmax":
            mask = None if keep is None else keep[:, None, None, :]     # (B, 1, 1, T)
            hb = min(h, max(1, self._block() // (T * T)))               # heads per block
            bb = 1 if hb < h else min(B, max(1, self._block() // (h * T * T)))
            for b in range(0, B, bb):
                for g in range(0, h, hb):
                    blk = (slice(b, b + bb), slice(g, g + hb))
                    out[blk] = softmax_attention(q[blk], k[blk], v[blk],
                                                 mask=None if mask is None else mask[b:b + bb])
            return out
        key_mask = None if keep is None else keep[:, None, :]           # (B, 1, T)
        if kind == "efficient":
            out[...] = efficient_attention(q, k, v, key_mask=key_mask,
                                           normalization=ch.normalization)
        else:
            out[...] = linear_attention(q, k, v, key_mask=key_mask, alpha=ch.alpha, eps=ch.eps)
        return out

    def __repr__(self):
        c, ch = self.config, self.choice
        swap = "" if ch.attention == "softmax" else f", swap_layers={list(ch.layers)}"
        return (f"BertEncoder(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, dtype={self.dtype}, "
                f"attention={ch.attention!r}{swap}, xp={self.xp.__name__})")


__all__ = ["BertEncoder", "BertConfig", "BertError", "AttentionChoice", "ACTIVATIONS",
           "ATTENTIONS", "gelu", "layer_norm", "expected_shapes", "read_weights",
           "swapped_layers"]
