"""Helpers for the BERT tests: random BERT and MPNet models made by torch, model folders edited
in place, torch's last hidden states, real reviews as padded id batches, the relative error used
throughout."""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel
from transformers.utils import logging as hf_logging

from reference.pipeline.data import load_imdb, tokenize
from reference.pipeline.encoders import minilm_path
from scratch.pipeline.tokenizer import pad_batch as pad

hf_logging.set_verbosity_error()    # MiniLM's unused pooler weights: no load report


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over whole arrays (padded positions included)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomized(model, seed: int, scale: float):
    """``model`` with every parameter drawn N(0, scale^2) (LayerNorm weights 1 + noise), so
    that no part of the forward pass is near-trivial (default init has LayerNorm = identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * scale
            p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") else noise)
    return model


def random_bert(seed: int, scale: float = 0.5, **config) -> BertModel:
    """A BertModel, no dropout, its parameters :func:`randomized`."""
    cfg = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config)
    return randomized(BertModel(cfg, add_pooling_layer=False).eval().requires_grad_(False),
                      seed, scale)


def random_mpnet(seed: int, scale: float = 0.5, **config) -> MPNetModel:
    """An MPNetModel, no dropout, its parameters (the relative position table included)
    :func:`randomized`."""
    cfg = MPNetConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config)
    return randomized(MPNetModel(cfg, add_pooling_layer=False).eval().requires_grad_(False),
                      seed, scale)


def edit_config(folder, **changes) -> None:
    """A model folder's config.json with ``changes`` written over it."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_weights(folder, fn) -> None:
    """A model folder's model.safetensors after ``fn(weights)`` changed the dict in place."""
    w = load_file(folder / "model.safetensors")
    fn(w)
    save_file(w, folder / "model.safetensors")


def torch_hidden(model, ids, mask=None, types=None) -> np.ndarray:
    """``model(...).last_hidden_state`` as a NumPy array (inputs on the model's device)."""
    dev = next(model.parameters()).device

    def on(a):
        return torch.as_tensor(np.asarray(a), device=dev)

    kw = {}
    if mask is not None:
        kw["attention_mask"] = on(mask)
    if types is not None:
        kw["token_type_ids"] = on(types)
    with torch.no_grad():
        return model(on(ids), **kw).last_hidden_state.cpu().numpy()


def minilm_torch(dtype=torch.float64, folder=None) -> BertModel:
    """transformers' BertModel of the MiniLM folder (default: the packaged one)."""
    return BertModel.from_pretrained(folder or minilm_path(), add_pooling_layer=False
                                     ).eval().to(dtype)


def review_batches(imdb_path, tokenizer):
    """Real test-split reviews as right-padded batches of different lengths:
    (name, input_ids (B, T), attention_mask (B, T)).  Chosen deterministically: short reviews
    whole, and long reviews truncated to 512 (MiniLM's limit) beside shorter ones."""
    texts = load_imdb(imdb_path, splits=("test",))["test"].texts
    ids = tokenize(tokenizer, texts[:400], max_length=512)
    lengths = np.array([len(i) for i in ids])
    order = np.argsort(lengths)
    short = [ids[i] for i in order[:4]]                                  # the 4 shortest
    mixed = [ids[order[-1]], ids[order[len(order) // 2]], ids[order[5]]]  # 512, median, short
    return [("short", *pad(short)), ("mixed", *pad(mixed))]

