"""Checkpoints of the sentiment head: written atomically, verified when loaded.

A checkpoint directory holds

    config.json          the head's constructor arguments, the encoder, max_length, and
                         "weights_sha256": the sha256 (hex) of model.safetensors' bytes
    model.safetensors    the head's weights (``rnn.*``, ``out.*``: the assignment's names)
    last.pt              resume state after the last finished epoch (optimizer, RNG, history)
    metrics.json         written by reference.train

Every file is written to a temporary name in the same folder, flushed, fsync'ed and renamed
(``os.replace``), so a crash never leaves half a file under a real name.  The weights and their
checksum are two files, written in that order (:func:`save_weights`): model.safetensors, then
config.json with its sha256.  A crash between the two leaves new weights beside the old
checksum, which refuses to load (``reference.train --resume`` repeats that epoch and writes
both again): a refusal, never a wrong load.

Loading (:func:`load_head`) checks, before a tensor is used and before any encoder is loaded,
and raises :class:`CheckpointError` with a one-line message naming the file:

* config.json is a JSON object with the head's arguments (of the right types) and a checksum;
* the sha256 of model.safetensors is that checksum (flipped bytes, a truncated or swapped file);
* the safetensors header parses; the tensors are the head's names, shapes and dtype;
* every value is finite (no NaN, no inf).

Checkpoints written before checksums (no ``weights_sha256``) are refused: nothing vouches that
their bytes are the ones training wrote, and flipped bytes in a float tensor load as plausible
weights that give confident wrong scores.  ``python -m reference.checkpoint stamp DIR`` adds the
checksum of the file as it is now, once every other check passes: its owner vouches for it.
The weights load from safetensors; the resume state with ``torch.load(weights_only=True)``
(no pickle code).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import atomic_write, write_json  # noqa: F401  (re-exported)
from .model import BERTGRUSentiment, GRUHead

CONFIG, WEIGHTS, STATE, METRICS = "config.json", "model.safetensors", "last.pt", "metrics.json"
CHECKSUM = "weights_sha256"
HEAD_ARGS = {"emb_dim": int, "hidden_dim": int, "output_dim": int, "n_layers": int,
             "bidirectional": bool, "dropout": float}


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing, damaged, incomplete or does not fit the model (message names
    the file)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def head_state(model: GRUHead) -> dict[str, torch.Tensor]:
    """The head's tensors (``rnn.*``, ``out.*``) of a GRUHead or a BERTGRUSentiment."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith(("rnn.", "out."))}


def check_head_state(model: GRUHead, state: dict[str, torch.Tensor], where: str = "state") -> None:
    """``state`` has exactly the head's tensor names, shapes and dtypes, and finite values."""
    want = head_state(model)
    if set(state) != set(want):
        raise CheckpointError(f"{where}: head tensors {sorted(set(state) ^ set(want))} "
                              "missing or unexpected")
    for k, w in want.items():
        if state[k].shape != w.shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(state[k].shape)}, the model "
                                  f"wants {tuple(w.shape)}")
        if state[k].dtype != w.dtype:
            raise CheckpointError(f"{where}: {k} is {state[k].dtype}, the model wants {w.dtype}")
        if not torch.isfinite(state[k]).all():
            bad = int((~torch.isfinite(state[k])).sum())
            raise CheckpointError(f"{where}: {k} holds {bad} NaN or infinite values")


def load_head_state(model: GRUHead, state: dict[str, torch.Tensor], where: str = "state") -> None:
    """Copy ``state`` into the head part of ``model`` after :func:`check_head_state`."""
    check_head_state(model, state, where)
    model.load_state_dict(state, strict=False)


def save_weights(folder, model: GRUHead, config: dict | None = None) -> None:
    """model.safetensors, then config.json (``config``, default: the one there) with its
    sha256: see the module docstring for why in this order."""
    folder = Path(folder)
    if config is None:
        config = _read_json(folder / CONFIG) if (folder / CONFIG).exists() else {}
    data = st_save(head_state(model))
    atomic_write(folder / WEIGHTS, data)
    write_json(folder / CONFIG, {**config, CHECKSUM: sha256(data)})


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


def read_config(folder, checksum: bool = True) -> dict:
    """config.json of a finished checkpoint, its model arguments checked (and, with
    ``checksum``, its ``weights_sha256`` present)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint directory")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name} (not a finished reference.train checkpoint)")
    config = _read_json(folder / CONFIG)
    model = config.get("model")
    if not isinstance(model, dict) or (missing := [a for a in HEAD_ARGS if a not in model]):
        raise CheckpointError(f"{folder / CONFIG}: model arguments "
                              f"{missing if isinstance(model, dict) else list(HEAD_ARGS)} missing")
    for arg, kind in HEAD_ARGS.items():
        v = model[arg]
        ok = (isinstance(v, bool) if kind is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) and
              (0 <= v < 1 if arg == "dropout" else isinstance(v, int) and v > 0))
        if not ok:
            raise CheckpointError(f"{folder / CONFIG}: model argument {arg}={v!r} is not valid")
    if checksum and not re.fullmatch(r"[0-9a-f]{64}", str(config.get(CHECKSUM, ""))):
        raise CheckpointError(
            f"{folder / CONFIG}: no valid {CHECKSUM} (written before checksums?); if you trust "
            f"{WEIGHTS}, run: python -m reference.checkpoint stamp {folder}")
    return config


def read_weights(folder, config: dict) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, whose bytes must hash to ``config``'s checksum."""
    path = Path(folder) / WEIGHTS
    data = path.read_bytes()
    if (got := sha256(data)) != config[CHECKSUM]:
        raise CheckpointError(f"{path}: sha256 {got[:12]}... is not the {CHECKSUM} "
                              f"{config[CHECKSUM][:12]}... in {CONFIG} (damaged or replaced file)")
    return parse_weights(data, path)


def parse_weights(data: bytes, path) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def load_head(folder, device="cpu") -> tuple[GRUHead, dict]:
    """(GRUHead in eval mode with the saved weights, config), every check above passed."""
    config = read_config(folder)
    state = read_weights(folder, config)
    head = GRUHead(**config["model"])
    load_head_state(head, state, str(Path(folder) / WEIGHTS))
    return head.to(device).eval(), config


def full_model(bert, head: GRUHead, config: dict, where, device="cpu") -> BERTGRUSentiment:
    """BERTGRUSentiment(bert, ...) with ``head``'s weights, eval mode, encoder frozen."""
    m = dict(config["model"])
    if (emb := m.pop("emb_dim")) != bert.config.hidden_size:
        raise CheckpointError(f"{where}: the head was trained on {emb}-dim features, the encoder "
                              f"gives {bert.config.hidden_size}")
    model = BERTGRUSentiment(bert, **m)
    load_head_state(model, head_state(head), str(where))
    for name, p in model.named_parameters():
        if name.startswith("bert"):
            p.requires_grad = False
    return model.to(device).eval()


def load_full_model(folder, bert, device="cpu") -> BERTGRUSentiment:
    """:func:`full_model` of the checkpoint in ``folder`` (verified by :func:`load_head`)."""
    head, config = load_head(folder)
    return full_model(bert, head, config, folder, device)


def stamp(folder) -> str:
    """Add ``weights_sha256`` to a checkpoint written before checksums, once its weights pass
    every other check; returns the checksum."""
    config, path = read_config(folder, checksum=False), Path(folder) / WEIGHTS
    data = path.read_bytes()
    check_head_state(GRUHead(**config["model"]), parse_weights(data, path), str(path))
    write_json(Path(folder) / CONFIG, {**config, CHECKSUM: sha256(data)})
    return sha256(data)


def save_state(folder, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(Path(folder) / STATE, buf.getvalue())


def load_state(folder) -> dict:
    path = Path(folder) / STATE
    if not path.exists():
        raise CheckpointError(f"{path}: nothing to resume (no finished epoch saved there)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:        # truncated zip, foreign pickle, ...: never run, never half-read
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: unreadable resume state ({type(e).__name__}: {first})") from e


def main(argv=None) -> int:
    from . import cli

    p = cli.Parser(prog="python -m reference.checkpoint",
                   description="Checkpoint maintenance.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stamp", help=f"add {CHECKSUM} to a checkpoint written before checksums "
                                     "(after checking its weights load and are finite)")
    s.add_argument("folder")
    a = p.parse_args(argv)
    try:
        print(f"{a.folder}: {CHECKSUM} {stamp(a.folder)}")
    except CheckpointError as e:
        p.error(cli.one_line(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
