"""The BERT encoder side by side: :class:`scratch.bert.BertEncoder` against transformers'
``BertModel`` (softmax attention) and against :mod:`reference.bert_attention`'s mirror (the
swapped attentions), on real IMDB reviews with the packaged MiniLM.

:func:`compare_rows` gives the rows for ``python -m reference.compare``.
"""
from __future__ import annotations

import numpy as np
import torch

from .bert_attention import swap_attention
from .data import find_imdb, load_imdb, tokenize
from .encoders import load_encoder


def review_batch(tokenizer, n: int = 8, max_length: int = 128, path=None):
    """The first ``n`` test reviews, tokenized (truncated to ``max_length``) and right-padded:
    ``(input_ids, attention_mask)``, both (n, T) int64."""
    texts = load_imdb(find_imdb(path), splits=("test",))["test"].texts[:n]
    return pad(tokenize(tokenizer, texts, max_length=max_length))


def pad(seqs, pad_id: int = 0):
    """Right-pad id sequences: ``(input_ids, attention_mask)``, both (B, T_max) int64."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    return ids, mask


def last_hidden(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state


def compare_rows(repeat: int = 3, n: int = 8, max_length: int = 128):
    """Rows: MiniLM forward on ``n`` real reviews (<= ``max_length`` tokens) in float32 and
    float64, and two swapped attentions against the torch mirror (float64)."""
    from scratch.bert import BertEncoder

    from .compare import compare_row

    ref = load_encoder("minilm")                          # BertModel, frozen, eval mode
    model = ref.model
    ids, mask = review_batch(ref.tokenizer, n, max_length)
    rows = []
    shape = f"{n} reviews x {ids.shape[1]} tok"                  # names fit compare's column
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        enc = BertEncoder.from_pretrained(ref.source, dtype=name, backend="numpy")
        model.to(dtype)
        rows.append(compare_row(f"BERT MiniLM {name}: {shape}",
                                lambda enc=enc: enc(ids, mask),
                                lambda: last_hidden(model, ids, mask), repeat))
    for variant, label in ((dict(attention="efficient"), "efficient, all layers"),
                           (dict(attention="linear", swap_layers=2), "linear, top 2 layers")):
        swap_attention(model, **variant)                  # the float64 model from the loop
        swapped = enc.with_attention(**variant)
        rows.append(compare_row(f"BERT {label}, float64: {n} x {ids.shape[1]} tok",
                                lambda swapped=swapped: swapped(ids, mask),
                                lambda: last_hidden(model, ids, mask), repeat))
    swap_attention(model, "softmax")
    return rows
