"""The top ``K`` layers of a transformers ``BertModel`` or ``MPNetModel`` trained with the
assignment's head: the torch side of ``--unfreeze-top K`` (:mod:`scratch.top_layers` is the
NumPy one).

:class:`TopLayers` holds copies of transformers' own ``BertLayer`` (``MPNetLayer``) modules
``L-K .. L-1`` (trainable, ``requires_grad``), run on the cached hidden states entering layer
``L-K`` with the extended additive key mask ``(1 - keep) * finfo.min`` of shape
``(B, 1, 1, T)``, as ``BertModel`` builds it.  MPNet's layers also get its relative position
bias ``(1, h, T, T)``, computed as ``MPNetEncoder.compute_position_bias`` does from a frozen
copy of the encoder's table (a buffer: not trained, not in the state dict).
:class:`TopGRUHead` is a :class:`reference.model.GRUHead` with
those layers in front: its ``state_dict`` names are ``rnn.*``, ``out.*`` and
``encoder.layer.{l}.*`` (BertModel's), so a checkpoint's layers load back into the encoder by
name and its head into a ``GRUHead``.

Dropout.  In training, each layer applies dropout as transformers does (attention
probabilities at ``attention_probs_dropout_prob``, both sub-layer outputs at
``hidden_dropout_prob``, from torch's generator).  For comparing with scratch, given masks
replace the drawn ones (``masks=``: per layer ``{"attention": (B, h, T, T), "attention_output":
(B, T, H), "output": (B, T, H)}``, values 0 or 1 / (1 - p), None = none there): the two
hidden ``nn.Dropout`` modules are :class:`GivenDropout` (same ``p``, same draws when no mask is
given) and the attention runs through :func:`given_dropout_attention`, transformers'
``eager_attention_forward`` itself unless a mask is given.  MPNet's attention applies its
probability dropout through an ``nn.Dropout`` module of its own, which becomes a
:class:`GivenDropout` too.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder, MPNetLayer

from scratch.top_layers import FAMILIES

from .model import GRUHead

ATTENTION = "eager_given_dropout"
PREFIX = "encoder.layer."


def given_dropout_attention(module, query, key, value, attention_mask, scaling=None,
                            dropout: float = 0.0, **kwargs):
    """transformers' eager attention; with ``module.given_masks`` set (a forward with given
    masks), its probability dropout is ``P * module.given_mask`` (None: no dropout) instead of
    a draw.  ``softmax(Q K^T scaling + mask) V``, heads joined as transformers returns them."""
    if not getattr(module, "given_masks", False):
        return eager_attention_forward(module, query, key, value, attention_mask,
                                       scaling=scaling, dropout=dropout, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    if module.given_mask is not None:
        weights = weights * module.given_mask
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION, given_dropout_attention)


class GivenDropout(nn.Module):
    """``nn.Dropout(p)``, or multiplication by a given mask while :attr:`given` is set."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.given, self.mask = p, False, None

    def forward(self, x):
        if self.given:
            return x if self.mask is None else x * self.mask
        return nn.functional.dropout(x, self.p, self.training)


def position_table(model) -> torch.Tensor | None:
    """MPNet's relative position table (buckets, h) of a transformers model (a copy); None for
    BERT."""
    if model.config.model_type != "mpnet":
        return None
    return model.encoder.relative_attention_bias.weight.detach().clone()


class TopLayers(nn.Module):
    """Encoder layers ``first .. L-1`` of a BERT or MPNet config, trainable:
    ``top(x, lengths, masks)`` -> (B, T, H).  ``layer`` is a ModuleDict keyed by the layer
    index (``"5"``), so the parameter names are ``layer.5.attention.self.query.weight``, ...
    (MPNet: ``layer.5.attention.attn.q.weight``, ...).  MPNet needs ``table``, its relative
    position table (:func:`position_table`)."""

    def __init__(self, config, first: int, table: torch.Tensor | None = None):
        super().__init__()
        n_layers = config.num_hidden_layers
        if not 0 <= first < n_layers:
            raise ValueError(f"first trained layer {first} is outside 0..{n_layers - 1}")
        self.mpnet = _family(config) == "mpnet"
        if self.mpnet != (table is not None):
            raise ValueError("MPNet's trained layers need its relative position table, BERT's "
                             "none")
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = ATTENTION
        self.first = first
        with torch.random.fork_rng(devices=[]):      # their init draws leave torch's stream be
            self.layer = nn.ModuleDict({str(i): self._trainable(
                MPNetLayer(self.config) if self.mpnet else BertLayer(self.config, i))
                for i in range(first, n_layers)})
        # frozen, not saved: the encoder's own table, read again wherever the layers are built
        self.register_buffer("table", table, persistent=False)

    def _trainable(self, layer):
        if self.mpnet:
            layer.attention.attn.dropout = GivenDropout(layer.attention.attn.dropout.p)
            layer.attention.dropout = GivenDropout(layer.attention.dropout.p)
        else:
            layer.attention.self.config = self.config              # the attention it runs
            layer.attention.self.given_masks, layer.attention.self.given_mask = False, None
            layer.attention.output.dropout = GivenDropout(layer.attention.output.dropout.p)
        layer.output.dropout = GivenDropout(layer.output.dropout.p)
        return layer.requires_grad_(True)

    @classmethod
    def from_bert(cls, bert, k: int) -> TopLayers:
        """The top ``k`` layers of ``bert`` (a transformers BertModel or MPNetModel), their
        weights copied (on its device, in its dtype)."""
        top = cls(bert.config, first_trained(bert.config, k), position_table(bert))
        return top.copy_from(bert)

    def copy_from(self, bert) -> TopLayers:
        """These layers' weights := ``bert``'s layers of the same indices."""
        param = next(bert.parameters())
        self.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            for i, layer in self.layer.items():
                layer.load_state_dict(bert.encoder.layer[int(i)].state_dict())
        return self

    def position_bias(self, T: int, dtype) -> torch.Tensor | None:
        """MPNet's ``(1, h, T, T)`` bias, ``MPNetEncoder.compute_position_bias``'s maths on the
        frozen table; None for BERT."""
        if self.table is None:
            return None
        r = torch.arange(T, device=self.table.device)
        bucket = MPNetEncoder.relative_position_bucket(r[None, :] - r[:, None])   # (T, T)
        return self.table[bucket].permute(2, 0, 1).unsqueeze(0).to(dtype)         # (1, h, T, T)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, masks: list | None = None):
        """x (B, T, H) = the hidden states entering layer ``first``, lengths (B,) -> (B, T, H);
        ``masks``: given dropout masks, one dict per layer (bottom first), see the module
        docstring."""
        B, T, _ = x.shape
        keep = torch.arange(T, device=x.device)[None, :] < lengths.to(x.device)[:, None]
        ext = (~keep)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min   # (B, 1, 1, T)
        if masks is not None and len(masks) != len(self.layer):
            raise ValueError(f"dropout masks for {len(masks)} layers, {len(self.layer)} trained")
        bias = self.position_bias(T, x.dtype)                          # MPNet's, or None
        for j, layer in enumerate(self.layer.values()):
            with given_masks(layer, None if masks is None else masks[j], x):
                if bias is None:
                    x = layer(x, attention_mask=ext)
                else:
                    x = layer(x, attention_mask=ext, position_bias=bias)[0]
        return x


def _family(config) -> str:
    if config.model_type not in FAMILIES:
        raise ValueError(f"trained top layers need a BERT or MPNet encoder, got "
                         f"{config.model_type}")
    return config.model_type


def first_trained(config, k: int) -> int:
    """``L - k``, the first trained layer of a BERT or MPNet config of ``L`` layers
    (checked)."""
    n_layers = config.num_hidden_layers
    if not 1 <= k <= n_layers:
        raise ValueError(f"k must be in 1..{n_layers} (the encoder's layers), got {k}")
    _family(config)
    return n_layers - k


@contextlib.contextmanager
def given_masks(layer, masks: dict | None, like: torch.Tensor):
    """Within: ``layer`` (a trainable ``BertLayer`` or ``MPNetLayer``) applies ``masks``
    (tensors or arrays, cast to ``like``'s dtype and device) instead of drawing dropout masks;
    ``masks`` None: nothing changes."""
    if masks is None:
        yield
        return
    t = {k: None if m is None else torch.as_tensor(m, dtype=like.dtype, device=like.device)
         for k, m in masks.items()}
    if isinstance(layer, MPNetLayer):
        sites = ((layer.attention.attn.dropout, "mask", t.get("attention")),
                 (layer.attention.dropout, "mask", t.get("attention_output")),
                 (layer.output.dropout, "mask", t.get("output")))
        switches = [(module, "given") for module, _, _ in sites]
    else:
        sites = ((layer.attention.self, "given_mask", t.get("attention")),
                 (layer.attention.output.dropout, "mask", t.get("attention_output")),
                 (layer.output.dropout, "mask", t.get("output")))
        switches = [(layer.attention.self, "given_masks"),
                    (layer.attention.output.dropout, "given"), (layer.output.dropout, "given")]
    try:
        for module, name, mask in sites:
            setattr(module, name, mask)
        for module, name in switches:
            setattr(module, name, True)
        yield
    finally:
        for module, name, _ in sites:
            setattr(module, name, None)
        for module, name in switches:
            setattr(module, name, False)


class TopGRUHead(GRUHead):
    """A :class:`GRUHead` with trained encoder layers in front: ``model(x, lengths, masks)``,
    x the hidden states entering layer ``first`` -> logits (B, output_dim).

    ``TopGRUHead(config, first, emb_dim, hidden_dim, ..., table=None)``: the head's arguments
    after the encoder's config and its first trained layer (the head's weights are drawn as a
    ``GRUHead``'s, from the same torch generator state; MPNet: ``table`` its relative position
    table, :func:`position_table`); :meth:`from_bert` copies the layers' pretrained weights.
    ``masks``: ``{"top": [per layer], "head": GRUHead's masks}``
    (scratch's ``TopHead.dropout_masks``)."""

    def __init__(self, config, first: int, emb_dim: int, hidden_dim: int, output_dim: int,
                 n_layers: int, bidirectional: bool, dropout: float,
                 table: torch.Tensor | None = None):
        super().__init__(emb_dim, hidden_dim, output_dim, n_layers, bidirectional, dropout)
        self.encoder = TopLayers(config, first, table)

    @classmethod
    def from_bert(cls, bert, k: int, **head_args) -> TopGRUHead:
        """The top ``k`` layers of ``bert`` (pretrained weights) and a new head (drawn from
        torch's generator first, as ``GRUHead(**head_args)`` would be)."""
        model = cls(bert.config, first_trained(bert.config, k), **head_args,
                    table=position_table(bert))
        model.encoder.copy_from(bert)
        return model

    @property
    def first(self) -> int:
        return self.encoder.first

    def forward(self, features, lengths=None, masks: dict | None = None):
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[1], dtype=torch.int64)
        hidden = self.encoder(features, lengths, None if masks is None else masks["top"])
        return self.head(hidden, lengths, None if masks is None else masks["head"])


def layer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained layers' tensors (``encoder.layer.{l}.*``) of a :class:`TopGRUHead` (empty
    for a :class:`GRUHead`)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith(PREFIX)}
