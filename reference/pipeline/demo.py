"""``python -m reference.pipeline.demo [--data PATH]``: the IMDB part of ``make demo``.

With the archive (``--data`` or ``IMDB_PATH``): a short real training of the assignment's
BiGRU head on the packaged MiniLM encoder's features, on a stratified subset (2,000 train
reviews split 1,400/600, 1,000 test reviews, the first 128 tokens of each, 2 epochs, batch 32;
about 2-3 minutes on 2 CPU cores the first time, seconds of feature work afterwards thanks to
the cache), then its test accuracy, and the same reviews scored by both pipelines side by
side: ``predict_sentiment`` (transformers + torch) and :mod:`scratch.pipeline.predict` (NumPy, the
from-scratch encoder and head) on the very same checkpoint.  Given nothing
at all (no ``--data``, no ``IMDB_PATH``, no downloaded copy): how to get the data, and exit
status 0 (the demo's comparison table does not need it).  A ``--data`` or ``IMDB_PATH`` that
does not exist, or data that cannot be read, is an error (exit status 2).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from . import cli

SUBSET = ["--encoder", "minilm", "--limit-train", "2000", "--limit-test", "1000",
          "--max-length", "128", "--batch-size", "32", "--epochs", "2", "--seed", "3407"]
LIMITS = {"--limit-train", "--limit-test"}
SENTENCES = ("This film is terrible", "This film is great",
             "The plot was thin, but the acting carried it and I left smiling.",
             "Two hours of my life I will never get back.")


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = cli.Parser(prog="python -m reference.pipeline.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--data", help="aclImdb directory or .tar.gz, or a labelled table (.csv, "
                   ".tsv, .jsonl, .parquet: all its reviews are used; default: $IMDB_PATH)")
    p.add_argument("--out", default="runs/demo", help="checkpoint directory (default %(default)s)")
    p.add_argument("--cache", default=".cache/features", help="feature cache root")
    p.add_argument("--no-progress", action="store_true")
    cli.add_table_args(p)
    a = p.parse_args(argv)

    from scratch.pipeline.tables import is_table

    from .data import HOW_TO_GET, ImdbError, find_imdb

    given = a.data or os.environ.get("IMDB_PATH")
    try:
        path = find_imdb(a.data)
    except ImdbError as e:
        if given:
            p.error(cli.one_line(e))
        print(f"IMDB demo skipped. {HOW_TO_GET}")
        return 0
    from . import train
    from .predict import load_model

    print(f"IMDB demo: minilm features + the assignment's BiGRU head on a subset of {path}",
          flush=True)
    t0 = time.perf_counter()
    args = ["--data", str(path), "--out", a.out, "--cache", a.cache, "--device", "cpu", *SUBSET]
    if is_table(path):                  # a user's table: all of it, with its options
        args = [x for i, x in enumerate(args) if not {args[i - 1], x} & LIMITS]
        args += [x for k, opt in cli.TABLE_OPTIONS if (v := getattr(a, k)) for x in (opt, v)]
    train.main(args + (["--no-progress"] if a.no_progress else []))
    model, tokenizer, config = load_model(a.out)
    m = json.loads((Path(a.out) / "metrics.json").read_text())
    print(f"test accuracy {m['test_acc']:.2%} on {m['n_test']} reviews "
          f"(trained on {m['n_train']}, {config['max_length']} tokens each); "
          f"{time.perf_counter() - t0:.0f} s in all")
    side_by_side(a.out, model, tokenizer, config, SENTENCES)
    return 0


def side_by_side(folder, model, tokenizer, config, sentences) -> None:
    """Each review's P(positive) from the reference model and from the scratch model (the same
    checkpoint, loaded by :mod:`scratch.pipeline.predict`), and their difference."""
    from scratch.pipeline import predict as scratch_predict

    from .predict import predict_sentiment

    encoder, stok, head, _ = scratch_predict.load_model(folder)
    mine = scratch_predict.predict_batch(encoder, stok, head, sentences, config["max_length"])
    print(f"{'reference':>9} {'scratch':>9} {'|diff|':>8}  review (same checkpoint, both pipelines)")
    for s, p_scratch in zip(sentences, mine):
        p_ref = predict_sentiment(model, tokenizer, s, config["max_length"])
        print(f"{p_ref:>9.4f} {p_scratch:>9.4f} {abs(p_ref - p_scratch):>8.1e}  {s}")


if __name__ == "__main__":
    sys.exit(cli.run(main, "python -m reference.pipeline.demo"))
