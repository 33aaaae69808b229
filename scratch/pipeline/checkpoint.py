"""The reference checkpoint format, read and written without torch.

A checkpoint folder (the same as ``reference.pipeline.checkpoint``'s)::

    config.json          {"model": {emb_dim, hidden_dim, output_dim, n_layers, bidirectional,
                          dropout}, "weights_sha256": sha256 hex of model.safetensors' bytes,
                          and the run's settings (encoder, max_length, seed, ...)}
    model.safetensors    the head's tensors, float32, the reference's names (``rnn.weight_ih_l0``,
                         ..., ``out.weight``, ``out.bias``); after ``--unfreeze-top K`` also
                         the K trained encoder layers, ``encoder.layer.{l}.*`` (BertModel's
                         names; config.json then says ``"unfreeze_top": K``)
    last.safetensors     scratch's resume state (:func:`save_state`); the reference's is last.pt
    metrics.json         written by the training script

Writing: model.safetensors first, then config.json with its checksum, each atomically
(:mod:`scratch.pipeline.atomic`).  A crash between the two leaves new weights beside an old
checksum: a refusal to load, never a wrong load.

Loading (:func:`load_head`) checks everything before a weight is used, and says what is wrong in
a one-line :class:`CheckpointError` naming the file: the folder and both files exist, config.json
is a JSON object with valid model arguments, model.safetensors hashes to ``weights_sha256`` (when
present; ``require_checksum=True`` refuses a checkpoint without one), its header parses, its
tensors are the head's names and shapes, in float32 or float64, with finite values.  A
checkpoint with trained encoder layers loads through :func:`load_checkpoint` (the head and the
layers' tensors; their names, count and ``unfreeze_top`` checked here, their shapes against the
encoder when they are put into it); :func:`load_head` refuses it, so no caller scores with the
head alone on an encoder whose top it was not trained with.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..backend import to_numpy
from ..sentiment import HEAD_ARGS, SentimentHead
from ..top_layers import FAMILIES, checkpoint_names, split_layer_params
from .atomic import atomic_write, write_json

CONFIG, WEIGHTS, METRICS = "config.json", "model.safetensors", "metrics.json"
STATE = "last.safetensors"
CHECKSUM = "weights_sha256"
SAVE_DTYPE = np.float32                  # the reference format (its GRUHead is float32)


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing, damaged, incomplete or does not fit the model (one line, naming
    the file).  A FileNotFoundError, as ``reference.pipeline.checkpoint.CheckpointError``."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- writing ---------------------------------------------------------------------------------

def save_weights(folder, head: SentimentHead, config: dict | None = None) -> dict:
    """Write model.safetensors (float32), then config.json = ``config`` (default: the folder's
    current one, or {}) with the head's ``"model"`` arguments and the weights' checksum.
    Returns the config written."""
    folder = Path(folder)
    if config is None:
        config = read_json(folder / CONFIG) if (folder / CONFIG).exists() else {}
    data = st_save({n: np.asarray(to_numpy(p), dtype=SAVE_DTYPE, order="C")
                    for n, p in head.params.items()})
    atomic_write(folder / WEIGHTS, data)
    config = {**config, "model": head.config(), CHECKSUM: sha256(data)}
    write_json(folder / CONFIG, config)
    return config


# ---- reading ---------------------------------------------------------------------------------

def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


def read_config(folder, require_checksum: bool = False) -> dict:
    """config.json of a checkpoint folder, its model arguments and checksum (if any, or
    required) checked.  (``reference.pipeline.checkpoint`` reads through this too.)"""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint directory")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name} (not a finished checkpoint)")
    path = folder / CONFIG
    config = read_json(path)
    model = config.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no \"model\" object with the head's arguments")
    missing = [a for a in HEAD_ARGS if a not in model]
    if missing:
        raise CheckpointError(f"{path}: model arguments {missing} missing")
    for arg in HEAD_ARGS:
        v = model[arg]
        ok = (isinstance(v, bool) if arg == "bidirectional" else
              isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
              if arg == "dropout" else isinstance(v, int) and not isinstance(v, bool) and v > 0)
        if not ok:
            raise CheckpointError(f"{path}: model argument {arg}={v!r} is not valid")
    if CHECKSUM in config or require_checksum:
        if not re.fullmatch(r"[0-9a-f]{64}", str(config.get(CHECKSUM, ""))):
            raise CheckpointError(
                f"{path}: no valid {CHECKSUM} (a sha256 hex digest; written before checksums?); "
                f"if you trust {WEIGHTS}, run: "
                f"python -m reference.pipeline.checkpoint stamp {folder}")
    return config


def read_weights(folder, config: dict) -> dict[str, np.ndarray]:
    """The tensors of model.safetensors (NumPy), checked: checksum (if in ``config``), header,
    float dtype, finite values."""
    path = Path(folder) / WEIGHTS
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({_one_line(e)})") from None
    if CHECKSUM in config and (got := sha256(data)) != config[CHECKSUM]:
        raise CheckpointError(f"{path}: sha256 {got[:12]}... is not the {CHECKSUM} "
                              f"{config[CHECKSUM][:12]}... in {CONFIG} (damaged or replaced file)")
    try:
        tensors = st_load(data)
    except Exception as e:          # SafetensorError, or a dtype NumPy lacks (bf16)
        raise CheckpointError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
    for name, t in tensors.items():
        if t.dtype not in (np.float32, np.float64):
            raise CheckpointError(f"{path}: {name} is {t.dtype}, not float32 or float64")
        if not np.isfinite(t).all():
            raise CheckpointError(f"{path}: {name} holds {int((~np.isfinite(t)).sum())} NaN or "
                                  "infinite values")
    return tensors


def load_head(folder, dtype="float32", xp=None, require_checksum: bool = False
              ) -> tuple[SentimentHead, dict]:
    """(SentimentHead with the saved weights, config) from a checkpoint folder written by
    :func:`save_weights` or by ``reference.pipeline.train``; every check of the module
    docstring passed.  A checkpoint with trained encoder layers is refused (one line: use
    :func:`load_checkpoint`)."""
    head, layers, config = load_checkpoint(folder, dtype, xp, require_checksum)
    if layers:
        raise CheckpointError(f"{Path(folder) / WEIGHTS}: holds the {len(layers)} encoder "
                              f"layers trained with the head (unfreeze_top): the head alone "
                              f"would score with the untrained ones")
    return head, config


def unfreeze_top(config: dict, where) -> int:
    """config.json's ``unfreeze_top`` (0 when absent), checked."""
    k = config.get("unfreeze_top", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise CheckpointError(f"{where}: unfreeze_top must be an integer >= 0, got {k!r}")
    return k


def load_checkpoint(folder, dtype="float32", xp=None, require_checksum: bool = False
                    ) -> tuple[SentimentHead, dict, dict]:
    """(head, trained layers ``{index: {name: array}}`` (empty for a frozen-encoder run),
    config) of a checkpoint folder, every check of the module docstring passed, and: the
    layers are ``unfreeze_top`` consecutive top layers with every tensor of a BERT layer."""
    config = read_config(folder, require_checksum)
    path = Path(folder) / WEIGHTS
    rest, layers = split_layers(read_weights(folder, config), config, folder)
    head = SentimentHead(**config["model"], dtype=dtype, xp=xp)
    try:
        head.load_state_dict(rest)
    except ValueError as e:
        raise CheckpointError(f"{path}: {_one_line(e)}") from None
    return head, layers, config


def split_layers(tensors: dict, config: dict, folder) -> tuple[dict, dict]:
    """(the head's tensors, trained layers ``{index: {name: tensor}}``) of a checkpoint's
    tensors (NumPy or torch), checked: config.json's ``unfreeze_top`` K consecutive layers,
    each with exactly a BERT or an MPNet layer's tensor names, one family for all
    (:func:`scratch.top_layers.checkpoint_names`).
    (``reference.pipeline.checkpoint`` checks through this too.)"""
    path = Path(folder) / WEIGHTS
    k = unfreeze_top(config, Path(folder) / CONFIG)
    try:
        rest, layers = split_layer_params(tensors)
    except ValueError as e:
        raise CheckpointError(f"{path}: {_one_line(e)}") from None
    indices = sorted(layers)
    first = indices[0] if indices else 0
    if len(indices) != k or indices != list(range(first, first + k)):
        raise CheckpointError(f"{path}: encoder layers {indices} for unfreeze_top {k} in "
                              f"{CONFIG} (the top {k} layers expected)")
    families = {f: set(checkpoint_names(f).values()) for f in FAMILIES}
    for i, names in layers.items():
        family = next((f for f, want in families.items() if set(names) == want), None)
        if family is None:                     # the nearest family's missing / extra names
            want = min(families.values(), key=lambda w: len(set(names) ^ w))
            raise CheckpointError(f"{path}: encoder layer {i}: tensors "
                                  f"{sorted(set(names) ^ want)[:3]} missing or unexpected")
        families = {family: families[family]}  # every layer of the same family
    return rest, layers


# ---- the resume state: nested dicts of arrays and JSON values, one safetensors file ---------

_ARRAY = "__array__"


def save_state(folder, state: dict) -> None:
    """Write ``state`` (dicts with string keys, lists, JSON values and arrays, e.g.
    ``{"model": head.state_dict(), "optimizer": adam.state_dict(), "rng": head.rng_state(),
    "epoch": 3, "history": [...]}``) to ``folder/last.safetensors`` atomically: the arrays as
    tensors, the rest as JSON in the header, with a sha256 of the tensor bytes."""
    tensors: dict[str, np.ndarray] = {}

    def encode(obj, path):
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise TypeError(f"save_state: keys of {path or 'state'} must be strings")
            return {k: encode(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            tensors[path] = np.asarray(to_numpy(obj), order="C")
            return {_ARRAY: path}
        if isinstance(obj, np.generic):
            return obj.item()
        return obj

    skeleton = encode(state, "")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].tobytes())
    meta = {"state": json.dumps(skeleton), "sha256": digest.hexdigest()}
    atomic_write(Path(folder) / STATE, st_save(tensors, metadata=meta))


def load_state(folder) -> dict:
    """:func:`save_state`'s ``state`` back (arrays as NumPy), verified against its checksum."""
    path = Path(folder) / STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: nothing to resume (no finished epoch saved there)")
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n])["__metadata__"]
        skeleton = json.loads(meta["state"])
        digest = hashlib.sha256()
        for name in sorted(tensors):
            digest.update(tensors[name].tobytes())
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable resume state ({_one_line(e)})") from None
    if digest.hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{path}: tensor bytes do not match their sha256 (damaged file)")

    def decode(obj):
        if isinstance(obj, dict):
            if set(obj) == {_ARRAY}:
                return tensors[obj[_ARRAY]]
            return {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj
    try:
        return decode(skeleton)
    except KeyError as e:
        raise CheckpointError(f"{path}: unreadable resume state (no tensor {e})") from None
