r"""The top ``K`` layers of the encoder trained together with the sentiment head, in NumPy (CuPy
unchanged): what ``--unfreeze-top K`` trains (:mod:`scratch.pipeline.train`).

The frozen recipe computes the encoder once and trains the head on its last hidden states.
With the top ``K`` of the encoder's ``L`` layers trained, the encoder is cut in two::

    h_{L-K} = layers 0 .. L-K-1 of the encoder (frozen)         computed once, cached (T_i, H)
    h_{l+1} = Layer_l(h_l, keep)         l = L-K .. L-1, trained               (B, T, H)
    z       = head(h_L, lengths)                                               (B, 1)
    loss    = (1/N) sum_b bce(z_b, y_b)             N = the batch's size (not the piece's)

``Layer_l`` is :class:`scratch.encoder_layer.EncoderLayer` with the encoder's weights of layer
``l`` (dropout in training: ``attention_probs_dropout_prob`` on the attention probabilities,
``hidden_dropout_prob`` on both sub-layer outputs, masks drawn and recorded), ``keep (B, T)``
the key padding mask ``t < lengths[b]``, the head :class:`scratch.sentiment.SentimentHead`.

Backward, from ``dL/dz = (sigmoid(z) - y) / N``::

    d h_L  = head.backward(d z, need_dx=True)          (B, T, H), zero past each length
    d h_l  = Layer_l.backward(d h_{l+1})               l = L-1 .. L-K, fills Layer_l.grads

(``d h_{L-K}`` is computed by the bottom trained layer and dropped: nothing below learns.)
A loss that reads only real tokens gives ``G = 0`` on padded rows, so padding changes neither
the real tokens' values nor any gradient (:mod:`scratch.encoder_layer`).

Micro-batches: a batch of ``N`` reviews may be run in pieces (memory: each trained layer keeps
``(B, h, T, T)`` attention probabilities for its backward).  Piece ``p`` contributes
``sum_{b in p} bce(z_b, y_b) / N``, so the pieces' gradients add up to the batch's gradient, up
to rounding; the dropout masks are drawn piece by piece.

MPNet (differs: BERT has none): every trained layer adds the encoder's relative position bias
``R (h, T, T)`` (:func:`scratch.bert.relative_position_bias`) to its scores, as the frozen
layers do; its table ``E_rel`` stays frozen (a constant of the forward: no gradient), so each
layer's backward is BERT's.

Parameter names are those of transformers' ``BertModel`` / ``MPNetModel`` state dict,
``encoder.layer.{l}.{name}`` with ``name`` in :data:`scratch.encoder_layer.PARAM_NAMES` (BERT)
or its MPNet counterpart (:func:`checkpoint_names`), so the trained layers go back into the
transformers model (``load_state_dict(..., strict=False)``) or a
:class:`scratch.bert.BertEncoder` (:meth:`TopLayers.write_to`) by name.
"""
from __future__ import annotations

import numpy as np

from .backend import as_float_array, float_dtype, to_numpy
from .bert import relative_position_bias
from .bert_folder import LAYER_NAMES
from .encoder_layer import PARAM_NAMES, EncoderLayer
from .functional import bce_with_logits, bce_with_logits_grad
from .sentiment import SentimentHead

__all__ = ["TopLayers", "TopHead", "LAYER_PREFIX", "layer_param", "split_layer_params",
           "checkpoint_names", "FAMILIES"]

LAYER_PREFIX = "encoder.layer."


def layer_param(index: int, name: str) -> str:
    """``encoder.layer.{index}.{name}``: a trained layer's parameter, BertModel's name."""
    return f"{LAYER_PREFIX}{index}.{name}"


FAMILIES = ("bert", "mpnet")         # the encoders whose top layers train


def checkpoint_names(model_type: str) -> dict[str, str]:
    """{:data:`PARAM_NAMES` name (BERT's, what :class:`EncoderLayer` uses): the name of the same
    tensor in a ``model_type`` layer's state dict}, in :data:`PARAM_NAMES` order; e.g. MPNet's
    ``attention.attn.q.weight`` for ``attention.self.query.weight``."""
    if model_type not in FAMILIES:
        raise ValueError(f"trained top layers need a BERT or MPNet encoder, got {model_type}")
    bert, own = LAYER_NAMES["bert"], LAYER_NAMES[model_type]
    rename = {bert[part]: own[part] for part in bert}
    return {n: rename[n.rpartition(".")[0]] + "." + n.rpartition(".")[2] for n in PARAM_NAMES}


def split_layer_params(tensors: dict) -> tuple[dict, dict]:
    """(the other tensors, ``{layer index: {name: tensor}}``) of a state dict holding
    ``encoder.layer.{l}.*`` entries: the checkpoint of a head trained with its top layers."""
    rest, layers = {}, {}
    for key, t in tensors.items():
        if key.startswith(LAYER_PREFIX):
            index, _, name = key[len(LAYER_PREFIX):].partition(".")
            if not index.isdigit() or not name:
                raise ValueError(f"{key}: not encoder.layer.<index>.<name>")
            layers.setdefault(int(index), {})[name] = t
        else:
            rest[key] = t
    return rest, dict(sorted(layers.items()))


def keep_mask(lengths, steps: int):
    """``keep[b, t] = t < lengths[b]`` (B, T) bool: the key padding mask of right-padded rows."""
    lengths = np.asarray(to_numpy(lengths)).astype(np.int64)
    return np.arange(steps)[None, :] < lengths[:, None]


class TopLayers:
    """Encoder layers ``first .. L-1`` trained: ``top(x, lengths, training) -> (B, T, H)`` and
    ``top.backward(d_out) -> d_x``, their gradients in ``top.grads``.

    ``TopLayers({index: EncoderLayer}, model_type="bert", position_table=None)`` (consecutive
    indices, the top of the encoder; MPNet's need its frozen relative position table
    ``E_rel`` (buckets, h)); build it with :meth:`from_encoder`.  ``params``:
    {``encoder.layer.{l}.{name}``: array} (the family's names), the very arrays the layers use
    (an :class:`scratch.optim.Adam` over them trains the layers)."""

    def __init__(self, layers: dict, model_type: str = "bert", position_table=None):
        if not layers:
            raise ValueError("TopLayers needs at least one layer")
        indices = sorted(layers)
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise ValueError(f"the trained layers must be consecutive, got {indices}")
        self.layers = {i: layers[i] for i in indices}
        self.first = indices[0]
        self.dtype = self.layers[self.first].dtype
        self.xp = self.layers[self.first].xp
        self.model_type, self.names = model_type, checkpoint_names(model_type)
        if (model_type == "mpnet") != (position_table is not None):
            given = "given" if position_table is not None else "missing"
            raise ValueError(f"MPNet's trained layers need its relative position table, BERT's "
                             f"none ({model_type}, table {given})")
        self.position_table = None                     # E_rel (buckets, h), frozen
        if position_table is not None:
            self.position_table = as_float_array(position_table, "position_table",
                                                 dtype=self.dtype, xp=self.xp)
            heads = self.layers[self.first].num_heads
            if self.position_table.ndim != 2 or self.position_table.shape[1] != heads:
                raise ValueError(f"position_table must have shape (buckets, {heads}), got "
                                 f"{tuple(self.position_table.shape)}")
        self.params = {layer_param(i, self.names[n]): p for i, layer in self.layers.items()
                       for n, p in layer.params.items()}
        self.grads: dict = {}

    @classmethod
    def from_encoder(cls, encoder, k: int, dtype=None, seed=None) -> TopLayers:
        """The top ``k`` layers of a :class:`scratch.bert.BertEncoder` (BERT or MPNet; copies,
        MPNet's position table too), with the dropout probabilities of its ``config.json`` and
        generators seeded from ``seed``."""
        n_layers = len(encoder.layers)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_layers:
            raise ValueError(f"k must be in 1..{n_layers} (the encoder's layers), got {k!r}")
        cfg = encoder.config
        checkpoint_names(cfg.model_type)                               # BERT or MPNet
        seeds = np.random.SeedSequence(seed).spawn(3)[2].spawn(k)     # not the head's streams
        table = None if encoder.rel is None else to_numpy(encoder.rel).copy()
        return cls({i: EncoderLayer.from_encoder(
            encoder, i, cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob,
            dtype=dtype, seed=seeds[j]) for j, i in enumerate(range(n_layers - k, n_layers))},
            cfg.model_type, table)

    @classmethod
    def from_state(cls, layers: dict, config, dtype="float32", seed=None, xp=None,
                   position_table=None) -> TopLayers:
        """Layers ``{index: {name: array or tensor}}`` (a checkpoint's, see
        :func:`scratch.pipeline.checkpoint.load_checkpoint`; the family's names) of an encoder
        whose :class:`scratch.bert_folder.BertConfig` is ``config``: they must be its top
        layers.  MPNet: ``position_table`` is the encoder's ``E_rel``
        (:func:`scratch.bert_folder.read_position_table`)."""
        indices, n_layers = sorted(layers), config.num_hidden_layers
        names = checkpoint_names(config.model_type)
        if not indices or indices != list(range(n_layers - len(indices), n_layers)):
            raise ValueError(f"layers {indices} are not the top layers of an encoder of "
                             f"{n_layers} layers")
        seeds = np.random.SeedSequence(seed).spawn(3)[2].spawn(len(indices))
        built = {}
        for j, i in enumerate(indices):
            if odd := sorted(set(layers[i]) ^ set(names.values())):
                raise ValueError(f"layer {i}: tensors {odd[:3]} missing or unexpected for "
                                 f"{config.model_type}")
            params = {n: layers[i][own] for n, own in names.items()}
            built[i] = EncoderLayer(params, config.num_attention_heads, config.hidden_act,
                                    config.layer_norm_eps, config.attention_probs_dropout_prob,
                                    config.hidden_dropout_prob, dtype, seeds[j], xp)
            want = (config.hidden_size, config.intermediate_size)
            if (built[i].hidden_size, built[i].intermediate_size) != want:
                raise ValueError(f"layer {i} is {built[i].hidden_size} wide with "
                                 f"{built[i].intermediate_size} inner units, the encoder's "
                                 f"layers {want[0]} and {want[1]}")
        return cls(built, config.model_type, position_table)

    @property
    def indices(self) -> list[int]:
        return list(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # ---- forward and backward ----------------------------------------------------------------

    def __call__(self, x, lengths=None, training: bool = False, cache: bool = True):
        return self.forward(x, lengths, training, cache)

    def forward(self, x, lengths=None, training: bool = False, cache: bool = True):
        """x (B, T, H) = h_{first}, lengths (B,) ints in 1..T or None (all T real) ->
        h_L (B, T, H).  ``training``: dropout on (masks in :attr:`dropout_masks`);
        ``cache=False``: nothing kept for :meth:`backward`."""
        x = as_float_array(x, "x", dtype=self.dtype, xp=self.xp)
        mask = None if lengths is None else keep_mask(lengths, x.shape[1])
        bias = (None if self.position_table is None                   # MPNet: R (h, T, T)
                else relative_position_bias(self.position_table, x.shape[1], self.xp))
        for layer in self.layers.values():
            x = layer(x, mask, bias, training=training, cache=cache)
        return x

    def backward(self, d_out):
        """dL/d h_L (B, T, H) -> dL/d h_{first}; fills :attr:`grads` {param name: array}."""
        d = d_out
        grads = {}
        for i in reversed(self.layers):
            d = self.layers[i].backward(d)
            grads.update({layer_param(i, self.names[n]): g
                          for n, g in self.layers[i].grads.items()})
        self.grads = {n: grads[n] for n in self.params}
        return d

    @property
    def dropout_masks(self) -> list[dict]:
        """The last training forward's masks, one dict per layer (bottom first), over
        :data:`scratch.encoder_layer.DROPOUT_SITES`: what ``reference.top_layers`` applies."""
        return [dict(layer.dropout_masks) for layer in self.layers.values()]

    # ---- weights and generators --------------------------------------------------------------

    def state_dict(self) -> dict:
        return {n: p.copy() for n, p in self.params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Copy ``encoder.layer.{l}.*`` arrays or tensors into the layers (checked: every
        name, shape, finite values; a ValueError changes nothing)."""
        rest, per_layer = split_layer_params(dict(state_dict))
        if rest or sorted(per_layer) != self.indices:
            raise ValueError(f"trained layers {self.indices} expected, got layers "
                             f"{sorted(per_layer)} and other tensors {sorted(rest)[:3]}")
        news = {}
        for i, layer in self.layers.items():
            if set(per_layer[i]) != set(self.names.values()):
                bad = sorted(set(per_layer[i]) ^ set(self.names.values()))
                raise ValueError(f"layer {i}: tensors {bad[:3]} missing or unexpected")
            params = {n: per_layer[i][own] for n, own in self.names.items()}
            probe = EncoderLayer(params, layer.num_heads, layer.hidden_act,
                                 layer.layer_norm_eps, dtype=layer.dtype, xp=layer.xp)
            if probe.param_shapes() != layer.param_shapes():
                raise ValueError(f"layer {i}: shapes {probe.param_shapes()} differ from the "
                                 f"encoder's {layer.param_shapes()}")
            news[i] = params
        for i, layer in self.layers.items():
            layer.load_state_dict(news[i])

    def rng_state(self) -> list:
        return [layer.generator.bit_generator.state for layer in self.layers.values()]

    def set_rng_state(self, state: list) -> None:
        for layer, s in zip(self.layers.values(), state, strict=True):
            layer.generator.bit_generator.state = s

    def write_to(self, encoder) -> None:
        """Put these weights into ``encoder`` (a :class:`scratch.bert.BertEncoder` of the same
        family): its forward then runs the frozen bottom and these layers on top."""
        if encoder.config.model_type != self.model_type:
            raise ValueError(f"{self.model_type} layers cannot go into a "
                             f"{encoder.config.model_type} encoder")
        for i, layer in self.layers.items():
            layer.write_to(encoder, i)

    def __repr__(self):
        return f"TopLayers({self.indices}, {self.model_type}, {self.layers[self.first]!r})"


class TopHead:
    """The trained top layers and the head: what one training step runs with ``K > 0``.

    ``TopHead(top, head)``: ``params`` are both's arrays (``encoder.layer.*`` and the head's
    ``rnn.*``, ``out.*``); ``config()`` is the head's (a checkpoint's ``"model"``)."""

    def __init__(self, top: TopLayers, head: SentimentHead):
        if float_dtype(top.dtype) != head.dtype:
            raise ValueError(f"top layers {top.dtype}, head {head.dtype}: one dtype")
        self.top, self.head = top, head
        self.params = {**head.params, **top.params}
        self.tape: list | None = None         # a list: every training forward's masks appended

    dtype = property(lambda self: self.head.dtype)
    xp = property(lambda self: self.head.xp)

    def config(self) -> dict:
        return self.head.config()

    def forward(self, features, lengths, training: bool = False, cache: bool = True):
        """h_{first} (B, T, H), lengths (B,) -> logits (B, 1) through the layers and the
        head."""
        hidden = self.top(features, lengths, training=training, cache=cache)
        logits = self.head(hidden, lengths, training=training, cache=cache)
        if training and self.tape is not None:
            self.tape.append(self.dropout_masks)
        return logits

    __call__ = forward

    def loss_and_grads(self, features, lengths, labels, batch_size: int | None = None):
        """(loss, grads, logits) of ``sum_b bce(z_b, y_b) / batch_size`` over this piece's
        reviews (``batch_size`` default: the piece's own size; the whole batch's size when the
        batch is run in pieces, whose losses and gradients then add up to the batch's)."""
        logits = self.forward(features, lengths, training=True)
        B = logits.shape[0]
        n = B if batch_size is None else batch_size
        y = as_float_array(labels, "labels", dtype=self.dtype, xp=self.xp).reshape(B, 1)
        loss = float(bce_with_logits(logits, y).sum()) / n
        grads = self.head.backward(bce_with_logits_grad(logits, y) / n, need_dx=True)
        d_hidden, self.head.d_features = self.head.d_features, None
        self.top.backward(d_hidden)
        return loss, {**grads, **self.top.grads}, logits

    @property
    def dropout_masks(self) -> dict:
        """``{"top": [per layer {site: mask}], "head": head.dropout_masks}``."""
        return {"top": self.top.dropout_masks, "head": self.head.dropout_masks}

    def state_dict(self) -> dict:
        return {**self.head.state_dict(), **self.top.state_dict()}

    def load_state_dict(self, state_dict) -> None:
        rest, _ = split_layer_params(dict(state_dict))
        self.top.load_state_dict({k: v for k, v in state_dict.items() if k not in rest})
        self.head.load_state_dict(rest)

    def rng_state(self) -> dict:
        return {**self.head.rng_state(), "top": self.top.rng_state()}

    def set_rng_state(self, state: dict) -> None:
        self.head.set_rng_state(state)
        self.top.set_rng_state(state["top"])

    def __repr__(self):
        return f"TopHead({self.top!r}, {self.head!r})"
