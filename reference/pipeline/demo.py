"""``python -m reference.pipeline.demo [--data PATH] [--no-download]``: ``make demo``'s IMDB part.

A short real training of the assignment's BiGRU head on the packaged MiniLM encoder's
features, on a stratified subset of IMDB (1,000 train reviews split 700/300, 500 test
reviews, the first 128 tokens of each, 2 epochs, batch 32: a demonstration's size, about a
minute on 2 CPU cores the first time, seconds of feature work afterwards thanks to the cache;
the README's full-size numbers come from ``bench/imdb_full.sh``), then its test accuracy, and
reviews scored by both pipelines side by side: ``predict_sentiment`` (transformers + torch) and
:mod:`scratch.pipeline.predict` (NumPy, the from-scratch encoder and head) on the very same
checkpoint.

The data: ``--data`` or ``IMDB_PATH``, else the copy downloaded before, else it is downloaded
now (Stanford's archive, 84 MB, sha256-verified, resumable, with a progress bar) into the user
cache folder it names.  ``--no-download``: without the data, say how to get it and exit 0.  A
download that fails (offline) ends with one line saying how to get the data, exit status 1;
a ``--data`` or ``IMDB_PATH`` that does not exist, or data that cannot be read, is an error
(exit status 2).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from scratch.pipeline import data as imdb

from . import cli

LIMIT_TRAIN, LIMIT_TEST, MAX_LENGTH, EPOCHS, BATCH, SEED = 1000, 500, 128, 2, 32, 3407
SUBSET = ["--encoder", "minilm", "--limit-train", str(LIMIT_TRAIN), "--limit-test",
          str(LIMIT_TEST), "--max-length", str(MAX_LENGTH), "--batch-size", str(BATCH),
          "--epochs", str(EPOCHS), "--seed", str(SEED)]
LIMITS = {"--limit-train", "--limit-test"}
SENTENCES = ("This film is terrible", "This film is great",
             "The plot was thin, but the acting carried it and I left smiling.",
             "Two hours of my life I will never get back.")
DOWNLOAD_FAILED = 1
HOW_TO_GET = ("pass --data PATH (an aclImdb directory or .tar.gz) or set IMDB_PATH, or download "
              "it where there is a connection: python -m reference.pipeline.data --download")


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = cli.Parser(prog="python -m reference.pipeline.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--data", help="aclImdb directory or .tar.gz, or a labelled table (.csv, "
                   ".tsv, .jsonl, .parquet: all its reviews are used; default: $IMDB_PATH, "
                   "else the downloaded copy, else download it)")
    p.add_argument("--no-download", action="store_true",
                   help="never download the data: without it, say how to get it and exit 0")
    p.add_argument("--out", default="runs/demo", help="checkpoint directory (default %(default)s)")
    p.add_argument("--cache", default=".cache/features", help="feature cache root")
    p.add_argument("--no-progress", action="store_true")
    cli.add_table_args(p)
    a = p.parse_args(argv)
    path = find_data(p, a)
    if path is None:
        return 0 if a.no_download else DOWNLOAD_FAILED
    return imdb_part(a, path)


def find_data(p, a) -> Path | None:
    """The archive to use: ``--data``/``IMDB_PATH`` (must exist), the downloaded copy, or a
    fresh download.  None (the reason printed) when there is none and none could be had."""
    if a.data or os.environ.get("IMDB_PATH"):
        try:
            return imdb.find_imdb(a.data)
        except imdb.ImdbError as e:
            p.error(cli.one_line(e))
    cache = Path(imdb.DEFAULT_CACHE)
    cached = cache / imdb.IMDB_URL.rsplit("/", 1)[-1]
    if cached.exists():
        return cached
    if a.no_download:
        print(f"IMDB demo skipped (--no-download): {HOW_TO_GET}.")
        return None
    print(f"IMDB demo: no --data or IMDB_PATH; downloading {imdb.IMDB_URL} (84 MB, once) into "
          f"{cache} (--no-download to skip)", flush=True)
    try:
        return imdb.download_imdb(cache, url=imdb.IMDB_URL, sha256=imdb.IMDB_SHA256,
                                  progress=not a.no_progress)
    except (imdb.ImdbError, OSError) as e:
        print(f"{p.prog}: {cli.one_line(e)}; {HOW_TO_GET}", file=sys.stderr)
        return None


def imdb_part(a, path: Path) -> int:
    """Train on the subset of ``path``, report, and score :data:`SENTENCES` both ways."""
    from scratch.pipeline.tables import is_table

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
          f"(trained on {m['n_train']}, {config['max_length']} tokens each; a demonstration's "
          f"size); {time.perf_counter() - t0:.0f} s in all")
    side_by_side(a.out, model, tokenizer, config, SENTENCES)
    return 0


def side_by_side(folder, model, tokenizer, config, sentences) -> None:
    """Each review's P(positive) from the reference model and from the scratch model (the same
    checkpoint, loaded by :mod:`scratch.pipeline.predict`), and their difference."""
    from scratch.pipeline import predict as scratch_predict

    from .predict import predict_sentiment

    encoder, stok, head, _ = scratch_predict.load_model(folder)
    mine = scratch_predict.predict_batch(encoder, stok, head, sentences, config["max_length"])
    print(f"{'reference':>9} {'scratch':>9} {'|diff|':>8}  "
          "review (same checkpoint, both pipelines)")
    for s, p_scratch in zip(sentences, mine, strict=True):
        p_ref = predict_sentiment(model, tokenizer, s, config["max_length"])
        print(f"{p_ref:>9.4f} {p_scratch:>9.4f} {abs(p_ref - p_scratch):>8.1e}  {s}")


if __name__ == "__main__":
    sys.exit(cli.run(main, "python -m reference.pipeline.demo"))
