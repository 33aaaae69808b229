r"""The torch mirror of :mod:`scratch.bert`'s attention switch: a ``transformers`` BertModel whose
self-attention runs Efficient Attention (Shen et al.) or linear attention (Katharopoulos et al.)
in all layers or only some, same projections and weights.

How it plugs in: through transformers' own extension points, no monkeypatching.

* ``AttentionInterface.register(NAME, swapped_attention)``: every ``BertSelfAttention`` calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` with
  ``(module, query, key, value, attention_mask, dropout=, scaling=)``, query/key/value of shape
  (B, heads, T, d), and expects ``(output (B, T, heads, d), weights or None)``.
* ``AttentionMaskInterface.register(NAME, sdpa_mask)``: without it transformers builds *no*
  padding mask for an unknown implementation name (``_preprocess_mask_arguments`` exits early
  and the function gets ``attention_mask=None``, silently attending to padding).  With SDPA's
  mask builder the mask arrives as a boolean (B, 1, T, T), True = attend, or as ``None`` when
  nothing is padded.
* ``model.set_attn_implementation(NAME)`` selects it; the choice itself (which attention, its
  options, which layers) is a plain dict on the config, ``config.swapped_attention``, which the
  function reads through ``module.config``; the layer comes from ``module.layer_idx``
  (``BertSelfAttention`` carries it).  Layers not in the set run transformers' own SDPA path.

What a swapped layer computes (exactly :mod:`scratch.bert`'s definition): the raw per-head
``Q, K, V`` (the ``scaling = 1/sqrt(d)`` transformers passes is *not* applied; it belongs to
softmax attention), padded keys removed with the key mask ``mask[:, :, 0, :]`` (a padding mask
is the same for every query row; anything else is refused):

* efficient, ``normalization="softmax"``: ``softmax_d(Q) (softmax_T(K)^T V)``;
  ``"scaling"``: ``Q K^T V / m`` with m real keys;
* linear: ``phi(Q_i)^T S / (phi(Q_i)^T Z + eps)``, ``phi = elu(., alpha) + 1``.

The maths is :mod:`reference.attention`'s torch functions.
"""
from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import attention as A

NAME = "scratch_swapped"
CONFIG_ATTR = "swapped_attention"
SWAPPABLE = ("efficient", "linear")


def top_layers(num_layers: int, swap_layers) -> list[int]:
    """``None`` -> every layer, an int k -> the top k (``num_layers-k .. num_layers-1``),
    an iterable -> those indices (sorted)."""
    if swap_layers is None:
        return list(range(num_layers))
    if isinstance(swap_layers, int) and not isinstance(swap_layers, bool):
        if not 0 <= swap_layers <= num_layers:
            raise ValueError(f"top {swap_layers} layers of {num_layers}?")
        return list(range(num_layers - swap_layers, num_layers))
    idx = sorted({int(i) for i in swap_layers})
    if any(not 0 <= i < num_layers for i in idx):
        raise ValueError(f"layer indices {idx} outside 0..{num_layers - 1}")
    return idx


def key_mask(attention_mask, batch: int, m: int):
    """SDPA's boolean (B, 1, n, m) padding mask -> key mask (B, 1, m) (broadcast over heads)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        raise ValueError(f"expected SDPA's boolean 4-D mask, got {attention_mask.dtype} "
                         f"{tuple(attention_mask.shape)}")
    keep = attention_mask[:, :, 0, :]                                  # (B, 1, m)
    if not bool((attention_mask == keep[:, :, None, :]).all()):
        raise ValueError("the mask differs between query rows: not a key-padding mask")
    return keep.expand(batch, 1, m)


def swapped_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling=None, **kwargs):
    """The registered attention function (see the module docstring)."""
    swap = getattr(module.config, CONFIG_ATTR, None)
    if not swap or module.layer_idx not in swap["layers"]:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("swapped attention is for the frozen encoder: no attention dropout")
    keep = key_mask(attention_mask, query.shape[0], key.shape[-2])
    if swap["attention"] == "efficient":
        out = A.efficient_attention(query, key, value, key_mask=keep,
                                    normalization=swap["normalization"])
    else:
        out = A.linear_attention(query, key, value, key_mask=keep, alpha=swap["alpha"],
                                 eps=swap["eps"])
    return out.transpose(1, 2).contiguous(), None                      # (B, T, heads, d)


AttentionInterface.register(NAME, swapped_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def swap_attention(model, attention: str = "softmax", *, swap_layers=None,
                   normalization: str = "softmax", alpha: float = 1.0, eps: float = 1e-6):
    """Make ``model`` (a transformers BertModel) run ``attention`` in the layers ``swap_layers``
    selects (None = all, int = top k, set = indices); ``"softmax"`` restores SDPA everywhere
    and removes ``config.swapped_attention``, so the config (and with it the feature cache's
    key, :func:`reference.pipeline.features.encoder_fingerprint`) is the untouched model's again.
    Returns the model (changed in place)."""
    if attention == "softmax":
        if hasattr(model.config, CONFIG_ATTR):
            delattr(model.config, CONFIG_ATTR)
        model.set_attn_implementation("sdpa")
        return model
    if attention not in SWAPPABLE:
        raise ValueError(f"attention must be softmax or one of {SWAPPABLE}, got {attention!r}")
    if normalization not in ("softmax", "scaling"):
        raise ValueError(f"unknown normalization {normalization!r}")
    if not (0 < alpha <= 1 and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"need 0 < alpha <= 1 and eps >= 0, got alpha={alpha}, eps={eps}")
    layers = top_layers(model.config.num_hidden_layers, swap_layers)
    setattr(model.config, CONFIG_ATTR, {"attention": attention, "layers": layers,
                                        "normalization": normalization, "alpha": float(alpha),
                                        "eps": float(eps)})
    model.set_attn_implementation(NAME)
    return model
