"""End to end on the real IMDB archive: ``python -m reference.pipeline.train`` with the packaged
MiniLM encoder on a stratified subset sized for CI, then ``reference.pipeline.predict`` on its
checkpoint; and the scratch pipeline against it on the same reviews: ``scratch.pipeline.predict``
of the reference checkpoint, and ``scratch.pipeline.train`` from the same initial weights.

Sizes (measured on this project's 2-core CI machine, see the README): 2,000 train reviews
(1,400 train / 600 valid) and 1,000 test reviews, the first 128 tokens of each, 2 epochs,
batch 32 -- the same subset as ``make demo``, so the two share the feature cache.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reference.model import GRUHead
from reference.pipeline import checkpoint as rckpt
from reference.pipeline import predict, train
from reference.pipeline.data import find_imdb, load_imdb, stratified_subset
from scratch.pipeline import predict as spredict
from scratch.pipeline import train as strain

ROOT = Path(__file__).resolve().parents[1]
# One worker runs the whole module (its fixture trains for minutes), and it runs first
# (tests/conftest.py puts grouped tests at the front; `make test` uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("imdb_e2e")
SUBSET = ["--encoder", "minilm", "--limit-train", "2000", "--limit-test", "1000",
          "--max-length", "128", "--batch-size", "32", "--epochs", "2", "--seed", "3407"]

# The floor.  Chance is 50% (the subset is stratified); a majority-class or broken model
# (labels flipped, padding read as text, features misaligned with labels) scores near 50%.
# Measured with exactly these settings (torch 2.13 CPU, 2 cores): test accuracy 73.5% (valid
# 70.2% after epoch 1, 72.0% after epoch 2).  So small a subset (1,400 training reviews, 128
# tokens each, 2 epochs: what fits CI's 4 minutes) is far from the full run's accuracy, but
# 0.68 is still 11 standard errors of a 1,000-review accuracy (1.6 points at p = 0.5) above
# chance, and leaves ~6 points for other CPUs' floating-point differences.
FLOOR = 0.68


@pytest.fixture(scope="module")
def reference_run(imdb_path, tmp_path_factory):
    """reference.pipeline.train on the CI subset: (checkpoint folder, metrics)."""
    out = tmp_path_factory.mktemp("imdb") / "run"
    assert train.main(["--data", str(imdb_path), "--out", str(out), "--device", "cpu",
                       "--cache", str(ROOT / ".cache/features"), "--no-progress", *SUBSET]) == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.imdb
@pytest.mark.slow
def test_minilm_bigru_learns_imdb_subset(reference_run, capsys):
    out, m = reference_run
    assert (m["n_train"], m["n_valid"], m["n_test"]) == (1400, 600, 1000)
    assert len(m["epochs"]) == 2
    assert m["test_acc"] >= FLOOR, m
    assert m["epochs"][-1]["valid_acc"] >= FLOOR - 0.05, m["epochs"]
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(out), "This film is terrible",
                         "This film is great, a wonderful story and superb acting"]) == 0
    neg, pos = (float(line.split()[0]) for line in capsys.readouterr().out.splitlines())
    assert neg < 0.5 < pos


@pytest.mark.imdb
@pytest.mark.slow
def test_scratch_scores_the_reference_checkpoint_like_the_reference(reference_run, imdb_path):
    """48 real test reviews (padded batches of mixed lengths, cut to 128 tokens), the whole
    model: scratch (NumPy BERT + head, float32) vs reference (transformers + torch, float32).
    Both compute in float32 (relative rounding ~1e-7 per operation through 6 BERT layers and 2
    GRU layers: ~1e-6 on the logit); 1e-5 on a probability leaves a margin of 10."""
    out, _ = reference_run
    test = load_imdb(find_imdb(str(imdb_path)), splits=("test",))["test"]
    texts = [test.texts[i] for i in stratified_subset(test.labels, 48, seed=1)]
    model, tok, config = predict.load_model(out)
    ref = predict.predict_batch(model, tok, texts, config["max_length"], batch_size=16)
    enc, stok, head, sconfig = spredict.load_model(out)
    mine = spredict.predict_batch(enc, stok, head, texts, sconfig["max_length"], batch_size=16)
    assert np.max(np.abs(np.array(mine) - np.array(ref))) <= 1e-5


@pytest.mark.imdb
@pytest.mark.slow
def test_scratch_training_reaches_the_reference_accuracy(reference_run, imdb_path, tmp_path):
    """scratch.pipeline.train on the same subset, from the same initial weights (the reference's
    torch-seeded init, passed with --init), same split, batches and recipe; only the dropout
    masks differ (NumPy's generator, not torch's).  Test accuracy within 1.5 points."""
    _, ref = reference_run
    model = ref["config"]["model"]
    torch.manual_seed(3407)                                     # as reference.pipeline.train does
    rckpt.save_weights(tmp_path / "init", GRUHead(**model), {"encoder": "minilm", "model": model})
    out = tmp_path / "scratch"
    assert strain.main(["--data", str(imdb_path), "--out", str(out), "--init",
                        str(tmp_path / "init"), "--cache", str(ROOT / ".cache/features"),
                        "--no-progress", *SUBSET]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_train"], m["n_valid"], m["n_test"]) == (1400, 600, 1000)
    assert abs(m["test_acc"] - ref["test_acc"]) <= 0.015, (m["test_acc"], ref["test_acc"])


@pytest.mark.imdb
@pytest.mark.slow
def test_demo_shows_both_pipelines_side_by_side(reference_run, capsys):
    """make demo's last table: each sentence scored by both pipelines on the same checkpoint."""
    from reference.pipeline import demo

    out, _ = reference_run
    model, tok, config = predict.load_model(out)
    capsys.readouterr()
    demo.side_by_side(out, model, tok, config, demo.SENTENCES)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["reference", "scratch", "|diff|"]
    assert len(lines) == 1 + len(demo.SENTENCES)
    for line, sentence in zip(lines[1:], demo.SENTENCES, strict=True):
        p_ref, p_scratch, diff = (float(v) for v in line.split()[:3])
        assert line.endswith(sentence) and abs(p_ref - p_scratch) <= 1e-4 and diff <= 1e-4
