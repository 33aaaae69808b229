"""The checks the reference commands share (train, features, predict, demo): the torch-free
plumbing of :mod:`scratch.pipeline.cli` (one-line errors, number types, folders, data, subsets,
:func:`run`) plus the checks that need torch or transformers (the device, the encoder).

Checks run cheapest first: options alone -> the encoder's config.json (name or folder,
--max-length against its positions; no weights) -> the data -> the subsets -> the weights.
"""
from __future__ import annotations

import argparse
import logging
import os

from scratch.pipeline.cli import (  # noqa: F401
    BAD_INPUT,
    INTERRUPTED,
    TABLE_OPTIONS,
    Parser,
    add_explain_args,
    add_table_args,
    check_batch_tokens,
    check_folder,
    check_limit,
    held_logs,
    load_data,
    non_negative,
    one_line,
    positive,
    run,
)

# --- arguments shared by the commands that extract features ---------------------------------------

def add_feature_args(p: argparse.ArgumentParser, cache_default: str = ".cache/features") -> None:
    """--data --encoder --max-length --limit-train --limit-test --seed --device --cache
    --autocast (--no-autocast), and the table options
    (:func:`scratch.pipeline.cli.add_table_args`)."""
    p.add_argument("--data", help="aclImdb directory or .tar.gz, or a labelled table (.csv, "
                   ".tsv, .jsonl, .parquet; default: $IMDB_PATH)")
    p.add_argument("--encoder", default="auto",
                   help="auto | bert-base-uncased | minilm | mpnet | FOLDER")
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per review, specials included (2..the encoder's positions, 512)")
    p.add_argument("--limit-train", type=positive(int), metavar="N",
                   help="stratified subset of N train reviews")
    p.add_argument("--limit-test", type=positive(int), metavar="N",
                   help="stratified subset of N test reviews")
    p.add_argument("--seed", type=non_negative(int), default=3407,
                   help="seed of the split and the subsets")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache", default=cache_default,
                   help="feature cache root (default %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--autocast", choices=("auto", "bf16", "float32"),
                   help="the encoder's precision (default: $GRU_ATTENTION_AUTOCAST, else auto: "
                        "bf16 autocast on CUDA with bf16, and on a CPU with native bf16 when a "
                        "short probe, cached per machine, finds it clearly faster)")
    g.add_argument("--no-autocast", dest="autocast", action="store_const", const="float32",
                   help="the same as --autocast float32")
    add_table_args(p)


def add_dist_args(p: argparse.ArgumentParser) -> None:
    """--dist-timeout: for runs under torchrun (see :mod:`reference.pipeline.distributed`)."""
    p.add_argument("--dist-timeout", type=positive(float), default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at a collective "
                        "before the run fails (a rank that dies ends the run at once; default "
                        "%(default)s)")


# --- checks: each one either returns or ends the command with one line -------------------------

def check_autocast(p: argparse.ArgumentParser, mode: str | None) -> str | None:
    """``--autocast``'s value, unchanged; without it a bad ``$GRU_ATTENTION_AUTOCAST`` is an
    error now (the chooser reads it, :mod:`reference.pipeline.autocast`)."""
    from .autocast import ENV, MODES

    env = os.environ.get(ENV)
    if mode is None and env and env not in MODES:
        p.error(f"${ENV}={env!r}: expected one of {', '.join(MODES)}")
    return mode


def check_device(p: argparse.ArgumentParser, device: str) -> str:
    """``auto|cpu|cuda`` -> the device to use; cuda without a CUDA device is an error."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def check_encoder(p: argparse.ArgumentParser, name: str, max_length: int | None = None):
    """The encoder's :class:`~reference.pipeline.encoders.EncoderInfo` (config only, no weights);
    with ``max_length``: it must be in 2..the encoder's learned positions."""
    from .encoders import EncoderError, inspect_encoder

    with held_logs("scratch.pipeline.encoder_names") as notes:  # e.g. "auto: using minilm",
        try:                                                    # shown only when the checks pass
            info = inspect_encoder(name)
        except EncoderError as e:
            p.error(one_line(e))
        if max_length is not None and not 2 <= max_length <= info.max_length:
            p.error(f"--max-length must be in 2..{info.max_length} ({info.name}'s positions), "
                    f"got {max_length}")
    for record in notes:
        logging.getLogger(record.name).handle(record)
    return info


def load_encoder(p: argparse.ArgumentParser, info, device: str):
    """The encoder's weights and tokenizer (:func:`reference.pipeline.encoders.load_encoder`)."""
    from .encoders import EncoderError
    from .encoders import load_encoder as load

    try:
        return load(info, device)
    except EncoderError as e:
        p.error(one_line(e))
