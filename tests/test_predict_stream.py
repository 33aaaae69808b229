"""The predict commands stream (issue 22): reviews are scored a window (256) at a time and each
window's lines are printed, in input order, and flushed before the next window is scored, so
that thousands of reviews on ``--file -`` show results as they come; the numbers are those of
one batch over everything."""
import io
import sys

import pytest

from reference.pipeline import predict as rpredict
from scratch.pipeline import cli
from scratch.pipeline import predict as spredict
from tests.imdb_fixtures import save_tiny_checkpoint, save_tiny_encoder


class Recorder(io.StringIO):
    """A stdout that notes, in ``events``, how many lines it held at each flush."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def flush(self):
        self.events.append(("flush", self.getvalue().count("\n")))


def test_print_scores_flushes_each_window_before_the_next_is_scored(monkeypatch):
    events = []
    monkeypatch.setattr(sys, "stdout", Recorder(events))

    def scores():
        for w in range(3):
            events.append(("score", w))
            yield [0.25, 0.75][: 1 + (w < 2)]

    reviews = ["a", "b", "c", "d", "e"]
    cli.print_scores(scores(), reviews, window=2)
    assert events == [("score", 0), ("flush", 2), ("score", 1), ("flush", 4), ("score", 2),
                      ("flush", 5)]
    lines = sys.stdout.getvalue().splitlines()
    assert lines[0] == "0.2500  negative  a" and lines[3] == "0.7500  positive  d"


def test_print_scores_refuses_to_lose_reviews(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(RuntimeError, match="scored 1 of 2 reviews"):
        cli.print_scores(iter([[0.5]]), ["a", "b"], window=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return save_tiny_checkpoint(root / "ckpt", save_tiny_encoder(root / "tiny-bert"))


def reviews(n):
    words = "a fine film with a dull plot and great acting that I loved or hated".split()
    return [" ".join(words[: 1 + (i * 7) % len(words)]) + f" number {i}" for i in range(n)]


@pytest.mark.parametrize("side", ["reference", "scratch"])
def test_predict_streams_window_by_window_in_input_order(side, checkpoint, tmp_path,
                                                         monkeypatch):
    module = rpredict if side == "reference" else spredict
    texts = reviews(600)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    events = []
    real = module.predict_batch

    def recorded(*args, **kw):
        events.append(("score", len(args[2] if side == "reference" else args[3])))
        return real(*args, **kw)

    monkeypatch.setattr(module, "predict_batch", recorded)
    monkeypatch.setattr(sys, "stdout", Recorder(events))
    assert module.main(["--checkpoint", str(checkpoint), "--file", str(tmp_path / "in.txt"),
                        "--batch-size", "16"]) == 0
    assert events == [("score", 256), ("flush", 256), ("score", 256), ("flush", 512),
                      ("score", 88), ("flush", 600)]
    out = sys.stdout.getvalue().splitlines()
    assert [line.split("  ", 2)[2] for line in out] == [cli.shown(t) for t in texts]
    # the same numbers as one call over everything (printed to 4 decimals)
    if side == "reference":
        model, tok, config = rpredict.load_model(checkpoint)
        whole = real(model, tok, texts, config["max_length"], 64)
    else:
        enc, tok, head, config = spredict.load_model(checkpoint)
        whole = real(enc, tok, head, texts, config["max_length"], 64)
    assert [float(line.split()[0]) for line in out] == pytest.approx(whole, abs=6e-5)
