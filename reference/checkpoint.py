"""Checkpoints of the sentiment head: written atomically, loaded safely.

A checkpoint directory holds

    config.json          the head's constructor arguments, the encoder, max_length
    model.safetensors    the head's weights (``rnn.*``, ``out.*``: the assignment's names)
    last.pt              resume state after the last finished epoch (optimizer, RNG, history)
    metrics.json         written by reference.train

Every file is written to a temporary name in the same folder, flushed, fsync'ed and renamed
(``os.replace``), so a crash never leaves half a file under a real name.  Weights load from
safetensors; the resume state loads with ``torch.load(weights_only=True)`` (no pickle code).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import atomic_write, write_json  # noqa: F401  (re-exported)
from .model import BERTGRUSentiment, GRUHead

CONFIG, WEIGHTS, STATE, METRICS = "config.json", "model.safetensors", "last.pt", "metrics.json"
HEAD_ARGS = ("emb_dim", "hidden_dim", "output_dim", "n_layers", "bidirectional", "dropout")


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing, incomplete or does not fit the model (message names the file)."""


def head_state(model: GRUHead) -> dict[str, torch.Tensor]:
    """The head's tensors (``rnn.*``, ``out.*``) of a GRUHead or a BERTGRUSentiment."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith(("rnn.", "out."))}


def load_head_state(model: GRUHead, state: dict[str, torch.Tensor], where: str = "state") -> None:
    """Copy ``state`` into the head part of ``model``; names and shapes must match exactly."""
    want = head_state(model)
    if set(state) != set(want):
        raise CheckpointError(f"{where}: head tensors {sorted(set(state) ^ set(want))} "
                              "missing or unexpected")
    for k, w in want.items():
        if state[k].shape != w.shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(state[k].shape)}, the model "
                                  f"wants {tuple(w.shape)}")
    model.load_state_dict(state, strict=False)


def save_weights(folder, model: GRUHead) -> None:
    atomic_write(Path(folder) / WEIGHTS, st_save(head_state(model)))


def read_config(folder) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint directory")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder}: no {name} (not a finished reference.train checkpoint)")
    config = json.loads((folder / CONFIG).read_text())
    missing = [a for a in HEAD_ARGS if a not in config.get("model", {})]
    if missing:
        raise CheckpointError(f"{folder / CONFIG}: model arguments {missing} missing")
    return config


def load_head(folder, device="cpu") -> tuple[GRUHead, dict]:
    """(GRUHead in eval mode with the saved weights, config) from a checkpoint directory."""
    config = read_config(folder)
    head = GRUHead(**config["model"]).to(device).eval()
    load_head_state(head, st_load((Path(folder) / WEIGHTS).read_bytes()), str(Path(folder) / WEIGHTS))
    return head, config


def load_full_model(folder, bert, device="cpu") -> BERTGRUSentiment:
    """BERTGRUSentiment(bert, ...) with the saved head, eval mode, encoder frozen."""
    config = read_config(folder)
    m = dict(config["model"])
    if (emb := m.pop("emb_dim")) != bert.config.hidden_size:
        raise CheckpointError(f"{folder}: the head was trained on {emb}-dim features, the encoder "
                              f"gives {bert.config.hidden_size}")
    model = BERTGRUSentiment(bert, **m)
    load_head_state(model, st_load((Path(folder) / WEIGHTS).read_bytes()), str(Path(folder) / WEIGHTS))
    for name, p in model.named_parameters():
        if name.startswith("bert"):
            p.requires_grad = False
    return model.to(device).eval()


def save_state(folder, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(Path(folder) / STATE, buf.getvalue())


def load_state(folder) -> dict:
    path = Path(folder) / STATE
    if not path.exists():
        raise CheckpointError(f"{path}: nothing to resume (no finished epoch saved there)")
    return torch.load(path, map_location="cpu", weights_only=True)
