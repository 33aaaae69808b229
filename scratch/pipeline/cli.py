"""Command-line plumbing every command shares, torch-free (``scratch.pipeline.train``,
``scratch.pipeline.predict`` and, through :mod:`reference.pipeline.cli`, the reference commands).

A bad input ends one way, whatever the command: one line ``PROG: error: MESSAGE`` on stderr
naming the problem, exit status 2, no usage block, no traceback, and nothing written.  The
checks run cheapest first, so a mistake is reported before anything slow is loaded:

    options alone (numbers, folders) -> the encoder's config -> the data (find it, read it)
    -> the subsets (--limit-train/--limit-test against the splits) -> the encoder's weights

:func:`run` is each command's ``__main__``: SIGTERM then ends a command like Ctrl-C does (its
clean-up runs: :mod:`scratch.pipeline.features` removes a cache entry that holds nothing yet), an
interruption is one line and exit status 130, and the ``reference`` and ``scratch`` loggers
print their ``INFO`` lines (resuming, waiting for another process) on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
from pathlib import Path

from .errors import CommandError
from .malloc import reuse_freed_memory

FAILED, BAD_INPUT, INTERRUPTED = 1, 2, 130
LOGGERS = ("reference", "scratch")


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message) -> str:
    """The first line of a message (library errors can run to several)."""
    lines = str(message).strip().splitlines()
    return lines[0] if lines else type(message).__name__


def _number(kind, ok, rule: str):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {s}")
        return v
    return parse


def positive(kind):
    """argparse type: a finite number of ``kind`` that is > 0."""
    return _number(kind, lambda v: v > 0, "> 0")


def non_negative(kind):
    """argparse type: a finite number of ``kind`` that is >= 0."""
    return _number(kind, lambda v: v >= 0, ">= 0")


@contextlib.contextmanager
def held_logs(name: str):
    """Collect the records of logger ``name`` instead of showing them (a failing check then
    prints its one line alone); yields the list they go to."""
    log, records = logging.getLogger(name), []
    handler = logging.Handler()
    handler.emit = records.append
    propagate, log.propagate = log.propagate, False
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def check_folder(p: argparse.ArgumentParser, option: str, path) -> Path:
    """``path`` is, or can be made, a writable directory (nothing is created here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        p.error(f"{option} {path}: exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        p.error(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        p.error(f"{option} {path}: {parent} is not writable")
    return path


def check_file(p: argparse.ArgumentParser, option: str, path) -> Path:
    """``path`` can be written: not a directory, in an existing writable directory (checked
    before any work, so that the work is not lost to a bad path at the end)."""
    path = Path(path)
    if path.is_dir():
        p.error(f"{option} {path}: is a directory")
    folder = path.parent
    if not folder.is_dir():
        p.error(f"{option} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        p.error(f"{option} {path}: not writable")
    return path


def check_batch_tokens(p: argparse.ArgumentParser, batch_tokens: int, max_length: int) -> None:
    """An encoder batch must hold the longest review: up to ``max_length`` tokens."""
    if batch_tokens < max_length:
        p.error(f"--batch-tokens must be >= --max-length ({max_length}): one batch holds at "
                f"least the longest review, got {batch_tokens}")


TABLE_OPTIONS = (("text_column", "--text-column"), ("label_column", "--label-column"),
                 ("split_column", "--split-column"), ("test_data", "--test-data"))


def add_table_args(p: argparse.ArgumentParser) -> None:
    """--text-column --label-column --split-column --test-data: ``--data`` as a labelled table
    (:mod:`scratch.pipeline.tables`)."""
    g = p.add_argument_group("your own reviews: --data FILE.csv | .tsv | .jsonl | .parquet")
    g.add_argument("--text-column", metavar="NAME", help="the reviews' column (default text)")
    g.add_argument("--label-column", metavar="NAME",
                   help="the labels' column (default label): 0/1, or two values mapped in "
                        "sorted order to 0 and 1")
    g.add_argument("--split-column", metavar="NAME",
                   help="a column of train/test saying which rows are the test reviews "
                        "(else --test-data, else a seeded 20%% test split)")
    g.add_argument("--test-data", metavar="FILE", help="the test reviews: a table with the "
                   "same columns")


def load_data(p: argparse.ArgumentParser, path=None, args=None):
    """(path, ``{"train": Reviews, "test": Reviews}``) of ``--data`` or ``$IMDB_PATH``: the
    aclImdb archive or folder (:func:`scratch.pipeline.data.load_imdb`), or a labelled table
    (:func:`scratch.pipeline.tables.load_table`, with ``args``' table options and ``--seed``;
    what it decided is printed, its warnings go to stderr)."""
    from . import tables
    from .data import ImdbError, find_imdb, load_imdb

    options = {k: getattr(args, k, None) for k, _ in TABLE_OPTIONS}
    try:
        found = find_imdb(path)
        if tables.is_table(found):
            data, notes, warnings = tables.load_table(
                found, options["text_column"] or "text", options["label_column"] or "label",
                options["split_column"], options["test_data"], getattr(args, "seed", 3407))
            for note in notes:
                print(note, flush=True)
            for warning in warnings:
                print(f"{p.prog}: warning: {warning}", file=sys.stderr, flush=True)
            return found, data
        if given := [opt for k, opt in TABLE_OPTIONS if options[k] is not None]:
            p.error(f"{', '.join(given)}: only for a table --data (.csv, .tsv, .jsonl, "
                    f".parquet), and {found} is not one")
        return found, load_imdb(found)
    except ImdbError as e:
        p.error(one_line(e))


def check_limit(p: argparse.ArgumentParser, option: str, reviews, limit: int | None, seed: int):
    """A stratified subset of ``limit`` of ``reviews`` (all of them without a limit)."""
    from .data import stratified_subset

    if limit is None:
        return reviews
    if limit > len(reviews):
        p.error(f"{option} {limit} is larger than the split ({len(reviews)} reviews)")
    return reviews.subset(stratified_subset(reviews.labels, limit, seed))


# --- reviews from the command line --------------------------------------------------------------

def _utf8_problem(e: UnicodeError) -> str:
    bad = e.object[e.start:e.start + 1]
    byte = bad if isinstance(bad, bytes) else bytes([ord(bad) & 0xFF])   # surrogateescape'd
    return f"is not valid UTF-8 (byte 0x{byte.hex()} at position {e.start + 1})"


def read_reviews(p: argparse.ArgumentParser, texts: list[str], file: str | None) -> list[str]:
    """The reviews of the arguments, then of ``file`` (one per line; ``-``: standard input);
    invalid UTF-8, an empty or whitespace-only review, or no review at all end the command."""
    reviews = []
    for n, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")                 # argv's undecodable bytes are surrogates
        except UnicodeEncodeError as e:
            p.error(f"review argument {n} {_utf8_problem(e)}")
        reviews.append((f"review argument {n}", text))
    if file is not None:
        try:
            data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as e:
            p.error(f"--file {file}: {e.strerror or e}")
        name = "standard input" if file == "-" else file
        lines = data.split(b"\n")
        if lines[-1] == b"":                     # the newline that ends the last line
            lines.pop()
        for n, raw in enumerate(lines, 1):
            try:
                reviews.append((f"--file {name}: line {n}", raw.rstrip(b"\r").decode("utf-8")))
            except UnicodeDecodeError as e:
                p.error(f"--file {name}: line {n} {_utf8_problem(e)}")
    for where, text in reviews:
        if not text.strip():
            p.error(f"{where} is {'empty' if not text else 'whitespace only'}: nothing to score")
    if not reviews:
        p.error("no review to score: give TEXT arguments or --file PATH (- for standard input)")
    return [text for _, text in reviews]


WINDOW = 256          # reviews scored (and printed) at a time by the predict commands


def windows(items, size: int = WINDOW):
    """``items`` cut into consecutive pieces of ``size`` (the last one shorter), in order."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def print_scores(scores, reviews: list[str], window: int = WINDOW, config: dict | None = None,
                 explain=None) -> None:
    """Print ``PROB  CLASS  REVIEW`` for each review as ``scores`` (an iterable of lists of
    probabilities, one list per window of reviews, in input order) yields them: each window's
    lines are flushed before the next window is scored, and a progress bar on stderr follows
    inputs longer than one window (when stderr is a terminal).  CLASS is
    :func:`label_name` of the checkpoint's ``config``; ``explain(window_reviews, probs)``, when
    given, returns one text block (or None) per review, printed under its line."""
    from tqdm.auto import tqdm

    config = config or {}
    done = 0
    with tqdm(total=len(reviews), unit="review", desc="scoring", file=sys.stderr,
              disable=None if len(reviews) > window else True) as bar:
        for probs in scores:
            texts = reviews[done:done + len(probs)]
            blocks = explain(texts, probs) if explain else [None] * len(probs)
            with tqdm.external_write_mode(file=sys.stdout):
                for prob, text, block in zip(probs, texts, blocks, strict=True):
                    print(f"{prob:.4f}  {label_name(config, prob)}  {shown(text)}")
                    if block is not None:
                        print(block)
                sys.stdout.flush()
            done += len(probs)
            bar.update(len(probs))
    if done != len(reviews):
        raise RuntimeError(f"scored {done} of {len(reviews)} reviews")


def add_explain_args(p: argparse.ArgumentParser) -> None:
    """--explain --steps --html of both predict commands (:mod:`scratch.pipeline.explain`)."""
    g = p.add_argument_group("why the model said so (integrated gradients over the head's input)")
    g.add_argument("--explain", action="store_true",
                   help="print each review with its strongest positive and negative words "
                        "marked, and the completeness check")
    g.add_argument("--steps", type=positive(int), default=50,
                   help="Gauss-Legendre interpolation steps (default %(default)s)")
    g.add_argument("--html", metavar="PATH", help="write a self-contained page with every "
                   "review's words coloured by their attribution")


def label_name(config: dict, prob: float) -> str:
    """The predicted class's name: the checkpoint's ``labels`` (a table's two values, 0 then
    1) where it has them, else negative/positive."""
    names = config.get("labels")
    if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        names = ["negative", "positive"]
    return names[int(prob > 0.5)]


def shown(text: str, width: int = 72) -> str:
    """A review on one line, cut to ``width`` characters for the echo."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


# --- running a command as a program -------------------------------------------------------

def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(main, prog: str) -> int:
    """``main()`` as a program: SIGTERM ends it as Ctrl-C does (``finally`` blocks run), an
    interruption is one line and exit status 130, a :class:`CommandError` (a damaged feature
    cache entry, a full disk) one line and exit status 1, the ``reference`` and ``scratch`` loggers'
    INFO lines go to stderr.  Both settings are undone afterwards.  First, glibc is asked to
    keep freed memory for reuse (:func:`scratch.pipeline.malloc.reuse_freed_memory`: big
    temporary arrays otherwise cost page faults, a third of the CPU time of a feature
    extraction); that one stays for the process's life."""
    reuse_freed_memory()
    previous = signal.signal(signal.SIGTERM, _terminate)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logs = [logging.getLogger(name) for name in LOGGERS]
    saved = [(log.level, log.propagate) for log in logs]
    for log in logs:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except CommandError as e:          # a damaged cache entry, a full disk, ...: one line
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return FAILED
    finally:
        for log, (level, propagate) in zip(logs, saved, strict=True):
            log.removeHandler(handler)
            log.level, log.propagate = level, propagate
        signal.signal(signal.SIGTERM, previous)
