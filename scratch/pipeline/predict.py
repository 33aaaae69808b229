"""``python -m scratch.pipeline.predict --checkpoint DIR [--file PATH] ["review text" ...]``: the
probability that each review is positive, torch-free, with the same output as
:mod:`reference.pipeline.predict` for the same checkpoint (either pipeline's).

The whole model in NumPy: the checkpoint's head (:func:`scratch.pipeline.checkpoint.load_head`,
read and verified first), the encoder its ``config.json`` names (:class:`scratch.bert.BertEncoder`,
BERT or MPNet folders) and tokenizer (:class:`scratch.pipeline.tokenizer.BertTokenizer`)::

    ids = [CLS] tokens[:max_length - 2] [SEP]      per review, like reference.pipeline.predict
    h   = BertEncoder(ids, mask)                   (B, T, E), padding masked out
    p   = sigmoid(head(h, lengths))                (B, 1), the GRU reads each review to its end

A checkpoint trained with ``--unfreeze-top K`` holds the encoder's top K layers as trained:
they replace the encoder's own (:meth:`scratch.top_layers.TopLayers.write_to`), so ``h`` is the
frozen bottom and the trained top.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..backend import to_numpy
from ..bert_folder import BertError
from ..top_layers import TopLayers
from . import checkpoint as ckpt
from . import cli
from .encoder_names import Encoder, EncoderNameError
from .tokenizer import pad_batch

COLD_START = """\
Cold start: it reads and verifies the checkpoint first (config.json, the sha256 of
model.safetensors, finite weights), then loads the encoder named in its config.json with
NumPy (minilm, 91 MB: a few seconds), then scores the reviews in batches of --batch-size,
sorted by length within each 256 reviews, whose results are printed (and flushed) as soon
as they are scored, in input order; a progress bar follows long inputs on stderr.  Reviews
come from the arguments and from --file (one per line, UTF-8; - reads standard input); an
empty review is an error.  Each review is cut to the checkpoint's
max_length tokens, as in training.  No torch is imported."""


def load_model(folder, dtype="float32"):
    """(encoder, tokenizer, head, config) from a checkpoint folder: the head (and trained
    layers) verified first, then the encoder (the saved folder if it exists, else the saved
    name), its top layers replaced by the trained ones if there are any."""
    head, layers, config = ckpt.load_checkpoint(folder, dtype=dtype, require_checksum=True)
    name, max_length = config.get("encoder"), config.get("max_length", 512)
    if not isinstance(name, str) or not isinstance(max_length, int) or max_length < 2:
        raise ckpt.CheckpointError(f"{Path(folder) / ckpt.CONFIG}: needs an encoder name and "
                                   f"a max_length >= 2, has {name!r} and {max_length!r}")
    source = config.get("encoder_source")
    info = Encoder.inspect(source if isinstance(source, str) and Path(source).is_dir() else name)
    if max_length > info.max_length:
        raise ckpt.CheckpointError(f"{Path(folder) / ckpt.CONFIG}: max_length {max_length} is "
                                   f"beyond {info.name}'s {info.max_length} positions")
    if info.hidden_size != head.emb_dim:
        raise ckpt.CheckpointError(f"{folder}: the head was trained on {head.emb_dim}-dim "
                                   f"features, {info.name} gives {info.hidden_size}")
    encoder = info.load_bert(dtype)
    if layers:
        try:
            TopLayers.from_state(layers, encoder.config, dtype,
                                 position_table=encoder.rel).write_to(encoder)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{Path(folder) / ckpt.WEIGHTS}: {e}") from None
    return encoder, info.load_tokenizer(), head, config


def predict_batch(encoder, tokenizer, head, sentences, max_length: int = 512,
                  batch_size: int = 32) -> list[float]:
    """P(positive) of each sentence: ``batch_size`` reviews of similar length at a time,
    right-padded with the attention mask (padding changes no score)."""
    ids = tokenizer.encode(list(sentences), max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    probs = [0.0] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in chunk], tokenizer.pad_id)   # (B, T)
        hidden = encoder(input_ids, mask)                                       # (B, T, E)
        p = to_numpy(head.predict(hidden, mask.sum(axis=1)))[:, 0]              # (B,)
        for i, pi in zip(chunk, p, strict=True):
            probs[i] = float(pi)
    return probs


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m scratch.pipeline.predict", epilog=COLD_START,
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   description="P(positive) of each review under a trained checkpoint, "
                               "computed by the from-scratch model (NumPy, no torch).")
    p.add_argument("--checkpoint", required=True,
                   help="directory written by scratch.pipeline.train or "
                        "reference.pipeline.train --out")
    p.add_argument("--file", metavar="PATH", help="more reviews, one per line (- : standard input)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--batch-size", type=cli.positive(int), default=32,
                   help="reviews per forward pass (default %(default)s)")
    p.add_argument("sentences", nargs="*", metavar="TEXT", help="review text(s) to score")
    cli.add_explain_args(p)
    a = p.parse_args(argv)
    reviews = cli.read_reviews(p, a.sentences, a.file)       # before anything is loaded
    try:
        encoder, tokenizer, head, config = load_model(a.checkpoint, a.dtype)
    except (ckpt.CheckpointError, EncoderNameError, BertError) as e:
        p.error(cli.one_line(e))
    max_length = config.get("max_length", 512)
    why = []

    def explain(texts, probs):
        """Integrated gradients for one window; kept for --html, printed for --explain."""
        from .explain import explain_reviews

        found = explain_reviews(encoder, tokenizer, head, texts, probs, max_length, a.steps,
                                config.get("labels"))
        why.extend(found)
        return [w.text_block() if a.explain else None for w in found]

    cli.print_scores((predict_batch(encoder, tokenizer, head, chunk, max_length, a.batch_size)
                      for chunk in cli.windows(reviews)), reviews, config=config,
                     explain=explain if a.explain or a.html else None)
    if a.html:
        from .explain import write_html

        write_html(a.html, why)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "python -m scratch.pipeline.predict"))
