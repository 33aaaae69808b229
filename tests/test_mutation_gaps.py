"""Tests for bugs mutation testing showed nothing caught (issue 22, section 4): the
best-validation checkpoint, the split sizes, --resume refusing every changed option,
scratch.pipeline.predict cutting at the checkpoint's max_length, the feature cache keys, and NaN
in a multi-element checkpoint tensor."""
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reference.pipeline import checkpoint as rckpt
from reference.pipeline import features as rfeatures
from reference.pipeline import predict as rpredict
from reference.pipeline import train as rtrain
from scratch.pipeline import checkpoint as sckpt
from scratch.pipeline import features as sfeatures
from scratch.pipeline import predict as spredict
from scratch.pipeline import train as strain
from scratch.sentiment import SentimentHead
from tests.imdb_fixtures import make_tree, save_tiny_checkpoint, save_tiny_encoder
from tests.test_scratch_pipeline import Store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gaps")
    make_tree(root, n_per_class=10)
    save_tiny_encoder(root / "tiny-bert")
    return root


# ---- the best-validation checkpoint --------------------------------------------------------------

def worse_second_epoch(module, monkeypatch, weights_of):
    """Validation losses 0.5 then 0.9 (training itself real); returns the weights after each
    epoch, as ``weights_of(head)`` gives them."""
    real, seen = module.run_epoch, []

    def run_epoch(head, split, batch_size, optimizer=None, *a, **k):
        if optimizer is not None:
            return real(head, split, batch_size, optimizer, *a, **k)
        seen.append(weights_of(head))
        return (0.5, 0.6) if len(seen) == 1 else (0.9, 0.5)
    monkeypatch.setattr(module, "run_epoch", run_epoch)
    return seen


def test_scratch_keeps_the_earlier_checkpoint_when_validation_gets_worse(tmp_path, monkeypatch):
    store = Store(n=40)
    idx = np.arange(40)
    train = strain.Split(store, idx[10:], (idx[10:] % 2).astype(float))
    valid = strain.Split(store, idx[:10], (idx[:10] % 2).astype(float))
    head = SentimentHead(emb_dim=6, hidden_dim=3, output_dim=1, n_layers=1, bidirectional=True,
                         dropout=0.0, dtype="float64", seed=0)
    seen = worse_second_epoch(strain, monkeypatch,
                              lambda h: {k: v.copy() for k, v in h.state_dict().items()})
    history = strain.fit(head, train, valid, tmp_path, epochs=2, batch_size=8, lr=0.05,
                         log=lambda m: None)
    assert [r["best"] for r in history] == [True, False]
    saved, _ = sckpt.load_head(tmp_path, dtype="float64")
    for name, w in saved.params.items():
        np.testing.assert_allclose(w, seen[0][name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert any(not np.allclose(seen[0][k], seen[1][k]) for k in seen[0])   # epoch 2 did move


def test_reference_keeps_the_earlier_checkpoint_when_validation_gets_worse(tmp_path,
                                                                          monkeypatch):
    store = Store(n=40, torch_batches=True)
    idx = np.arange(40)
    train = rtrain.Split(store, idx[10:], (idx[10:] % 2).astype(np.float32))
    valid = rtrain.Split(store, idx[:10], (idx[:10] % 2).astype(np.float32))
    from reference.model import GRUHead
    torch.manual_seed(0)
    head = GRUHead(6, 3, 1, 1, True, 0.0).double()
    seen = worse_second_epoch(rtrain, monkeypatch,
                              lambda h: {k: v.detach().clone() for k, v in h.state_dict().items()})
    history = rtrain.fit(head, train, valid, tmp_path, epochs=2, batch_size=8, lr=0.05,
                         log=lambda m: None)
    assert [r["best"] for r in history] == [True, False]
    saved = load_file(tmp_path / rckpt.WEIGHTS)
    for name, w in seen[0].items():
        torch.testing.assert_close(saved[name].double(), w.double(), rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


# ---- the split sizes -------------------------------------------------------------------------

def train_args(world, out, *extra):
    return ["--data", str(world / "aclImdb"), "--encoder", str(world / "tiny-bert"),
            "--max-length", "32", "--cache", str(out.parent / "cache"), "--out", str(out),
            "--epochs", "1", "--batch-size", "4", "--no-progress", *extra]


@pytest.mark.parametrize("limit", [11, 12, 15, 17])      # 15: 4.5 valid reviews, rounds to even
def test_split_sizes_equal_the_reference_for_odd_limits(world, tmp_path, limit):
    assert strain.main(train_args(world, tmp_path / "s", "--limit-train", str(limit))) == 0
    assert rtrain.main([*train_args(world, tmp_path / "r", "--limit-train", str(limit)),
                        "--device", "cpu"]) == 0
    s = json.loads((tmp_path / "s" / "metrics.json").read_text())
    r = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert (s["n_train"], s["n_valid"]) == (r["n_train"], r["n_valid"])
    assert s["n_train"] + s["n_valid"] == limit and s["n_valid"] == round(limit * 0.3)


# ---- --resume refuses every changed option -----------------------------------------------------

CHANGES = {          # option -> (new value, the run key the refusal names)
    "--max-length": ("24", "max_length"), "--limit-train": ("18", "limit_train"),
    "--limit-test": ("10", "limit_test"), "--seed": ("5", "seed"),
    "--batch-size": ("8", "batch_size"), "--lr": ("0.002", "lr"),
    "--hidden-dim": ("7", "model"), "--n-layers": ("1", "model"), "--dropout": ("0.1", "model"),
}


@pytest.fixture(scope="module")
def saved_runs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = ["--limit-train", "16", "--limit-test", "12", "--hidden-dim", "5"]
    assert strain.main(train_args(world, root / "s", *base)) == 0
    assert rtrain.main([*train_args(world, root / "r", *base), "--device", "cpu"]) == 0
    return root, base


def changed(base, option, value):
    argv = list(base)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


@pytest.mark.parametrize("side", ["scratch", "reference"])
@pytest.mark.parametrize("option", [*CHANGES, "--encoder", "--dtype", "--init"])
def test_resume_refuses_every_changed_option(world, saved_runs, capsys, side, option):
    root, base = saved_runs
    if side == "reference" and option in ("--dtype", "--init"):
        pytest.skip("scratch-only options")
    out = root / ("s" if side == "scratch" else "r")
    args = train_args(world, out, *base, "--epochs", "2", "--resume")
    if option == "--encoder":
        other = root / "other-bert"
        if not other.exists():
            save_tiny_encoder(other, seed=1)
        args[args.index("--encoder") + 1], key = str(other), "encoder"
    elif option == "--dtype":
        args, key = changed(args, "--dtype", "float64"), "dtype"
    elif option == "--init":
        save_tiny_checkpoint(root / "init", world / "tiny-bert", hidden=16)
        args, key = changed(args, "--init", str(root / "init")), "init"
    else:
        value, key = CHANGES[option]
        args = changed(args, option, value)
    before = (out / "last.pt" if side == "reference" else out / sckpt.STATE).read_bytes()
    main = strain.main if side == "scratch" else rtrain.main
    with pytest.raises(SystemExit) as e:
        main(args if side == "scratch" else [*args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"was trained with different {key}" in err, err
    assert (out / "last.pt" if side == "reference" else out / sckpt.STATE).read_bytes() == before


# ---- scratch.pipeline.predict cuts reviews at the checkpoint's max_length -----------------------

def test_scratch_predict_cli_cuts_long_reviews_at_the_checkpoints_max_length(world, tmp_path,
                                                                           capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", world / "tiny-bert", max_length=16)
    long = " ".join(["a truly great film"] * 40 + ["an awful waste"] * 40)     # ~300 tokens
    assert spredict.main(["--checkpoint", str(ckpt), long]) == 0
    got = float(capsys.readouterr().out.split()[0])
    model, tok, config = rpredict.load_model(ckpt)
    assert config["max_length"] == 16
    cut = rpredict.predict_batch(model, tok, [long], 16, batch_size=1)[0]
    whole = rpredict.predict_batch(model, tok, [long], 512, batch_size=1)[0]
    assert got == pytest.approx(cut, abs=1e-4)
    assert abs(cut - whole) > 1e-3               # so cutting elsewhere would be seen


# ---- feature cache keys --------------------------------------------------------------------------

def test_portable_key_is_pinned(world):
    """Any change to how the key is made changes this value (and orphans every cached entry:
    change it only on purpose, with FORMAT)."""
    ids = [np.array([101, 2307, 102]), np.array([101, 102])]
    enc = sfeatures.encoder_id(world / "tiny-bert")
    key = sfeatures.portable_key(world / "tiny-bert", 32, ids)
    import hashlib
    h = hashlib.sha256(json.dumps({"format": 1, "encoder": enc, "max_length": 32}).encode())
    for a in ids:
        h.update(struct.pack("<I", len(a)) + np.asarray(a, "<i4").tobytes())
    assert key == h.hexdigest()[:24]
    assert len(key) == 24 and sfeatures.FORMAT == 1


def test_keys_differ_for_other_weights_of_the_same_config(world, tmp_path):
    save_tiny_encoder(tmp_path / "other", seed=1)
    a, b = world / "tiny-bert", tmp_path / "other"
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    ids = [np.array([101, 2307, 102])]
    assert sfeatures.portable_key(a, 32, ids) != sfeatures.portable_key(b, 32, ids)
    from reference.pipeline.encoders import load_encoder
    ea, eb = load_encoder(str(a)), load_encoder(str(b))
    assert rfeatures.cache_key(ea, ids, 32, False) != rfeatures.cache_key(eb, ids, 32, False)


def test_keys_differ_for_id_lists_that_join_to_the_same_sequence(world):
    one = [np.array([101, 2307, 2143, 102])]
    two = [np.array([101, 2307]), np.array([2143, 102])]
    assert sfeatures.portable_key(world / "tiny-bert", 32, one) != \
        sfeatures.portable_key(world / "tiny-bert", 32, two)
    from reference.pipeline.encoders import load_encoder
    enc = load_encoder(str(world / "tiny-bert"))
    assert rfeatures.cache_key(enc, one, 32, False) != rfeatures.cache_key(enc, two, 32, False)


def test_keys_depend_on_id_values_not_their_integer_type(world):
    """int64 (the reference's tokenizer) and int32 ids of the same values are the same reviews:
    the same key, so either pipeline finds the other's entry."""
    a = [np.array([101, 2307, 102], np.int64)]
    b = [np.array([101, 2307, 102], np.int32)]
    assert sfeatures.portable_key(world / "tiny-bert", 32, a) == \
        sfeatures.portable_key(world / "tiny-bert", 32, b)
    c = [np.array([101, 2307 + 2**32, 102], np.int64)]   # int32 would wrap it onto 2307
    with pytest.raises(ValueError, match="outside int32"):
        sfeatures.portable_key(world / "tiny-bert", 32, c)
    from reference.pipeline.encoders import load_encoder
    enc = load_encoder(str(world / "tiny-bert"))
    assert rfeatures.cache_key(enc, a, 32, False) == rfeatures.cache_key(enc, b, 32, False)
    with pytest.raises(ValueError, match="outside int32"):
        rfeatures.cache_key(enc, c, 32, False)


def test_find_entry_prefers_the_float32_entry_over_the_bf16_one(world, tmp_path):
    from reference.pipeline.encoders import load_encoder
    enc, texts = load_encoder(str(world / "tiny-bert")), ["a great film", "an awful film"]
    bf16 = rfeatures.extract_features(enc, texts, tmp_path, max_length=32, autocast=True,
                                      progress=False)
    f32 = rfeatures.extract_features(enc, texts, tmp_path, max_length=32, autocast=False,
                                     progress=False)
    assert bf16.folder != f32.folder and bf16.meta["portable_key"] == f32.meta["portable_key"]
    for first in (bf16.folder, f32.folder):                      # whichever sorts first
        os.utime(first / "index.json")
        assert sfeatures.find_entry(tmp_path, f32.meta["portable_key"]).folder == f32.folder


def test_the_encoder_id_memo_sees_weights_rewritten_in_place(tmp_path):
    folder = save_tiny_encoder(tmp_path / "enc", seed=0)
    before = sfeatures.encoder_id(folder)
    weights = folder / "model.safetensors"
    st = os.stat(weights)
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1
    save_file(state, str(weights), metadata={"format": "pt"})
    assert os.stat(weights).st_size == st.st_size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))       # the old mtime put back
    assert sfeatures.encoder_id(folder) != before


# ---- NaN in a multi-element checkpoint tensor ----------------------------------------------------

@pytest.mark.parametrize("position", [0, 17, -1])
def test_nan_anywhere_in_a_large_checkpoint_tensor_is_refused(world, tmp_path, capsys, position):
    folder = save_tiny_checkpoint(tmp_path / "ckpt", world / "tiny-bert")
    state = load_file(folder / rckpt.WEIGHTS)
    name = max(state, key=lambda k: state[k].numel())
    assert state[name].numel() > 100
    state[name].view(-1)[position] = float("nan")
    save_file(state, str(folder / rckpt.WEIGHTS))
    config = json.loads((folder / "config.json").read_text())
    config[rckpt.CHECKSUM] = rckpt.sha256((folder / rckpt.WEIGHTS).read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(rckpt.CheckpointError, match=f"{name} holds 1 NaN or infinite"):
        rckpt.load_head(folder)
    with pytest.raises(sckpt.CheckpointError, match="NaN|not finite|infinite"):
        sckpt.load_head(folder)
