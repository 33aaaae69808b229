"""The whole sentiment model from scratch against the reference pipeline: the feature cache both
read, training step for step, checkpoints both ways, the CLIs, and torch never imported.

(On the real IMDB archive: tests/test_imdb_e2e.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference.model import GRUHead
from reference.pipeline import checkpoint as rckpt
from reference.pipeline import features as rfeatures
from reference.pipeline import predict as rpredict
from reference.pipeline import train as rtrain
from reference.pipeline.encoders import load_encoder
from scratch.pipeline import checkpoint as sckpt
from scratch.pipeline import features as sfeatures
from scratch.pipeline import predict as spredict
from scratch.pipeline import train as strain
from scratch.pipeline.encoder_names import Encoder
from scratch.sentiment import SentimentHead
from tests.helpers import Cut, MemoryStore, cut_after
from tests.imdb_fixtures import make_tree, review, save_tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [review(i, i % 2 == 0) for i in range(14)] + ["A fine film. " * 30]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch-world")
    make_tree(root, n_per_class=10)
    save_tiny_encoder(root / "tiny-bert")
    return root


def scratch_encoder(folder) -> Encoder:
    enc = Encoder.inspect(str(folder))
    enc.load_tokenizer()
    return enc


# ---- the feature cache: one format, found by both ---------------------------------------------

def test_scratch_finds_the_entry_the_reference_wrote(world, tmp_path):
    ref = rfeatures.extract_features(load_encoder(str(world / "tiny-bert")), TEXTS, tmp_path,
                                     max_length=32, autocast=False, progress=False)
    assert ref.meta["portable_key"]
    store = strain.features(scratch_encoder(world / "tiny-bert"), TEXTS, tmp_path, 32, False)
    assert store.folder == ref.folder                        # read, not computed again
    assert [p.name for p in tmp_path.iterdir()] == [ref.folder.name]


def test_an_entry_made_before_the_portable_key_gets_it(world, tmp_path):
    enc = load_encoder(str(world / "tiny-bert"))
    ref = rfeatures.extract_features(enc, TEXTS, tmp_path, max_length=32, autocast=False,
                                     progress=False)
    index = ref.folder / "index.json"
    meta = json.loads(index.read_text())
    key = meta.pop("portable_key")
    index.write_text(json.dumps(meta))
    assert sfeatures.find_entry(tmp_path, key) is None
    rfeatures.extract_features(enc, TEXTS, tmp_path, max_length=32, autocast=False, progress=False)
    assert sfeatures.find_entry(tmp_path, key).folder == ref.folder


def test_scratch_waits_for_the_entry_the_reference_is_still_writing(world, tmp_path,
                                                                    monkeypatch):
    """The reference's extraction has started (plan written, lock held, no index.json yet):
    strain.features waits for it and reads its entry instead of computing the features again
    with the scratch encoder (hours for IMDB's test split at 512 tokens)."""
    import threading

    started, release = threading.Event(), threading.Event()
    real_encode = rfeatures._encode

    def slow_encode(*args, **kw):
        started.set()
        assert release.wait(30)
        return real_encode(*args, **kw)

    monkeypatch.setattr(rfeatures, "_encode", slow_encode)
    enc = load_encoder(str(world / "tiny-bert"))
    ref = {}
    writer = threading.Thread(target=lambda: ref.update(store=rfeatures.extract_features(
        enc, TEXTS, tmp_path, max_length=32, autocast=False, progress=False)))
    writer.start()
    assert started.wait(30)
    (entry,) = tmp_path.iterdir()
    assert not (entry / "index.json").exists() and (entry / sfeatures.PORTABLE_KEY).exists()
    got = {}
    reader = threading.Thread(target=lambda: got.update(store=strain.features(
        scratch_encoder(world / "tiny-bert"), TEXTS, tmp_path, 32, False)))
    try:
        reader.start()
        reader.join(1.0)
        assert reader.is_alive()                                   # waiting, not computing:
        assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no scratch-<key> entry
    finally:
        release.set()
        writer.join(30)
        reader.join(30)
    assert got["store"].folder == ref["store"].folder == entry
    assert got["store"].wait_seconds >= 0.9
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_a_dead_writers_entry_is_not_waited_for(world, tmp_path):
    """An entry whose writer is gone (its portable_key file, no lock held, no index.json):
    nothing to wait for; the scratch encoder computes the features as before."""
    enc = load_encoder(str(world / "tiny-bert"))
    ref = rfeatures.extract_features(enc, TEXTS, tmp_path, max_length=32, autocast=False,
                                     progress=False)
    key = ref.meta["portable_key"]
    assert (ref.folder / sfeatures.PORTABLE_KEY).read_text() == key
    (ref.folder / "index.json").unlink()                         # as a killed writer leaves it
    assert sfeatures.wait_for_writers(tmp_path, key) == 0.0
    mine = strain.features(scratch_encoder(world / "tiny-bert"), TEXTS, tmp_path, 32, False)
    assert mine.folder.name == f"scratch-{key}"


def test_scratch_computes_missing_features_equal_to_the_reference(world, tmp_path):
    """No entry: the scratch encoder writes one (float32, stored float16); the reference
    encoder's float32 features of the same texts agree to float16 rounding."""
    mine = strain.features(scratch_encoder(world / "tiny-bert"), TEXTS, tmp_path / "s", 32, False)
    assert (mine.folder.name.startswith("scratch-")
            and mine.meta["computed_by"].startswith("scratch"))
    ref = rfeatures.extract_features(load_encoder(str(world / "tiny-bert")), TEXTS,
                                     tmp_path / "r", max_length=32, autocast=False, progress=False)
    np.testing.assert_array_equal(mine.lengths, ref.lengths)
    for i in range(len(TEXTS)):
        a, b = mine.get(i).astype(np.float64), ref.get(i).astype(np.float64)
        # features are O(1) (LayerNorm output); float16 keeps 11 bits: 2^-11 relative, and the
        # two float32 encoders differ by ~1e-6 first, which can flip a rounding: 2 ulps
        assert np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)) <= 2 * 2.0 ** -11


# ---- training: step for step the reference's ----------------------------------------------------

class Store(MemoryStore):
    """Random features in memory, batches as NumPy (scratch) or torch float64 (reference)."""

    def __init__(self, n=48, emb=6, seed=0, torch_batches=False):
        rng = np.random.default_rng(seed)
        super().__init__([rng.standard_normal((L, emb)) for L in rng.integers(1, 12, n)],
                         torch_batches)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_fit_follows_reference_fit_step_for_step(tmp_path, n_layers):
    """Same initial weights, same split and batches, dropout off, float64: after 2 epochs of
    12 steps each (24 Adam steps) the losses, accuracies and every weight agree to 1e-9."""
    labels = np.random.default_rng(1).integers(0, 2, 48)
    tr, va = np.arange(36), np.arange(36, 48)
    model = dict(emb_dim=6, hidden_dim=5, output_dim=1, n_layers=n_layers, bidirectional=True,
                 dropout=0.0)
    torch.manual_seed(0)
    ref = GRUHead(**model).double()
    mine = SentimentHead(**model, dtype="float64")
    mine.load_state_dict(ref.state_dict())
    rs, ss = Store(torch_batches=True), Store()
    r_hist = rtrain.fit(ref, rtrain.Split(rs, tr, labels[tr]), rtrain.Split(rs, va, labels[va]),
                        tmp_path / "r", epochs=2, batch_size=3, seed=7, log=lambda *_: None)
    s_hist = strain.fit(mine, strain.Split(ss, tr, labels[tr]), strain.Split(ss, va, labels[va]),
                        tmp_path / "s", epochs=2, batch_size=3, seed=7, log=lambda *_: None)
    for r, s in zip(r_hist, s_hist, strict=True):
        for k in ("train_loss", "valid_loss"):
            assert abs(r[k] - s[k]) <= 1e-9 * abs(r[k]), (k, r[k], s[k])
        assert ((r["train_acc"], r["valid_acc"], r["best"])
                == (s["train_acc"], s["valid_acc"], s["best"]))
    for name, w in ref.state_dict().items():
        np.testing.assert_allclose(mine.params[name], w.numpy(), rtol=1e-9, atol=1e-12)


def test_fit_resumes_exactly(tmp_path):
    """Two epochs, or one epoch then a resume from last.safetensors: the same weights, bit for
    bit (dropout on: the mask generators are part of the state)."""
    labels = np.random.default_rng(1).integers(0, 2, 48)
    tr, va = np.arange(36), np.arange(36, 48)

    def run(out, epochs, state=None):
        head = SentimentHead(6, 5, dtype="float64", seed=3)
        h = strain.fit(head, strain.Split(Store(), tr, labels[tr]),
                       strain.Split(Store(), va, labels[va]),
                       out, epochs=epochs, batch_size=4, seed=7, state=state, log=lambda *_: None)
        return head, h

    whole, h2 = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed, h2b = run(tmp_path / "b", 2, sckpt.load_state(tmp_path / "b"))
    assert [r["train_loss"] for r in h2] == [r["train_loss"] for r in h2b]
    for name, w in whole.params.items():
        assert np.array_equal(w, resumed.params[name]), name



@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("epoch, batches", [(1, 3), (2, 6)])
def test_fit_resumes_exactly_from_the_middle_of_an_epoch(tmp_path, monkeypatch, dtype, epoch,
                                                          batches):
    """save_every = 3 on 9 batches an epoch: killed right after it saved batch 3 of epoch 1
    (or 6 of epoch 2), resumed from last.safetensors, the run ends with the uninterrupted
    run's weights and history, bit for bit (dropout on), in both precisions."""
    labels = np.random.default_rng(1).integers(0, 2, 48)
    tr, va = np.arange(36), np.arange(36, 48)

    def run(out, state=None):
        head = SentimentHead(6, 5, dtype=dtype, seed=3)
        h = strain.fit(head, strain.Split(Store(), tr, labels[tr]),
                       strain.Split(Store(), va, labels[va]), out, epochs=2, batch_size=4,
                       seed=7, state=state, log=lambda *_: None, save_every=3)
        return head, h

    whole, h = run(tmp_path / "a")
    with monkeypatch.context() as m:
        cut_after(m, sckpt, epoch, batches)
        with pytest.raises(Cut):
            run(tmp_path / "b")
    state = sckpt.load_state(tmp_path / "b")
    assert (state["epoch"], state["partial"]["batches"]) == (epoch - 1, batches)
    resumed, hb = run(tmp_path / "b", state)
    strip = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in hb]
    for name, w in whole.params.items():
        assert np.array_equal(w, resumed.params[name]), name
    assert "partial" not in sckpt.load_state(tmp_path / "b")

# ---- the commands -------------------------------------------------------------------------------

def run_train(world, out, *extra):
    return strain.main(["--data", str(world / "aclImdb"), "--encoder", str(world / "tiny-bert"),
                        "--out", str(out), "--cache", str(out.parent / "cache"),
                        "--max-length", "32", "--epochs", "2", "--batch-size", "4",
                        "--no-progress", *extra])


def test_scratch_train_cli_writes_a_checkpoint_the_reference_loads(world, tmp_path, capsys):
    assert run_train(world, tmp_path / "run") == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["n_train"], m["n_valid"], m["n_test"]) == (14, 6, 20) and len(m["epochs"]) == 2
    assert 0 <= m["test_acc"] <= 1 and m["config"]["trained_by"] == "scratch"
    capsys.readouterr()
    texts = ["great wonderful superb", "awful boring dull terrible waste"]
    assert spredict.main(["--checkpoint", str(tmp_path / "run"), *texts]) == 0
    mine = [float(line.split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert rpredict.main(["--checkpoint", str(tmp_path / "run"), *texts]) == 0
    ref = [float(line.split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert mine == pytest.approx(ref, abs=2e-4)         # printed to 4 decimals


def test_scratch_predict_equals_reference_predict_on_a_reference_checkpoint(world, tmp_path):
    """A head trained by reference.pipeline.train, scored by both pipelines' whole models
    (encoder + head)."""
    assert rtrain.main(["--data", str(world / "aclImdb"), "--encoder", str(world / "tiny-bert"),
                        "--out", str(tmp_path / "ref"), "--cache", str(tmp_path / "cache"),
                        "--max-length", "32", "--epochs", "1", "--batch-size", "4",
                        "--no-progress", "--device", "cpu"]) == 0
    texts = TEXTS + ["x"]
    model, tok, config = rpredict.load_model(tmp_path / "ref")
    ref = rpredict.predict_batch(model, tok, texts, config["max_length"], batch_size=5)
    enc, stok, head, sconfig = spredict.load_model(tmp_path / "ref")
    mine = spredict.predict_batch(enc, stok, head, texts, sconfig["max_length"], batch_size=3)
    np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)


def test_scratch_train_init_starts_from_given_weights(world, tmp_path):
    """--init DIR: the run starts from that head's weights (here the reference's seeded init,
    so both pipelines start from the same point); a head of the wrong shape is refused."""
    model = dict(emb_dim=16, hidden_dim=256, output_dim=1, n_layers=2, bidirectional=True,
                 dropout=0.25)
    torch.manual_seed(3407)
    rckpt.save_weights(tmp_path / "init", GRUHead(**model), {"encoder": "tiny", "model": model})
    assert run_train(world, tmp_path / "run", "--init", str(tmp_path / "init"),
                     "--epochs", "1") == 0
    assert (json.loads((tmp_path / "run" / "config.json").read_text())["init"]
            == str(tmp_path / "init"))
    with pytest.raises(SystemExit) as e:
        run_train(world, tmp_path / "bad", "--init", str(tmp_path / "init"), "--hidden-dim", "8")
    assert e.value.code == 2


@pytest.mark.parametrize("argv, pattern", [
    (["--encoder", "nope"], "unknown encoder 'nope'"),
    (["--max-length", "600"], r"--max-length must be in 2\.\.512"),
    (["--limit-train", "5"], "--limit-train must be >= 10"),
    (["--limit-test", "999"], "--limit-test 999 is larger than the split"),
    (["--dropout", "1"], r"--dropout must be in \[0, 1\)"),
    (["--resume"], "nothing to resume"),
    (["--save-every", "0"], "argument --save-every: must be > 0, got 0"),
    (["--init", "/nonexistent"], "--init: .*no such checkpoint directory"),
])
def test_scratch_train_bad_input_is_one_line(world, tmp_path, capsys, argv, pattern):
    base = ["--data", str(world / "aclImdb"), "--encoder", str(world / "tiny-bert"),
            "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    args = base + argv if argv[0] != "--encoder" else base[:2] + argv + base[4:]
    with pytest.raises(SystemExit) as e:
        strain.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(pattern, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ---- torch is never imported ------------------------------------------------------------------

NO_TORCH = """
import sys, runpy
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("scratch imported torch")
sys.meta_path.insert(0, NoTorch())
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_scratch_train_and_predict_run_where_torch_cannot_be_imported(world, tmp_path):
    """The CLIs end to end in a fresh interpreter where importing torch raises: the features
    are computed by the scratch encoder (no reference entry in this cache)."""
    def run(*argv):
        return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                              text=True, cwd=ROOT, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                   "PYTHONPATH": str(ROOT)})
    r = run("scratch.pipeline.train", "--data", str(world / "aclImdb"),
            "--encoder", str(world / "tiny-bert"),
            "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--max-length",
            "32", "--epochs", "1", "--batch-size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test (best epoch 1)" in r.stdout
    r = run("scratch.pipeline.predict", "--checkpoint", str(tmp_path / "run"), "a great film")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("a great film")
