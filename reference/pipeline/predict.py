"""``python -m reference.pipeline.predict --checkpoint DIR [--file PATH] ["review text" ...]``: the
probability that each review is positive, from a head trained by
:mod:`reference.pipeline.train` on the encoder it names.

:func:`predict_sentiment` is the assignment's function::

    model.eval()
    tokens = tokenizer.tokenize(sentence)[:max_input_length - 2]
    ids = [cls] + tokenizer.convert_tokens_to_ids(tokens) + [sep]
    return torch.sigmoid(model(torch.LongTensor(ids).unsqueeze(0))).item()

:func:`predict_batch` gives the same numbers for many reviews at once: the same ids, padded
to the batch's longest review with the attention mask, which changes no score (the model's
encoder is masked and its GRU reads each review only up to its length).

A checkpoint of ``reference.pipeline.train --unfreeze-top K`` (or scratch's) holds the trained
top layers too: they replace the encoder's own, so the model is the frozen bottom, the trained
top and the head (:func:`reference.pipeline.checkpoint.full_model`).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from scratch.pipeline.cli import print_scores, read_reviews, windows

from . import checkpoint as ckpt
from . import cli

COLD_START = """\
Cold start: it reads and verifies the checkpoint first (config.json, the sha256 of
model.safetensors, finite weights: a bad one fails in a second), then loads the encoder named
in its config.json once (minilm, 91 MB: a few seconds on a CPU; bert-base-uncased or mpnet,
438 MB: longer), then scores the reviews in batches of --batch-size, 256 reviews at a time
whose results are printed (and flushed) as soon as they are scored, in input order; a progress
bar follows long inputs on stderr.  Reviews come from the arguments and from --file (one per
line, UTF-8; - reads standard input, for reviews longer than the shell's argument limit); an
empty review is an error.  Each review is cut to the checkpoint's max_length tokens, as in
training."""


def token_ids(tokenizer, sentence: str, max_input_length: int = 512) -> list[int]:
    """``[CLS] tokenize(sentence)[:max_input_length - 2] [SEP]``, as the assignment (without
    transformers' warning about reviews longer than the model: they are cut here)."""
    from .encoders import quiet_transformers

    with quiet_transformers():
        tokens = tokenizer.tokenize(sentence)[:max_input_length - 2]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return [tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id]


def predict_sentiment(model, tokenizer, sentence: str, max_input_length: int = 512) -> float:
    """P(positive) of ``sentence`` under a BERTGRUSentiment ``model`` (a float in [0, 1])."""
    model.eval()
    ids = token_ids(tokenizer, sentence, max_input_length)
    device = next(model.parameters()).device
    tensor = torch.LongTensor(ids).to(device).unsqueeze(0)
    with torch.no_grad():
        return torch.sigmoid(model(tensor)).item()


def predict_batch(model, tokenizer, sentences, max_input_length: int = 512,
                  batch_size: int = 32) -> list[float]:
    """:func:`predict_sentiment` of each sentence, ``batch_size`` reviews of similar length at
    a time (right-padded with the tokenizer's pad id, with the attention mask)."""
    model.eval()
    ids = [token_ids(tokenizer, s, max_input_length) for s in sentences]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    probs = [0.0] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        text = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(text)                         # (B, T): 1 on real tokens
        for b, i in enumerate(chunk):
            text[b, :len(ids[i])] = torch.tensor(ids[i])
            mask[b, :len(ids[i])] = 1
        with torch.no_grad():
            p = torch.sigmoid(model(text.to(device), mask.to(device))).squeeze(1).tolist()
        for i, pi in zip(chunk, p, strict=True):
            probs[i] = pi
    return probs


def load_model(folder, device: str = "cpu"):
    """(BERTGRUSentiment, tokenizer, config) from a reference.pipeline.train checkpoint
    directory: the head (and trained layers) is read and verified first, then the encoder
    named (or the folder saved) in its config.json is loaded."""
    from .encoders import load_encoder

    head, layers, config = ckpt.load_parts(folder)
    name = config.get("encoder")
    max_length = config.get("max_length", 512)
    if not isinstance(name, str) or not isinstance(max_length, int) or max_length < 2:
        raise ckpt.CheckpointError(f"{Path(folder) / ckpt.CONFIG}: needs an encoder name and "
                                   f"a max_length >= 2, has {name!r} and {max_length!r}")
    source = config.get("encoder_source")
    encoder = load_encoder(source if isinstance(source, str) and os.path.isdir(source) else name,
                           device)
    if max_length > encoder.max_length:
        raise ckpt.CheckpointError(f"{Path(folder) / ckpt.CONFIG}: max_length {max_length} is "
                                   f"beyond {encoder.name}'s {encoder.max_length} positions")
    model = ckpt.full_model(encoder.model, head, config, folder, device, layers)
    return model, encoder.tokenizer, config


def main(argv=None) -> int:
    from .encoders import EncoderError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = cli.Parser(prog="python -m reference.pipeline.predict", epilog=COLD_START,
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   description="P(positive) of each review under a trained checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="directory written by reference.pipeline.train --out")
    p.add_argument("--file", metavar="PATH", help="more reviews, one per line (- : standard input)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=cli.positive(int), default=32,
                   help="reviews per forward pass (default %(default)s)")
    p.add_argument("sentences", nargs="*", metavar="TEXT", help="review text(s) to score")
    cli.add_explain_args(p)
    a = p.parse_args(argv)
    device = cli.check_device(p, a.device)
    reviews = read_reviews(p, a.sentences, a.file)           # before anything is loaded
    try:
        model, tokenizer, config = load_model(a.checkpoint, device)
    except (ckpt.CheckpointError, EncoderError) as e:
        p.error(cli.one_line(e))
    max_length = config.get("max_length", 512)
    why = []

    def explain(texts, probs):
        """Captum's integrated gradients for one window; kept for --html, printed for
        --explain."""
        from .explain import explain_reviews

        ids = [token_ids(tokenizer, s, max_length) for s in texts]
        found = explain_reviews(model, tokenizer, texts, probs, ids, a.steps,
                                config.get("labels"))
        why.extend(found)
        return [w.text_block() if a.explain else None for w in found]

    print_scores((predict_batch(model, tokenizer, chunk, max_length, a.batch_size)
                  for chunk in windows(reviews)), reviews, config=config,
                 explain=explain if a.explain or a.html else None)
    if a.html:
        from scratch.pipeline.explain import write_html

        write_html(a.html, why)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main, "python -m reference.pipeline.predict"))
