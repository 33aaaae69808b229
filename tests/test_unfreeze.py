"""``--unfreeze-top K``: the encoder's top K layers trained with the head, scratch against the
reference.

The pieces (transformers' BertLayer through :mod:`reference.top_layers` and the scratch
:class:`~scratch.top_layers.TopLayers` against the encoder they come from; micro-batches), then
``fit`` of both pipelines step for step in float64 from the same weights with the same dropout
masks (tiny random BERTs, K = 1 and 2, and MiniLM's top layer), the feature entries for K,
both commands end to end (checkpoints predicted by the other side, ``--resume`` exact,
torchrun), and every bad input as one line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

from reference.model import GRUHead
from reference.pipeline import checkpoint as rckpt
from reference.pipeline import features as rfeatures
from reference.pipeline import predict as rpredict
from reference.pipeline import train as rtrain
from reference.pipeline.encoders import load_encoder
from reference.top_layers import TopGRUHead, TopLayers
from scratch.bert import BertEncoder, MPNetEncoder
from scratch.pipeline import checkpoint as sckpt
from scratch.pipeline import predict as spredict
from scratch.pipeline import train as strain
from scratch.pipeline import unfreeze
from scratch.pipeline.cli import run as run_command
from scratch.pipeline.encoder_names import Encoder
from scratch.pipeline.features import portable_key
from scratch.sentiment import SentimentHead
from scratch.top_layers import TopHead
from scratch.top_layers import TopLayers as ScratchTop
from tests.bert_fixtures import edit_config, minilm_torch, randomized
from tests.helpers import Cut, MemoryStore, assert_close, cut_after
from tests.imdb_fixtures import make_tree, minilm_path, review, save_tiny_encoder, tokenizer

HEAD = dict(hidden_dim=5, output_dim=1, n_layers=2, bidirectional=True, dropout=0.25)
F64 = 1e-9          # float64, 10 Adam steps: the worst seen was ~1e-12


def random_bert(seed: int, layers: int = 3, hidden: int = 16, dropout: float = 0.1,
                scale: float = 0.3) -> BertModel:
    """A float64 BertModel in eval mode, its parameters
    :func:`tests.bert_fixtures.randomized`, with the given dropout probabilities in its
    config."""
    cfg = BertConfig(vocab_size=200, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=24, max_position_embeddings=64,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return randomized(BertModel(cfg, add_pooling_layer=False).double().eval(), seed, scale)


def scratch_encoder(bert: BertModel, folder) -> BertEncoder:
    bert.save_pretrained(folder)
    return BertEncoder.from_pretrained(folder, dtype="float64")   # MPNet's gives MPNetEncoder


# ---- the pieces --------------------------------------------------------------------------

def test_the_layers_and_the_bottom_are_the_encoders(tmp_path):
    """Eval mode, float64: the bottom (scratch ``upto=``, the reference's truncated model) gives
    transformers' hidden states entering layer L-K, and both pipelines' top layers carry them
    on to the last hidden states, padding included, to rounding."""
    bert = random_bert(0)
    enc = scratch_encoder(bert, tmp_path / "enc")
    ids = torch.randint(1, 200, (3, 11), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([11, 6, 2])
    mask = (torch.arange(11)[None] < lengths[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        hs = bert(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool().numpy()
    for k in (1, 2, 3):
        bottom = enc(ids.numpy(), mask.numpy(), upto=3 - k)
        assert_close(bottom[keep], hs[3 - k].numpy()[keep], 1e-12, f"bottom K={k}")
        with rfeatures.bottom_layers(bert, 3 - k), torch.no_grad():
            truncated = bert(ids, attention_mask=mask)[0]
        assert_close(truncated.numpy()[keep], hs[3 - k].numpy()[keep], 1e-12, "truncated")
        assert len(bert.encoder.layer) == 3                   # put back
        with torch.no_grad():
            ref = TopLayers.from_bert(bert, k).eval()(hs[3 - k], lengths)
        mine = ScratchTop.from_encoder(enc, k, "float64")(hs[3 - k].numpy(), lengths.numpy())
        assert_close(ref.numpy()[keep], hs[3].numpy()[keep], 1e-12, f"reference K={k}")
        assert_close(mine[keep], hs[3].numpy()[keep], 1e-12, f"scratch K={k}")


def test_micro_batches_cover_the_batch_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = np.sort(rng.integers(1, 40, rng.integers(1, 30)))
        budget = int(rng.integers(40, 300))
        pieces = unfreeze.micro_batches(lengths, budget)
        np.testing.assert_array_equal(np.concatenate(pieces), np.arange(len(lengths)))
        assert all(len(p) * lengths[p].max() <= budget for p in pieces)
        # greedy: each piece stops only where the next review would break the budget
        for p, q in zip(pieces, pieces[1:], strict=False):
            assert (len(p) + 1) * max(lengths[p].max(), lengths[q[0]]) > budget
    assert [len(p) for p in unfreeze.micro_batches(np.array([50, 3]), 40)] == [1, 1]


def test_micro_batch_gradients_add_up_to_the_batchs(tmp_path):
    """Dropout off: the pieces' losses and gradients (each ``sum / N``) sum to the whole
    batch's, to rounding, so micro-batching changes no step."""
    enc = scratch_encoder(random_bert(2, dropout=0.0), tmp_path / "enc")
    rng = np.random.default_rng(3)
    lengths = np.array([2, 3, 5, 8, 9, 12])
    x = rng.standard_normal((6, 12, 16)) * (np.arange(12)[None, :, None] < lengths[:, None, None])
    y = np.array([0.0, 1, 1, 0, 1, 0])
    model = TopHead(ScratchTop.from_encoder(enc, 2, "float64"),
                    SentimentHead(16, **{**HEAD, "dropout": 0.0}, dtype="float64", seed=4))
    whole_loss, whole, _ = model.loss_and_grads(x, lengths, y)
    total, summed = 0.0, None
    for piece in unfreeze.micro_batches(lengths, 30):
        T = lengths[piece].max()
        loss, g, _ = model.loss_and_grads(x[piece, :T], lengths[piece], y[piece], batch_size=6)
        total += loss
        summed = g if summed is None else {n: summed[n] + g[n] for n in g}
    assert len(unfreeze.micro_batches(lengths, 30)) > 2
    assert total == pytest.approx(whole_loss, rel=1e-13)
    assert set(whole) == set(model.params) and any(n.startswith("encoder.layer.1.") for n in whole)
    for n in whole:
        assert_close(summed[n], whole[n], 1e-11, n, atol=1e-15)


# ---- fit, step for step ---------------------------------------------------------------------

Store = MemoryStore       # hidden states in memory: NumPy batches, or torch ones for the reference


def twin_models(bert: BertModel, enc: BertEncoder, k: int):
    """The reference's TopGRUHead (float64, head drawn by torch) and a scratch TopHead with
    the same weights."""
    torch.manual_seed(0)
    ref = TopGRUHead.from_bert(bert, k, emb_dim=bert.config.hidden_size, **HEAD).double()
    mine = TopHead(ScratchTop.from_encoder(enc, k, "float64", seed=5),
                   SentimentHead(bert.config.hidden_size, **HEAD, dtype="float64", seed=6))
    mine.load_state_dict({n: t.numpy() for n, t in ref.state_dict().items()})
    return ref, mine


def fit_both(tmp_path, ref, mine, feats, labels, n_train, batch_size, micro_tokens,
             encoder_lr=1e-3):
    """One epoch of each pipeline's fit (the reference applying scratch's dropout masks);
    returns the two histories and the masks used."""
    tr, va = np.arange(n_train), np.arange(n_train, len(feats))
    mine.tape = []
    kw = dict(epochs=1, batch_size=batch_size, seed=7, lr=1e-3, encoder_lr=encoder_lr,
              micro_tokens=micro_tokens, log=lambda *_: None)
    s_store, r_store = Store(feats), Store(feats, torch_batches=True)
    s_hist = strain.fit(mine, strain.Split(s_store, tr, labels[tr]),
                        strain.Split(s_store, va, labels[va]), tmp_path / "s", **kw)
    tape = mine.tape
    r_hist = rtrain.fit(ref, rtrain.Split(r_store, tr, labels[tr]),
                        rtrain.Split(r_store, va, labels[va]), tmp_path / "r",
                        masks=iter(tape), **kw)
    return s_hist, r_hist, tape


def assert_same_run(s_hist, r_hist, ref, mine, start):
    for r, s in zip(r_hist, s_hist, strict=True):
        for key in ("train_loss", "valid_loss"):
            assert abs(r[key] - s[key]) <= F64 * abs(r[key]), (key, r[key], s[key])
        assert (r["train_acc"], r["valid_acc"]) == (s["train_acc"], s["valid_acc"])
    weights = ref.state_dict()
    assert set(weights) == set(mine.params)
    moved = 0.0
    for name, w in weights.items():
        assert_close(mine.params[name], w.numpy(), F64, name)
        moved = max(moved, float(np.abs(w.numpy() - start[name]).max()))
    assert moved > 1e-3                                  # the run did change the weights


@pytest.mark.parametrize("k", [1, 2])
def test_ten_steps_equal_the_reference_with_the_same_masks(tmp_path, k):
    """float64, the same initial weights (head and the top K layers of a random 3-layer BERT),
    scratch's dropout masks applied by torch (layers at p = 0.1, head at 0.25): 40 reviews in
    batches of 4 (10 Adam steps, micro-batches of <= 20 padded tokens, so most batches run in
    pieces), then validation: losses, accuracies and every weight agree to 1e-9."""
    bert = random_bert(10 + k)
    enc = scratch_encoder(bert, tmp_path / "enc")
    ref, mine = twin_models(bert, enc, k)
    start = {n: p.copy() for n, p in mine.params.items()}
    rng = np.random.default_rng(k)
    feats = [rng.standard_normal((int(n), 16)) for n in rng.integers(1, 12, 52)]
    labels = rng.integers(0, 2, 52)
    s_hist, r_hist, tape = fit_both(tmp_path, ref, mine, feats, labels, 40, 4, 20)
    assert len(tape) > 10                               # 10 steps, some in several pieces
    dropped = [m["attention"] for t in tape for m in t["top"]]
    assert len(dropped) == k * len(tape) and any((m == 0).any() for m in dropped)
    assert_same_run(s_hist, r_hist, ref, mine, start)


def test_ten_steps_on_minilms_top_layer(tmp_path):
    """The same with MiniLM's last layer (pretrained, hidden 384, 12 heads) on real hidden
    states entering it (scratch's float64 bottom of 5 layers), reviews of 10-40 tokens."""
    bert = minilm_torch()
    enc = BertEncoder.from_pretrained(minilm_path(), dtype="float64")
    tok = tokenizer()
    texts = [review(i, i % 2 == 0) * (1 + i % 3) for i in range(26)]
    feats = []
    for t in texts:
        ids = np.array([tok(t)["input_ids"]])
        feats.append(enc(ids, upto=5)[0])
    labels = np.arange(26) % 2
    ref, mine = twin_models(bert, enc, 1)
    start = {n: p.copy() for n, p in mine.params.items()}
    s_hist, r_hist, tape = fit_both(tmp_path, ref, mine, feats, labels, 20, 2, 64)
    assert len(tape) >= 10
    assert_same_run(s_hist, r_hist, ref, mine, start)


# ---- the feature entries --------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic aclImdb, a 2-layer tiny BERT with dropout 0.1 and one without dropout."""
    root = tmp_path_factory.mktemp("unfreeze")
    make_tree(root, n_per_class=10)
    tok = tokenizer()
    for name, dropout, seed in (("tiny2", 0.1, 1), ("tiny2-nodrop", 0.0, 2)):
        torch.manual_seed(seed)
        BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, hidden_dropout_prob=dropout,
                             attention_probs_dropout_prob=dropout),
                  add_pooling_layer=False).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    save_tiny_encoder(root / "tiny-bert")
    return root


def test_entries_are_keyed_by_k_and_shared_by_both_pipelines(world, tmp_path):
    """K = 0 keys are the old ones; K = 1 gets its own entry, holding the hidden states
    entering layer 1 (transformers' hidden_states[1], to float16); scratch finds the entry the
    reference wrote, and one it computes itself holds the same numbers."""
    folder = world / "tiny2"
    enc = Encoder.inspect(str(folder))
    enc.load_tokenizer()
    texts = [review(i, i % 2 == 0) for i in range(9)]
    ids = enc.tokenizer.encode(texts, 32)
    assert portable_key(folder, 32, ids) == portable_key(folder, 32, ids, 0)
    assert portable_key(folder, 32, ids, 1) != portable_key(folder, 32, ids)
    ref_enc = load_encoder(str(folder))
    ref = rfeatures.extract_features(ref_enc, texts, tmp_path / "r", max_length=32,
                                     autocast=False, progress=False, unfreeze_top=1)
    last = rfeatures.extract_features(ref_enc, texts, tmp_path / "r", max_length=32,
                                      autocast=False, progress=False)
    assert ref.folder != last.folder
    assert (ref.meta["unfreeze_top"], ref.meta["input_layer"]) == (1, 1)
    assert "unfreeze_top" not in last.meta
    found = strain.features(enc, texts, tmp_path / "r", 32, False, unfreeze_top=1)
    assert found.folder == ref.folder
    mine = strain.features(enc, texts, tmp_path / "s", 32, False, unfreeze_top=1)
    assert mine.folder.name.startswith("scratch-") and mine.meta["input_layer"] == 1
    with torch.no_grad():
        for i, a in enumerate(ids):
            t = torch.tensor(np.asarray(a, dtype=np.int64))[None]
            h1 = ref_enc.model(t, output_hidden_states=True).hidden_states[1][0].numpy()
            for store in (ref, mine):
                got = store.get(i).astype(np.float64)
                assert np.max(np.abs(got - h1) / np.maximum(np.abs(h1), 1.0)) <= 2 * 2.0 ** -11


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_an_entry_for_k_is_computed_from_a_deeper_one(tmp_path, monkeypatch, family):
    """With the K = 2 entry of these reviews cached, the K = 1 entry runs only the one layer
    between (the encoder's bottom is never called): an entry of its own that says where it
    came from, holding transformers' hidden states entering layer L-1 (MPNet's relative
    position bias included) to float16 twice (the deeper entry's rounding carried through one
    layer, then its own), which scratch's K = 1 runs read too."""
    from tests.test_encoders import mpnet_tokenizer

    folder = tmp_path / f"tiny-{family}"
    torch.manual_seed(5)
    small = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                 intermediate_size=32)
    if family == "bert":
        BertModel(BertConfig(**small), add_pooling_layer=False).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
    else:
        model = MPNetModel(MPNetConfig(vocab_size=30_527, max_position_embeddings=514, **small),
                           add_pooling_layer=False)
        with torch.no_grad():         # a bias table that matters (its init, std 0.02, hardly does)
            model.encoder.relative_attention_bias.weight.normal_(0.0, 2.0)
        model.save_pretrained(folder)
        mpnet_tokenizer(folder).save_pretrained(folder)
    texts = [review(i, i % 2 == 0) * (1 + i % 3) for i in range(9)]     # 9 lengths, padded
    enc = load_encoder(str(folder))
    two = rfeatures.extract_features(enc, texts, tmp_path / "c", max_length=40, autocast=False,
                                     progress=False, unfreeze_top=2, batch_tokens=120)

    def bottom_called(*a, **kw):
        raise AssertionError("the encoder's bottom ran")

    monkeypatch.setattr(rfeatures, "_encode", bottom_called)
    one = rfeatures.extract_features(enc, texts, tmp_path / "c", max_length=40, autocast=False,
                                     progress=False, unfreeze_top=1, batch_tokens=120)
    assert one.meta["computed_from"] == {"unfreeze_top": 2, "entry": two.folder.name}
    assert (one.meta["unfreeze_top"], one.meta["input_layer"]) == (1, 2)
    def deeper_opened(*a, **kw):
        raise AssertionError("the K = 2 entry was opened again")

    monkeypatch.setattr(rfeatures, "deeper_entry", deeper_opened)      # found by its own key
    again = rfeatures.extract_features(enc, texts, tmp_path / "c", max_length=40,
                                       autocast=False, progress=False, unfreeze_top=1)
    assert again.folder == one.folder and len(list((tmp_path / "c").iterdir())) == 2
    ids = enc.tokenizer(texts, truncation=True, max_length=40)["input_ids"]
    worst = 0.0
    with torch.no_grad():
        for i, a in enumerate(ids):
            h2 = enc.model(torch.tensor([a]), output_hidden_states=True).hidden_states[2][0]
            got = one.get(i).astype(np.float64)
            assert got.shape == tuple(h2.shape)
            worst = max(worst, float(np.max(np.abs(got - h2.numpy()) /
                                            np.maximum(np.abs(h2.numpy()), 1.0))))
    # one float16 rounding is 2^-11 relative; the deeper entry's, carried through a layer whose
    # LayerNorm divides by a standard deviation of order 1, adds about as much
    assert worst <= 4 * 2.0 ** -11, worst
    sc = Encoder.inspect(str(folder))
    sc.load_tokenizer()
    found = strain.features(sc, texts, tmp_path / "c", 40, False, unfreeze_top=1)
    assert found.folder == one.folder


def test_a_run_waits_for_a_deeper_entry_another_process_is_writing(tmp_path, monkeypatch):
    """A K = 1 run started while the K = 2 entry of its reviews is still being written (the
    features command in the background) waits for that writer, then computes its entry from
    the finished K = 2 one: the encoder's bottom never runs, and the wait is counted."""
    import threading
    import time

    from scratch.pipeline import features as sfeatures

    folder = tmp_path / "tiny"
    torch.manual_seed(6)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    texts = [review(i, i % 2 == 0) for i in range(5)]
    enc = load_encoder(str(folder))
    two = rfeatures.extract_features(enc, texts, tmp_path / "c", max_length=40, autocast=False,
                                     progress=False, unfreeze_top=2)
    index = two.folder / "index.json"
    index.rename(two.folder / "index.json.later")     # the K = 2 entry, not finished yet ...
    locked, release = threading.Event(), threading.Event()

    def writer():                                      # ... and its writer at work
        with sfeatures.writer_lock(two.folder):
            locked.set()
            release.wait(10)
            (two.folder / "index.json.later").rename(index)

    thread = threading.Thread(target=writer)
    thread.start()
    locked.wait(10)
    assert sfeatures.being_written(two.folder)
    threading.Timer(1.0, release.set).start()

    def bottom_called(*a, **kw):
        raise AssertionError("the encoder's bottom ran")

    monkeypatch.setattr(rfeatures, "_encode", bottom_called)
    t0 = time.perf_counter()
    one = rfeatures.extract_features(enc, texts, tmp_path / "c", max_length=40, autocast=False,
                                     progress=False, unfreeze_top=1)
    thread.join()
    assert one.meta["computed_from"] == {"unfreeze_top": 2, "entry": two.folder.name}
    assert 0.5 <= one.wait_seconds <= time.perf_counter() - t0
    assert not sfeatures.being_written(two.folder)


@pytest.mark.imdb
def test_the_derived_entry_bench_runs_on_real_reviews(imdb_path, capsys):
    """bench/unfreeze_derived_entry.py with the packaged MiniLM on 8 real reviews: the K = 1
    entry from K = 2's within a few float16 steps of the direct one; the CPU times printed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "unfreeze_derived_entry", Path(__file__).resolve().parents[1] / "bench" /
        "unfreeze_derived_entry.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--data", str(imdb_path), "--encoder", "minilm", "--reviews", "8",
                       "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"max \|difference\| (\S+) .* one float16 step there: (\S+)\)", out)
    assert m and float(m[1]) <= 4 * float(m[2]), out
    assert re.search(r"CPU seconds: K=2 \S+, K=1 from K=2 \S+, K=1 direct \S+; from K = 2 / "
                     r"direct: \S+", out), out           # times are printed, not asserted


def test_the_features_command_writes_the_entries_a_k_run_reads(world, tmp_path, capsys):
    """``reference.pipeline.features --unfreeze-top 1`` caches what a K = 1 run reads: the run
    then adds no entry (every split found); K past the encoder's layers is one line."""
    cache = tmp_path / "cache"
    common = ["--data", str(world / "aclImdb"), "--encoder", str(world / "tiny2"),
              "--max-length", "32", "--cache", str(cache), "--no-progress", "--device", "cpu"]
    assert rfeatures.main([*common, "--unfreeze-top", "1"]) == 0
    entries = sorted(p.name for p in cache.iterdir())
    metas = [json.loads((cache / e / "index.json").read_text()) for e in entries]
    assert entries and all(m["input_layer"] == 1 for m in metas)   # (the tiny tree's train
    # and test reviews are the same texts: one entry serves both)
    assert rtrain.main(ref_argv(world, tmp_path / "r", cache, "--unfreeze-top", "1",
                                epochs=1)) == 0
    assert sorted(p.name for p in cache.iterdir()) == entries
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        rfeatures.main([*common, "--unfreeze-top", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--unfreeze-top 3 is more than the encoder's 2 layers" in err, err


# ---- the commands ---------------------------------------------------------------------------

def argv(world, out, cache, *extra, encoder="tiny2", epochs=2):
    return ["--data", str(world / "aclImdb"), "--encoder", str(world / encoder), "--out",
            str(out), "--cache", str(cache), "--max-length", "32", "--epochs", str(epochs),
            "--batch-size", "4", "--no-progress", "--hidden-dim", "8", *extra]


def ref_argv(*args, **kw):
    return [*argv(*args, **kw), "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """K = 1 checkpoints of both commands (layers at --encoder-lr 0.01, so that they move)."""
    root = tmp_path_factory.mktemp("trained")
    extra = ("--unfreeze-top", "1", "--encoder-lr", "0.01", "--micro-batch-tokens", "40")
    assert strain.main(argv(world, root / "s", root / "cache", *extra)) == 0
    assert rtrain.main(ref_argv(world, root / "r", root / "cache", *extra)) == 0
    return root


TEXTS = ["great wonderful superb", "awful boring dull terrible waste", "A fine film. " * 9,
         "x"]


def scores(side, folder):
    if side == "scratch":
        enc, tok, head, config = spredict.load_model(folder, "float64")
        return np.array(spredict.predict_batch(enc, tok, head, TEXTS, config["max_length"], 3))
    model, tok, config = rpredict.load_model(folder)
    return np.array(rpredict.predict_batch(model, tok, TEXTS, config["max_length"], 2))


@pytest.mark.parametrize("trainer", ["s", "r"])
def test_a_checkpoint_is_predicted_alike_by_both_pipelines(trained, trainer):
    """Whoever trained it: the checkpoint holds the trained layer beside the head (checked
    like the head), and both predict commands score with the frozen bottom plus that layer,
    to 1e-5; the untrained layer would give other scores."""
    folder = trained / trainer
    config = json.loads((folder / "config.json").read_text())
    assert (config["unfreeze_top"], config["encoder_lr"]) == (1, 0.01)
    head, layers, _ = sckpt.load_checkpoint(folder, "float64", require_checksum=True)
    assert sorted(layers) == [1]
    mine, ref = scores("scratch", folder), scores("reference", folder)
    np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)
    enc = Encoder.inspect(config["encoder_source"])
    untrained = spredict.predict_batch(enc.load_bert("float64"), enc.load_tokenizer(), head,
                                       TEXTS, 32, 3)
    assert np.abs(np.array(untrained) - mine).max() > 1e-3
    m = json.loads((folder / "metrics.json").read_text())
    assert len(m["epochs"]) == 2 and 0 <= m["test_acc"] <= 1
    if trainer == "r":                                 # the K = 1 entries it read, by name
        entries = {split: json.loads((Path(f) / "index.json").read_text())
                   for split, f in m["feature_entries"].items()}
        assert sorted(entries) == ["test", "train"]
        assert all(e["unfreeze_top"] == 1 for e in entries.values())


def test_the_full_run_summary_gathers_a_run(trained, tmp_path, capsys):
    """bench/unfreeze_full_summary.py on a K = 1 run folder: its test result, epochs, the two
    entries it read (sizes, tokens), the peak memory watched beside it, and the frozen row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "unfreeze_full_summary", Path(__file__).resolve().parents[1] / "bench" /
        "unfreeze_full_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    run = trained / "r"
    m = json.loads((run / "metrics.json").read_text())
    watched = {trained / "r.memory.json": {"RssAnon_peak_gib": 1.5, "VmHWM_peak_gib": 2.0},
               trained / "r.memory.resumed.json": {"RssAnon_peak_gib": 1.0,
                                                   "VmHWM_peak_gib": 2.5}}
    for f, peak in watched.items():                     # two processes of one resumed run
        f.write_text(json.dumps(peak))
    earlier = {"unfreeze_top": 2, "test_acc": 0.5, "epochs": []}    # its folder is gone
    stale = {"unfreeze_top": 1, "test_acc": 0.25, "epochs": []}     # gathered again below
    (tmp_path / "s.json").write_text(json.dumps({"runs": [stale, earlier]}))
    try:
        assert summary.main(["--runs", str(run), str(tmp_path / "absent"),
                             "--out", str(tmp_path / "s.json")]) == 0
    finally:
        for f in watched:
            f.unlink()
    out = json.loads((tmp_path / "s.json").read_text())
    r, kept = out["runs"]
    assert kept == earlier
    assert (r["unfreeze_top"], r["test_acc"], r["best_epoch"]) == (1, m["test_acc"],
                                                                   m["best_epoch"])
    assert [e["valid_loss"] for e in r["epochs"]] == [e["valid_loss"] for e in m["epochs"]]
    assert sorted(r["entries"]) == ["test", "train"]
    layers = json.loads((Path(m["config"]["encoder_source"]) / "config.json").read_text())[
        "num_hidden_layers"]
    assert all(e["gib"] >= 0 and e["tokens"] > 0 and e["input_layer"] == layers - 1
               for e in r["entries"].values())
    assert r["peak_memory_gib"] == {"anonymous": 1.5, "resident": 2.5}
    assert out["frozen"]["unfreeze_top"] == 0 and len(out["frozen"]["epochs"]) == 2
    printed = capsys.readouterr().out
    assert "K = 1: 2 epochs, test" in printed and "K = 2: 0 epochs, test 50.00% (kept" in printed


@pytest.mark.parametrize("side", ["scratch", "reference"])
def test_the_head_alone_refuses_a_checkpoint_with_layers(trained, side):
    load = sckpt.load_head if side == "scratch" else rckpt.load_head
    with pytest.raises(sckpt.CheckpointError, match="holds the 1 encoder layers trained"):
        load(trained / ("s" if side == "scratch" else "r"))


def drop_key_bias(folder):
    from safetensors.numpy import load_file, save

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layer.1.attention.self.key.bias"]
    data = save(tensors)
    (folder / "model.safetensors").write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config,
                                                    "weights_sha256": sckpt.sha256(data)}))


def claim_two_layers(folder):
    edit_config(folder, unfreeze_top=2)


@pytest.mark.parametrize("side", ["scratch", "reference"])
@pytest.mark.parametrize("damage, pattern", [
    (drop_key_bias, r"encoder layer 1: tensors \['attention.self.key.bias'\] missing"),
    (claim_two_layers, r"encoder layers \[1\] for unfreeze_top 2 in config.json"),
], ids=["a layer tensor missing", "unfreeze_top says 2"])
def test_predict_refuses_a_checkpoint_whose_layers_do_not_fit(trained, tmp_path, capsys, side,
                                                               damage, pattern):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(trained / "s", folder)
    damage(folder)
    main = spredict.main if side == "scratch" else rpredict.main
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(folder), "a fine film"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("side", ["scratch", "reference"])
def test_resume_is_exact_with_trained_layers(world, tmp_path, side):
    """One epoch, then --resume to two: the weights (head and layer) and the losses are those
    of two epochs at once, bit for bit (dropout on in the layer and the head)."""
    main, args = ((strain.main, argv) if side == "scratch" else (rtrain.main, ref_argv))
    extra = ("--unfreeze-top", "1", "--micro-batch-tokens", "40")
    assert main(args(world, tmp_path / "whole", tmp_path / "cache", *extra)) == 0
    assert main(args(world, tmp_path / "parts", tmp_path / "cache", *extra, epochs=1)) == 0
    assert main(args(world, tmp_path / "parts", tmp_path / "cache", *extra, "--resume")) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "parts"))
    assert [r["train_loss"] for r in a["epochs"]] == [r["train_loss"] for r in b["epochs"]]
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "parts" / "model.safetensors").read_bytes()



@pytest.mark.parametrize("side", ["scratch", "reference"])
def test_a_k1_run_cut_mid_epoch_resumes_exactly(world, tmp_path, monkeypatch, capsys, side):
    """--save-every 3 (4 batches an epoch): the command killed right after it saved batch 3 of
    epoch 1, run again with --resume, ends with the uninterrupted run's checkpoint, bit for bit
    (the trained layer, the head, the losses), and says where it went on from."""
    main, args, ckpt_module = ((strain.main, argv, sckpt) if side == "scratch"
                               else (rtrain.main, ref_argv, rckpt))
    extra = ("--unfreeze-top", "1", "--micro-batch-tokens", "40", "--save-every", "3")
    assert main(args(world, tmp_path / "whole", tmp_path / "cache", *extra)) == 0
    with monkeypatch.context() as m:
        cut_after(m, ckpt_module, 1, 3)
        with pytest.raises(Cut):
            main(args(world, tmp_path / "parts", tmp_path / "cache", *extra))
    assert not (tmp_path / "parts" / "model.safetensors").exists()   # no epoch finished
    capsys.readouterr()
    assert main(args(world, tmp_path / "parts", tmp_path / "cache", *extra, "--resume")) == 0
    assert "resuming after epoch 0 and batch 3 of epoch 1" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "parts"))
    assert [r["train_loss"] for r in a["epochs"]] == [r["train_loss"] for r in b["epochs"]]
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "parts" / "model.safetensors").read_bytes()


# ---- bad input: one line, nonzero exit --------------------------------------------------------

BAD = [
    (("--unfreeze-top", "3"), r"--unfreeze-top 3 is more than the encoder's 2 layers"),
    (("--encoder-lr", "1e-4"), r"--encoder-lr needs --unfreeze-top K > 0"),
    (("--unfreeze-top", "1", "--micro-batch-tokens", "16"),
     r"--micro-batch-tokens must be >= --max-length \(32\)"),
    (("--unfreeze-top", "-1"), r"argument --unfreeze-top: must be >= 0, got -1"),
]


@pytest.mark.parametrize("side", ["scratch", "reference"])
@pytest.mark.parametrize("extra, pattern", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_options_are_one_line(world, tmp_path, capsys, side, extra, pattern):
    main, args = ((strain.main, argv) if side == "scratch" else (rtrain.main, ref_argv))
    with pytest.raises(SystemExit) as e:
        main(args(world, tmp_path / "out", tmp_path / "cache", *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("side", ["scratch", "reference"])
def test_resume_with_another_k_is_one_line(world, tmp_path, capsys, side):
    main, args = ((strain.main, argv) if side == "scratch" else (rtrain.main, ref_argv))
    assert main(args(world, tmp_path / "out", tmp_path / "cache", "--unfreeze-top", "1",
                     epochs=1)) == 0
    capsys.readouterr()
    for extra, what in ((("--resume",), "unfreeze_top=1"),
                        (("--resume", "--unfreeze-top", "2"), "unfreeze_top=1"),
                        (("--resume", "--unfreeze-top", "1", "--encoder-lr", "1e-3"),
                         "encoder_lr=2e-05")):
        with pytest.raises(SystemExit) as e:
            main(args(world, tmp_path / "out", tmp_path / "cache", *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert "was trained with different" in err and what in err, err


@pytest.mark.parametrize("side", ["scratch", "reference"])
def test_an_entry_made_for_another_k_is_refused(world, tmp_path, capsys, side):
    """An entry whose index.json says it holds the input of another layer (made for another
    K) is never read as this K's: one line naming it, exit status 1, nothing trained."""
    main, args = ((strain.main, argv) if side == "scratch" else (rtrain.main, ref_argv))
    prog = f"python -m {side}.pipeline.train"
    k1 = ("--unfreeze-top", "1")
    assert run_command(lambda: main(args(world, tmp_path / "a", tmp_path / "cache", *k1,
                                         epochs=1)), prog) == 0
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    meta = json.loads((entry / "index.json").read_text())
    (entry / "index.json").write_text(json.dumps({**meta, "unfreeze_top": 2, "input_layer": 0}))
    capsys.readouterr()
    assert run_command(lambda: main(args(world, tmp_path / "b", tmp_path / "cache", *k1)),
                       prog) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: feature cache entry "), err
    assert "was made for --unfreeze-top 2" in err[0] and "needs --unfreeze-top 1" in err[0]
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_init_with_layers_of_another_run_is_one_line(world, trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        strain.main(argv(world, tmp_path / "out", tmp_path / "cache", "--init",
                         str(trained / "r")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "holds trained encoder layers [1], this run trains none" in err, err


# ---- torchrun ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_trains_the_layers_as_one_process(world, tmp_path):
    """2 ranks (gloo), K = 1, no dropout anywhere, global batch 4 of 17 train reviews (rank 1's
    slice of the last batch is empty), micro-batches of <= 40 tokens within each slice: one
    epoch, then --resume to two.  The layer's gradients are all-reduced with the head's, so
    the losses, accuracies, test numbers and weights (layer and head) are the one-process
    run's up to float32 rounding."""
    from tests.test_distributed import one_process, strip_times, torchrun, write_tree

    data = write_tree(tmp_path / "data")
    args = ["--data", str(data), "--encoder", str(world / "tiny2-nodrop"), "--max-length", "32",
            "--device", "cpu", "--no-progress", "--batch-size", "4", "--hidden-dim", "8",
            "--dropout", "0", "--lr", "0.01", "--unfreeze-top", "1", "--encoder-lr", "0.01",
            "--micro-batch-tokens", "40"]
    two = tmp_path / "two"
    for epochs, extra in ((1, []), (2, ["--resume"])):
        done = torchrun("reference.pipeline.train",
                        [*args, "--cache", str(tmp_path / "cache"), "--out", str(two),
                         "--epochs", str(epochs), *extra, "--dist-timeout", "120"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(f"epoch {epochs}: train loss") == 1
    one_process(rtrain.main, [*args, "--cache", str(tmp_path / "cache1"), "--out",
                              str(tmp_path / "one"), "--epochs", "2"])
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (m2["processes"], m2["n_train"], m2["n_valid"]) == (2, 17, 7)
    for a, b in zip(strip_times(m1["epochs"]), strip_times(m2["epochs"]), strict=True):
        assert (a["best"], a["train_acc"], a["valid_acc"]) == \
            (b["best"], b["train_acc"], b["valid_acc"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-5)
    assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-5)
    assert len(rckpt.load_state(two)["rng_ranks"]) == 2
    (w1, l1), (w2, l2) = ((lambda h, layers, _: (h.state_dict(), layers[1]))(
        *rckpt.load_parts(tmp_path / d)) for d in ("one", "two"))
    pretrained = BertModel.from_pretrained(world / "tiny2-nodrop").encoder.layer[1].state_dict()
    assert max(float((l1[k] - pretrained[k]).abs().max()) for k in l1) > 1e-3   # it trained
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    for k in l1:
        # d b_k is 0 in exact arithmetic (see scratch.encoder_layer): Adam turns its rounding
        # noise, which differs with the batch shapes, into steps of its own (~1e-5 here)
        atol = 1e-4 if k == "attention.self.key.bias" else 1e-5
        torch.testing.assert_close(l2[k], l1[k], rtol=1e-4, atol=atol)


def test_init_gives_the_head_and_the_layers_their_starting_weights(world, trained, tmp_path):
    """--init with K = 1: a head-only checkpoint starts the head there and the layer at the
    encoder's weights; a checkpoint with the trained layer starts both there.  (0 epochs of
    training cannot be asked for: one epoch at lr ~0 shows the start.)"""
    from safetensors.numpy import load_file

    tiny = 1e-30
    model = dict(emb_dim=16, hidden_dim=8, output_dim=1, n_layers=2, bidirectional=True,
                 dropout=0.25)
    torch.manual_seed(3)
    rckpt.save_weights(tmp_path / "init", GRUHead(**model), {"encoder": "tiny2", "model": model})
    pretrained = BertModel.from_pretrained(world / "tiny2").encoder.layer[1].state_dict()
    for init, layer_from in ((tmp_path / "init", "encoder"), (trained / "r", "init")):
        out = tmp_path / f"from-{layer_from}"
        assert strain.main(argv(world, out, tmp_path / "cache", "--unfreeze-top", "1",
                                "--init", str(init), "--lr", str(tiny), "--encoder-lr",
                                str(tiny), "--dtype", "float64", epochs=1)) == 0
        got, start = load_file(str(out / "model.safetensors")), load_file(
            str(init / "model.safetensors"))
        for name in ("rnn.weight_ih_l0", "out.weight"):
            np.testing.assert_allclose(got[name], start[name], rtol=1e-6, atol=1e-7)
        for name in ("attention.self.query.weight", "output.LayerNorm.bias"):
            want = (pretrained[name].numpy() if layer_from == "encoder"
                    else start[f"encoder.layer.1.{name}"])
            np.testing.assert_allclose(got[f"encoder.layer.1.{name}"], want, rtol=1e-6,
                                       atol=1e-7)


# ---- MPNet: its layers carry the relative position bias (frozen) ------------------------------

def random_mpnet(seed: int, layers: int = 3, hidden: int = 16, dropout: float = 0.1,
                 scale: float = 0.3) -> MPNetModel:
    """A float64 MPNetModel drawn as :func:`random_bert` draws a BertModel, the relative
    position table included."""
    cfg = MPNetConfig(vocab_size=200, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, intermediate_size=24, max_position_embeddings=80,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return randomized(MPNetModel(cfg, add_pooling_layer=False).double().eval(), seed,
                      scale)


def test_mpnet_top_layers_carry_the_position_bias_as_the_encoder(tmp_path):
    """Eval mode, float64, a random 3-layer MPNet (reviews up to 40 tokens: buckets past the
    exact ones): the bottom gives transformers' hidden states entering layer L-K, both
    pipelines' top layers (relative position bias included) carry them on to the last hidden
    states, padding included; without the bias they would not."""
    mpnet = random_mpnet(0)
    enc = scratch_encoder(mpnet, tmp_path / "enc")
    assert isinstance(enc, MPNetEncoder)
    T = 40
    lengths = torch.tensor([40, 23, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 200, (3, T), generator=torch.Generator().manual_seed(1))
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))           # MPNet's pad id, 1
    with torch.no_grad():
        hs = mpnet(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool().numpy()
    for k in (1, 2, 3):
        bottom = enc(ids.numpy(), mask.numpy(), upto=3 - k)
        assert_close(bottom[keep], hs[3 - k].numpy()[keep], 1e-12, f"bottom K={k}")
        with torch.no_grad():
            ref = TopLayers.from_bert(mpnet, k).eval()(hs[3 - k], lengths)
        mine = ScratchTop.from_encoder(enc, k, "float64")
        assert mine.model_type == "mpnet" and mine.position_table is not None
        got = mine(hs[3 - k].numpy(), lengths.numpy())
        assert_close(ref.numpy()[keep], hs[3].numpy()[keep], 1e-12, f"reference K={k}")
        assert_close(got[keep], hs[3].numpy()[keep], 1e-12, f"scratch K={k}")
    mine.position_table[...] = 0.0                                      # no bias: not MPNet
    assert np.abs(mine(hs[2].numpy(), lengths.numpy())[keep] - hs[3].numpy()[keep]).max() > 1e-3


@pytest.mark.parametrize("k", [1, 2])
def test_ten_steps_on_an_mpnet_equal_the_reference(tmp_path, k):
    """As for BERT: float64, the same initial weights (head and the top K layers of a random
    3-layer MPNet), scratch's dropout masks applied by torch, reviews of 1-30 tokens in batches
    of 4 (micro-batches of <= 60 padded tokens): losses, accuracies and every weight agree to
    1e-9; the layers' names are MPNet's and its position table is nobody's parameter."""
    mpnet = random_mpnet(20 + k)
    enc = scratch_encoder(mpnet, tmp_path / "enc")
    ref, mine = twin_models(mpnet, enc, k)
    assert "encoder.layer.2.attention.attn.q.weight" in mine.params
    assert not any("relative_attention_bias" in n for n in ref.state_dict())
    start = {n: p.copy() for n, p in mine.params.items()}
    rng = np.random.default_rng(k)
    feats = [rng.standard_normal((int(n), 16)) for n in rng.integers(1, 31, 52)]
    labels = rng.integers(0, 2, 52)
    table = ref.encoder.table.clone()
    s_hist, r_hist, tape = fit_both(tmp_path, ref, mine, feats, labels, 40, 4, 60)
    assert len(tape) > 10
    assert any((m["attention"] == 0).any() for t in tape for m in t["top"])
    assert_same_run(s_hist, r_hist, ref, mine, start)
    assert torch.equal(ref.encoder.table, table)                        # frozen
    np.testing.assert_array_equal(mine.top.position_table, table.numpy())


@pytest.fixture(scope="module")
def mpnet_trained(world, tmp_path_factory):
    """A tiny random MPNet folder (hidden 16, dropout 0.1, MPNet's tokenizer) and K = 1
    checkpoints of both commands on it."""
    from tests.test_encoders import mpnet_tokenizer

    root = tmp_path_factory.mktemp("mpnet-trained")
    folder = root / "tiny-mpnet"
    torch.manual_seed(3)
    MPNetModel(MPNetConfig(vocab_size=30_527, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=514),
               add_pooling_layer=False).save_pretrained(folder)
    mpnet_tokenizer(folder).save_pretrained(folder)
    extra = ("--unfreeze-top", "1", "--encoder-lr", "0.01", "--micro-batch-tokens", "40")
    assert strain.main(argv(world, root / "s", root / "cache", *extra, encoder=folder)) == 0
    assert rtrain.main(ref_argv(world, root / "r", root / "cache", *extra, encoder=folder)) == 0
    return root, folder


@pytest.mark.parametrize("trainer", ["s", "r"])
def test_an_mpnet_checkpoint_is_predicted_alike_by_both_pipelines(mpnet_trained, trainer):
    """K = 1 on an MPNet, whoever trained it: the checkpoint's layer has MPNetModel's names
    (it loads back into the transformers encoder by name), both predict commands score with
    the frozen bottom plus that layer to 1e-5, and the untrained layer would score otherwise."""
    root, folder = mpnet_trained
    ckpt = root / trainer
    head, layers, config = sckpt.load_checkpoint(ckpt, "float64", require_checksum=True)
    assert config["unfreeze_top"] == 1 and sorted(layers) == [1]
    assert "attention.attn.q.weight" in layers[1]
    MPNetModel.from_pretrained(folder).encoder.layer[1].load_state_dict(
        {n: torch.as_tensor(np.asarray(t, dtype=np.float32)) for n, t in layers[1].items()})
    mine, ref = scores("scratch", ckpt), scores("reference", ckpt)
    np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)
    enc = Encoder.inspect(str(folder))
    untrained = spredict.predict_batch(enc.load_bert("float64"), enc.load_tokenizer(), head,
                                       TEXTS, 32, 3)
    assert np.abs(np.array(untrained) - mine).max() > 1e-4
