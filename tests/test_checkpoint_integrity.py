"""Checkpoints refuse to load when damaged (issue 10), and reference.pipeline.predict reads reviews
from files and standard input, in batches, quietly.

A damaged checkpoint is a :class:`CheckpointError` naming the file, and
``reference.pipeline.predict`` turns it into one line and exit status 2 before any encoder is
loaded.  The checksum (the sha256 of model.safetensors, in config.json) catches changed bytes;
the other checks catch damage that came with a matching checksum (a file stamped or trained
that way)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save as st_save

from reference.pipeline import checkpoint as ckpt
from reference.pipeline import encoders, predict
from reference.pipeline.train import fit
from tests.imdb_fixtures import save_tiny_checkpoint, save_tiny_encoder
from tests.test_train import new_head, splits, strip_times, toy_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


@pytest.fixture
def good(tmp_path, encoder_folder):
    return save_tiny_checkpoint(tmp_path / "ckpt", encoder_folder)


def rewrite(folder, data: bytes, stamp: bool):
    """New bytes for model.safetensors; ``stamp``: with a matching checksum in config.json."""
    (folder / ckpt.WEIGHTS).write_bytes(data)
    if stamp:
        config = json.loads((folder / ckpt.CONFIG).read_text())
        config[ckpt.CHECKSUM] = ckpt.sha256(data)
        (folder / ckpt.CONFIG).write_text(json.dumps(config))


def tensors(folder):
    from safetensors.torch import load

    return load((folder / ckpt.WEIGHTS).read_bytes())


def flip_a_weight_byte(f):
    data = bytearray((f / ckpt.WEIGHTS).read_bytes())
    data[-3] ^= 0x40                                 # in the last tensor's values
    rewrite(f, bytes(data), stamp=False)


def truncate(f, stamp=False):
    rewrite(f, (f / ckpt.WEIGHTS).read_bytes()[:-100], stamp)


def with_value(value):
    def damage(f):
        state = tensors(f)
        state["out.bias"][0] = value
        rewrite(f, st_save(state), stamp=True)
    return damage


def garble_header(f):
    data = (f / ckpt.WEIGHTS).read_bytes()
    rewrite(f, data[:8] + b"{\"rnn.weight_ih_l0\": [[[" + data[32:], stamp=True)


def huge_header_length(f):
    rewrite(f, (2**40).to_bytes(8, "little") + (f / ckpt.WEIGHTS).read_bytes()[8:], stamp=True)


def edit_config(change):
    def damage(f):
        config = json.loads((f / ckpt.CONFIG).read_text())
        change(config)
        (f / ckpt.CONFIG).write_text(json.dumps(config))
    return damage


def as_float64(f):
    rewrite(f, st_save({k: v.double() for k, v in tensors(f).items()}), stamp=True)


def drop_tensor(f):
    state = tensors(f)
    del state["out.weight"]
    rewrite(f, st_save(state), stamp=True)


DAMAGE = [
    ("flipped weight bytes", flip_a_weight_byte,
     r"model.safetensors: sha256 \w+\.\.\. is not the weights_sha256 \w+\.\.\. in config.json "
     r"\(damaged or replaced file\)"),
    ("truncated file", truncate,
     r"model.safetensors: sha256 .* \(damaged or replaced file\)"),
    ("truncated file, checksum matching", lambda f: truncate(f, stamp=True),
     r"model.safetensors: not a valid safetensors file"),
    ("NaN tensor", with_value(float("nan")),
     r"model.safetensors: out.bias holds 1 NaN or infinite values"),
    ("inf tensor", with_value(float("-inf")),
     r"model.safetensors: out.bias holds 1 NaN or infinite values"),
    ("garbled header", garble_header,
     r"model.safetensors: not a valid safetensors file"),
    ("header length past the end", huge_header_length,
     r"model.safetensors: not a valid safetensors file"),
    ("bad JSON", lambda f: (f / ckpt.CONFIG).write_text('{"model": {"emb_dim": 16,'),
     r"config.json: not valid JSON \(Expecting"),
    ("JSON not an object", lambda f: (f / ckpt.CONFIG).write_text("[1, 2]"),
     r"config.json: not a JSON object"),
    ("binary config", lambda f: (f / ckpt.CONFIG).write_bytes(b"\xff\xfe\x00garbage"),
     r"config.json: not valid JSON"),
    ("no checksum (old checkpoint)", edit_config(lambda c: c.pop(ckpt.CHECKSUM)),
     r"config.json: no valid weights_sha256 .*python -m reference.pipeline.checkpoint stamp"),
    ("checksum not hex", edit_config(lambda c: c.update({ckpt.CHECKSUM: "abc"})),
     r"no valid weights_sha256"),
    ("model argument of the wrong type", edit_config(lambda c: c["model"].update(hidden_dim="5")),
     r"config.json: model argument hidden_dim='5' is not valid"),
    ("model arguments missing", edit_config(lambda c: c["model"].pop("n_layers")),
     r"config.json: model arguments \['n_layers'\] missing"),
    ("dropout out of range", edit_config(lambda c: c["model"].update(dropout=1.5)),
     r"model argument dropout=1.5 is not valid"),
    ("float64 tensors", as_float64,
     r"model.safetensors: \S+ is torch.float64, the model wants torch.float32"),
    ("a tensor missing", drop_tensor,
     r"model.safetensors: head tensors \['out.weight'\] missing or unexpected"),
    ("weights file gone", lambda f: (f / ckpt.WEIGHTS).unlink(),
     r"ckpt: no model.safetensors \(not a finished"),
]


@pytest.mark.parametrize("name, damage, pattern", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_checkpoint_never_loads(good, name, damage, pattern):
    ckpt.load_head(good)                                     # whole, it loads
    damage(good)
    with pytest.raises(ckpt.CheckpointError, match=pattern):
        ckpt.load_head(good)


@pytest.mark.parametrize("name, damage, pattern", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_predict_refuses_a_damaged_checkpoint_in_one_line(good, monkeypatch, capsys, name,
                                                          damage, pattern):
    """Before any encoder weight is read, and nothing scored, nothing written."""
    damage(good)
    before = sorted((p.name, p.read_bytes()) for p in good.iterdir())

    class NoWeights:
        @staticmethod
        def from_pretrained(*a, **k):
            pytest.fail("the encoder was loaded for a damaged checkpoint")

    monkeypatch.setattr(encoders, "AutoModel", NoWeights)
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(good), "a fine film"])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in out.err, out.err
    assert re.search(pattern, lines[0]) and out.out == ""
    assert sorted((p.name, p.read_bytes()) for p in good.iterdir()) == before


def test_the_checksum_is_the_sha256_of_the_weights_file(good):
    import hashlib

    config = json.loads((good / ckpt.CONFIG).read_text())
    assert config[ckpt.CHECKSUM] == hashlib.sha256((good / ckpt.WEIGHTS).read_bytes()).hexdigest()


def test_a_crash_between_weights_and_checksum_refuses_then_resume_repairs(tmp_path, monkeypatch):
    """Training writes model.safetensors, then config.json with its sha256.  A crash between
    the two leaves a checkpoint that refuses to load; resuming repeats the epoch and leaves the
    uninterrupted run's checkpoint."""
    store, labels = toy_data()
    tr, va = splits(store, labels)
    config = {"model": dict(emb_dim=4, hidden_dim=3, output_dim=1, n_layers=2,
                            bidirectional=True, dropout=0.25)}
    kw = dict(batch_size=8, seed=2, lr=1e-2, config=config, log=str)
    full = fit(new_head(), tr, va, tmp_path / "full", epochs=2, **kw)
    assert full[1]["best"]                               # epoch 2 writes weights: the crash point
    cut = tmp_path / "cut"
    fit(new_head(), tr, va, cut, epochs=1, **kw)
    real = ckpt.write_json

    def crash_on_config(path, obj):
        if Path(path).name == ckpt.CONFIG:
            raise KeyboardInterrupt("power cut")
        real(path, obj)

    monkeypatch.setattr(ckpt, "write_json", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        fit(new_head(), tr, va, cut, epochs=2, state=ckpt.load_state(cut), **kw)
    monkeypatch.setattr(ckpt, "write_json", real)
    with pytest.raises(ckpt.CheckpointError, match="damaged or replaced"):
        ckpt.load_head(cut)                              # epoch 2's weights, epoch 1's checksum
    resumed = fit(new_head(), tr, va, cut, epochs=2, state=ckpt.load_state(cut), **kw)
    assert strip_times(resumed) == strip_times(full)
    assert (cut / ckpt.WEIGHTS).read_bytes() == (tmp_path / "full" / ckpt.WEIGHTS).read_bytes()
    ckpt.load_head(cut)


def test_stamp_adopts_an_old_checkpoint_only_when_its_weights_check_out(good, capsys):
    edit_config(lambda c: c.pop(ckpt.CHECKSUM))(good)
    with pytest.raises(ckpt.CheckpointError, match="no valid weights_sha256"):
        ckpt.load_head(good)
    assert ckpt.main(["stamp", str(good)]) == 0
    assert ckpt.CHECKSUM in capsys.readouterr().out
    ckpt.load_head(good)
    with_value(float("nan"))(good)                      # NaN weights are never stamped
    edit_config(lambda c: c.pop(ckpt.CHECKSUM))(good)
    with pytest.raises(SystemExit) as e:
        ckpt.main(["stamp", str(good)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds 1 NaN" in err and len(err.splitlines()) == 1
    assert ckpt.CHECKSUM not in json.loads((good / ckpt.CONFIG).read_text())


def test_fit_stops_on_a_diverged_loss_before_saving_it(tmp_path):
    store, labels = toy_data()
    tr, va = splits(store, labels)
    with pytest.raises(FloatingPointError, match="epoch 1: .*training diverged"):
        fit(new_head(), tr, va, tmp_path, epochs=1, batch_size=8, lr=float("inf"), log=str)
    assert not (tmp_path / ckpt.WEIGHTS).exists()


# --- reference.pipeline.predict: files, standard input, batches, quiet ----------------------------

TEXTS = ["a great film", "an awful, boring film that I hated from start to end " * 3,
         "ok", "word " * 700, "brilliant", "dull dull dull"]


def test_batches_give_the_one_at_a_time_numbers(good):
    model, tok, config = predict.load_model(good)
    one = [predict.predict_sentiment(model, tok, t, config["max_length"]) for t in TEXTS]
    for batch_size in (1, 4, 32):
        many = predict.predict_batch(model, tok, TEXTS, config["max_length"], batch_size)
        np.testing.assert_allclose(many, one, rtol=0, atol=1e-6)
    assert len(set(np.round(one, 6))) > 1                   # not one number for everything


def test_help_says_what_a_cold_start_loads(capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "Cold start" in out and "encoder named" in out and "batches of --batch-size" in out


def test_a_review_longer_than_the_argument_limit_scores_from_stdin(good):
    """Linux caps one argument at 128 KiB (MAX_ARG_STRLEN): such a review fails as an argument
    and scores through --file -, with the echo shortened and nothing at all on stderr (no
    weight-loading bar, no tokenizer warning about its length)."""
    long_review = "This film is great, I loved every minute of it. " * 4000    # 196 KB
    cmd = [sys.executable, "-m", "reference.pipeline.predict", "--checkpoint", str(good)]
    with pytest.raises(OSError, match="Argument list too long"):
        subprocess.run([*cmd, long_review], cwd=ROOT, capture_output=True)
    r = subprocess.run([*cmd, "--file", "-", "a short one"], cwd=ROOT, capture_output=True,
                       input=(long_review + "\nan awful film\n").encode(),
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 3                                       # arguments first, then the file
    assert lines[0].endswith("a short one") and lines[2].endswith("an awful film")
    assert len(lines[1]) < 100 and lines[1].endswith("...")
    model, tok, config = predict.load_model(good)
    want = predict.predict_sentiment(model, tok, long_review, config["max_length"])
    assert float(lines[1].split()[0]) == pytest.approx(want, abs=5e-5)


def test_loading_an_encoder_shows_no_progress_bar_and_restores_the_setting(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    folder = save_tiny_encoder(tmp_path / "enc")
    capfd.readouterr()
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        encoders.load_encoder(str(folder))
        assert hf_logging.is_progress_bar_enabled() == enabled
        err = capfd.readouterr().err
        assert "Loading weights" not in err and err == "", err
    hf_logging.enable_progress_bar()
