"""``--unfreeze-top K`` and ``--encoder-lr``, torch-free: what both training commands share
(options, their checks, the feature entries' meaning, micro-batches).

With ``K = 0`` (the default) nothing changes: the encoder is frozen, its last hidden states are
cached and only the head trains.  With ``K > 0`` the top ``K`` of the encoder's ``L`` layers
train with the head (:mod:`scratch.top_layers`, :mod:`reference.top_layers`):

* the cache holds the hidden states *entering* layer ``L-K`` (the frozen bottom's output), one
  ``(L_i, H)`` float16 array per review in the existing entry format; the attention mask of a
  right-padded batch is ``t < L_i``, so the lengths the entry records are the mask.  Entries
  are keyed by the encoder, ``max_length`` and ``K`` (``K = 0``: exactly today's keys), and
  record ``unfreeze_top`` and ``input_layer`` in ``index.json``;
* every step runs the ``K`` layers and the head forward and backward, Adam on both: the head at
  ``--lr`` (the assignment's 1e-3), the layers at ``--encoder-lr``;
* a batch is run in micro-batches of at most ``--micro-batch-tokens`` padded tokens whose
  gradients add up to the batch's (:func:`micro_batches`).

``--encoder-lr`` defaults to :data:`DEFAULT_ENCODER_LR` = 2e-5: Sun et al. (2019), "How to
Fine-Tune BERT for Text Classification", find on IMDB that a rate as low as 2e-5 is needed for
BERT to overcome catastrophic forgetting of its pretrained weights, and that at 4e-4 training
fails to converge; 1e-3, the head's rate, would be far past that.
"""
from __future__ import annotations

import argparse

import numpy as np

from ..top_layers import FAMILIES
from . import cli
from .features import CacheError

DEFAULT_ENCODER_LR = 2e-5
# padded tokens per micro-batch: 8192 = 16 reviews of 512 tokens.  One step on a batch of
# 128 x 512 with bert-base-shaped layers, float32, peaked at 2.8-2.9 GiB with one trained layer
# and 4.0-4.4 GiB with two (bench/unfreeze_memory.py, both pipelines; README)
DEFAULT_MICRO_TOKENS = 8192


def add_args(p: argparse.ArgumentParser) -> None:
    """--unfreeze-top --encoder-lr --micro-batch-tokens."""
    g = p.add_argument_group("training the encoder's top layers with the head")
    g.add_argument("--unfreeze-top", type=cli.non_negative(int), default=0, metavar="K",
                   help="train the top K encoder layers with the head (default 0: the encoder "
                        "frozen; K > 0 caches the hidden states entering layer L-K instead of "
                        "the last ones)")
    g.add_argument("--encoder-lr", type=cli.positive(float), metavar="LR",
                   help=f"Adam's learning rate for the trained encoder layers (needs "
                        f"--unfreeze-top K > 0; default {DEFAULT_ENCODER_LR}, as Sun et al. "
                        f"2019 for BERT; the head keeps --lr)")
    g.add_argument("--micro-batch-tokens", type=cli.positive(int), default=DEFAULT_MICRO_TOKENS,
                   metavar="N", help="with K > 0: run each batch in pieces of at most N padded "
                                     "tokens, gradients accumulated (default %(default)s)")


def check_args(p: argparse.ArgumentParser, args, num_layers: int, model_type: str = "bert",
               max_length: int | None = None) -> None:
    """The options against each other and the encoder's config (``num_layers`` layers): sets
    ``args.encoder_lr`` to its default when K > 0."""
    k = args.unfreeze_top
    if k == 0:
        if args.encoder_lr is not None:
            p.error("--encoder-lr needs --unfreeze-top K > 0 (with K = 0 the encoder is frozen)")
        return
    if k > num_layers:
        p.error(f"--unfreeze-top {k} is more than the encoder's {num_layers} layers")
    if model_type not in FAMILIES:
        p.error(f"--unfreeze-top needs a BERT or MPNet encoder (this one is {model_type})")
    if max_length is not None and args.micro_batch_tokens < max_length:
        p.error(f"--micro-batch-tokens must be >= --max-length ({max_length}): one piece holds "
                f"at least one review, got {args.micro_batch_tokens}")
    if args.encoder_lr is None:
        args.encoder_lr = DEFAULT_ENCODER_LR


def config_entries(args) -> dict:
    """What config.json records of these options: nothing for K = 0 (today's files)."""
    if args.unfreeze_top == 0:
        return {}
    return {"unfreeze_top": args.unfreeze_top, "encoder_lr": args.encoder_lr,
            "micro_batch_tokens": args.micro_batch_tokens}


RUN_DEFAULTS = {"unfreeze_top": 0, "encoder_lr": None, "micro_batch_tokens": None}
RUN_KEYS = ("unfreeze_top", "encoder_lr")


def resume_differences(old: dict, new: dict) -> list[str]:
    """The options of :data:`RUN_KEYS` a saved run's config has other than this run's (a
    config without them is a K = 0 run)."""
    return [k for k in RUN_KEYS if old.get(k, RUN_DEFAULTS[k]) != new.get(k, RUN_DEFAULTS[k])]


def resume_refusal(out, old: dict, new: dict, run_keys) -> str | None:
    """Why the run saved in ``out`` (its config ``old``) cannot go on as this run (config
    ``new``): the ``run_keys`` (the command's own, which both configs hold) and the options of
    :data:`RUN_KEYS` that differ, with the saved values, in one line; None when they agree."""
    diff = [k for k in run_keys if old.get(k) != new[k]] + resume_differences(old, new)
    if not diff:
        return None
    return (f"{out} was trained with different {', '.join(diff)} "
            f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)})")


def entry_meta(unfreeze_top: int, num_layers: int) -> dict:
    """What an entry for ``unfreeze_top`` records in its ``index.json`` (nothing for K = 0)."""
    if unfreeze_top == 0:
        return {}
    return {"unfreeze_top": unfreeze_top, "input_layer": num_layers - unfreeze_top}


class EntryMismatch(CacheError):
    """A feature cache entry made for another ``--unfreeze-top`` (one line; exit status 1
    through :func:`scratch.pipeline.cli.run`)."""


def check_entry(meta: dict, unfreeze_top: int, num_layers: int, folder) -> None:
    """An entry found for ``unfreeze_top`` holds the hidden states entering layer ``L-K``:
    :class:`EntryMismatch` naming the entry otherwise (one made for another K)."""
    want = entry_meta(unfreeze_top, num_layers)
    got = {k: meta.get(k) for k in ("unfreeze_top", "input_layer") if k in meta}
    if got != want:
        have = got.get("unfreeze_top", 0)
        raise EntryMismatch(f"feature cache entry {folder} was made for --unfreeze-top {have} "
                         f"({got or 'the last hidden states'}), this run needs "
                         f"--unfreeze-top {unfreeze_top} ({want or 'the last hidden states'})")


def micro_batches(lengths, max_tokens: int) -> list[np.ndarray]:
    """Positions ``0..n-1`` of a batch whose reviews have ``lengths`` (n,), cut into consecutive
    pieces whose padded size (reviews x longest review) is at most ``max_tokens`` (at least one
    review each).  A length-sorted batch gives the least padding."""
    lengths = np.asarray(lengths)
    pieces, start, n = [], 0, len(lengths)
    while start < n:
        stop, longest = start + 1, int(lengths[start])
        while stop < n and (stop + 1 - start) * max(longest, int(lengths[stop])) <= max_tokens:
            longest = max(longest, int(lengths[stop]))
            stop += 1
        pieces.append(np.arange(start, stop))
        start = stop
    return pieces
