"""Checkpoints of the sentiment head: written atomically, verified when loaded.

A checkpoint directory holds

    config.json          the head's constructor arguments, the encoder, max_length, and
                         "weights_sha256": the sha256 (hex) of model.safetensors' bytes
    model.safetensors    the head's weights (``rnn.*``, ``out.*``: the assignment's names);
                         after ``--unfreeze-top K`` also the trained encoder layers
                         (``encoder.layer.{l}.*``, BertModel's names; ``"unfreeze_top": K``
                         in config.json): :func:`load_parts`, :func:`full_model`
    last.pt              resume state after the last finished epoch (optimizer, RNG, history)
    metrics.json         written by reference.pipeline.train

Every file is written to a temporary name in the same folder, flushed, fsync'ed and renamed
(``os.replace``), so a crash never leaves half a file under a real name.  The weights and their
checksum are two files, written in that order (:func:`save_weights`): model.safetensors, then
config.json with its sha256.  A crash between the two leaves new weights beside the old
checksum, which refuses to load (``reference.pipeline.train --resume`` repeats that epoch and
writes both again): a refusal, never a wrong load.

Loading (:func:`load_head`) checks, before a tensor is used and before any encoder is loaded,
and raises :class:`CheckpointError` with a one-line message naming the file:

* config.json is a JSON object with the head's arguments (of the right types) and a checksum;
* the sha256 of model.safetensors is that checksum (flipped bytes, a truncated or swapped file);
* the safetensors header parses; the tensors are the head's names, shapes and dtype;
* every value is finite (no NaN, no inf).

Checkpoints written before checksums (no ``weights_sha256``) are refused: nothing vouches that
their bytes are the ones training wrote, and flipped bytes in a float tensor load as plausible
weights that give confident wrong scores.  ``python -m reference.pipeline.checkpoint stamp DIR``
adds the checksum of the file as it is now, once every other check passes: its owner vouches for it.
The weights load from safetensors; the resume state with ``torch.load(weights_only=True)``
(no pickle code).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from scratch.pipeline import checkpoint as scratch_ckpt
from scratch.pipeline.atomic import atomic_write, write_json  # noqa: F401  (re-exported)
from scratch.pipeline.checkpoint import (  # noqa: F401
    CHECKSUM,
    CONFIG,
    METRICS,
    WEIGHTS,
    CheckpointError,
    read_json,
    sha256,
)

from ..model import BERTGRUSentiment, GRUHead
from ..top_layers import TopGRUHead, layer_state, position_table

STATE = "last.pt"          # the reference's resume state (scratch's is last.safetensors)


def head_state(model: GRUHead) -> dict[str, torch.Tensor]:
    """The head's tensors (``rnn.*``, ``out.*``) of a GRUHead or a BERTGRUSentiment."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith(("rnn.", "out."))}


def model_state(model: GRUHead) -> dict[str, torch.Tensor]:
    """The head's tensors and, for a :class:`reference.top_layers.TopGRUHead`, its trained
    layers' (``encoder.layer.{l}.*``): what model.safetensors holds."""
    return {**head_state(model), **layer_state(model)}


def check_head_state(model: GRUHead, state: dict[str, torch.Tensor], where: str = "state") -> None:
    """``state`` has exactly the tensor names, shapes and dtypes of the head (and of the
    trained layers of a TopGRUHead), and finite values."""
    want = model_state(model)
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
    """Copy ``state`` into the head part (and trained layers) of ``model`` after
    :func:`check_head_state`."""
    check_head_state(model, state, where)
    model.load_state_dict(state, strict=False)


def save_weights(folder, model: GRUHead, config: dict | None = None) -> None:
    """model.safetensors, then config.json (``config``, default: the one there) with its
    sha256: see the module docstring for why in this order."""
    folder = Path(folder)
    if config is None:
        config = read_json(folder / CONFIG) if (folder / CONFIG).exists() else {}
    data = st_save(model_state(model))
    atomic_write(folder / WEIGHTS, data)
    write_json(folder / CONFIG, {**config, CHECKSUM: sha256(data)})


def read_config(folder, checksum: bool = True) -> dict:
    """config.json of a finished checkpoint, its model arguments checked (and, with ``checksum``,
    its ``weights_sha256`` present): :func:`scratch.pipeline.checkpoint.read_config`."""
    return scratch_ckpt.read_config(folder, require_checksum=checksum)


def read_weights(folder, config: dict) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors as torch tensors, checked by
    :func:`scratch.pipeline.checkpoint.read_weights`: the bytes hash to ``config``'s checksum (if it
    has one), the header parses, float tensors, finite values."""
    return {k: torch.from_numpy(v) for k, v in scratch_ckpt.read_weights(folder, config).items()}


def load_head(folder, device="cpu") -> tuple[GRUHead, dict]:
    """(GRUHead in eval mode with the saved weights, config), every check above passed.  A
    checkpoint with trained encoder layers is refused (:func:`load_parts` reads it)."""
    head, layers, config = load_parts(folder)
    if layers:
        raise CheckpointError(f"{Path(folder) / WEIGHTS}: holds the {len(layers)} encoder "
                              f"layers trained with the head (unfreeze_top): the head alone "
                              f"would score with the untrained ones")
    return head.to(device).eval(), config


def load_parts(folder) -> tuple[GRUHead, dict, dict]:
    """(GRUHead in eval mode, trained layers ``{index: {name: tensor}}`` (empty for a frozen
    run), config), every check above passed; the layers' names and count as
    :func:`scratch.pipeline.checkpoint.load_checkpoint` checks them (their shapes are checked
    against the encoder they go into: :func:`top_head`, :func:`full_model`)."""
    config = read_config(folder)
    where = Path(folder) / WEIGHTS
    rest, layers = scratch_ckpt.split_layers(read_weights(folder, config), config, folder)
    head = GRUHead(**config["model"])
    load_head_state(head, rest, str(where))
    return head.eval(), layers, config


def top_head(bert, head: GRUHead, layers: dict, config: dict, where,
             device="cpu") -> TopGRUHead:
    """A :class:`TopGRUHead` (eval mode) of ``head`` and ``layers`` (:func:`load_parts`) for the
    encoder ``bert`` (transformers' BertModel or MPNetModel; MPNet's position table is read
    from it): the layers must be its top ones."""
    bert_config = bert.config
    try:
        model = TopGRUHead(bert_config, min(layers), **config["model"],
                           table=position_table(bert))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    _check_top(model.encoder.first, sorted(layers), bert_config.num_hidden_layers, where)
    load_head_state(model, {**head_state(head), **_prefixed(layers)}, str(where))
    return model.to(device).eval()


def _prefixed(layers: dict) -> dict:
    return {f"encoder.layer.{i}.{n}": t for i, sd in layers.items() for n, t in sd.items()}


def _check_top(first: int, indices: list, n_layers: int, where) -> None:
    if indices != list(range(n_layers - len(indices), n_layers)) or first != indices[0]:
        raise CheckpointError(f"{where}: trained layers {indices} are not the top layers of an "
                              f"encoder of {n_layers} layers")


def full_model(bert, head: GRUHead, config: dict, where, device="cpu",
               layers: dict | None = None) -> BERTGRUSentiment:
    """BERTGRUSentiment(bert, ...) with ``head``'s weights and, given trained ``layers``
    (:func:`load_parts`), those in place of ``bert``'s top layers (``bert`` is changed); eval
    mode, encoder frozen."""
    m = dict(config["model"])
    if (emb := m.pop("emb_dim")) != bert.config.hidden_size:
        raise CheckpointError(f"{where}: the head was trained on {emb}-dim features, the encoder "
                              f"gives {bert.config.hidden_size}")
    if layers:
        n_layers = bert.config.num_hidden_layers
        _check_top(min(layers), sorted(layers), n_layers, where)
        for i, sd in layers.items():
            module = bert.encoder.layer[i]
            want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in sd.items()}
            if want != got:
                bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                raise CheckpointError(f"{where}: trained layer {i}: {bad[0]} is "
                                      f"{got.get(bad[0])}, the encoder's {want.get(bad[0])}")
            with torch.no_grad():
                module.load_state_dict({k: v.to(module.state_dict()[k].dtype)
                                        for k, v in sd.items()})
    model = BERTGRUSentiment(bert, **m)
    load_head_state(model, head_state(head), str(where))
    for name, p in model.named_parameters():
        if name.startswith("bert"):
            p.requires_grad = False
    return model.to(device).eval()


def load_full_model(folder, bert, device="cpu") -> BERTGRUSentiment:
    """:func:`full_model` of the checkpoint in ``folder`` (verified by :func:`load_parts`)."""
    head, layers, config = load_parts(folder)
    return full_model(bert, head, config, folder, device, layers)


def stamp(folder) -> str:
    """Add ``weights_sha256`` to a checkpoint written before checksums, once its weights pass
    every other check; returns the checksum."""
    config, path = read_config(folder, checksum=False), Path(folder) / WEIGHTS
    config.pop(CHECKSUM, None)                     # a damaged one is replaced, not checked
    check_head_state(GRUHead(**config["model"]), read_weights(folder, config), str(path))
    digest = sha256(path.read_bytes())
    write_json(Path(folder) / CONFIG, {**config, CHECKSUM: digest})
    return digest


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
        raise CheckpointError(
            f"{path}: unreadable resume state ({type(e).__name__}: {first})") from e


def main(argv=None) -> int:
    from . import cli

    p = cli.Parser(prog="python -m reference.pipeline.checkpoint",
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
