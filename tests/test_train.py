"""reference.pipeline.train, reference.pipeline.checkpoint, reference.pipeline.predict: the loop's
arithmetic, determinism, resume, checkpoints written atomically and loaded safely, CLI errors,
and one tiny CLI run (a synthetic aclImdb folder and a tiny random BERT with the real
uncased vocabulary)."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from reference.model import BERTGRUSentiment, GRUHead
from reference.pipeline import checkpoint as ckpt
from reference.pipeline import predict, train
from reference.pipeline.train import Split, fit, run_epoch
from tests.helpers import Cut, cut_after


class MemoryStore:
    """An in-memory stand-in for reference.pipeline.features.FeatureStore."""

    def __init__(self, feats):
        self.feats = feats
        self.lengths = np.array([len(f) for f in feats], dtype=np.int64)
        self.hidden_size = feats[0].shape[1]

    def __len__(self):
        return len(self.feats)

    def batch(self, indices):
        L = self.lengths[indices]
        x = torch.zeros(len(indices), int(L.max()), self.hidden_size)
        for b, i in enumerate(indices):
            x[b, :L[b]] = self.feats[i]
        return x, torch.from_numpy(L)


def toy_data(n=60, E=4, seed=0):
    """Reviews whose label is whether feature 0 averages above 0: learnable by the head."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for i in range(n):
        y = i % 2
        f = torch.randn(int(torch.randint(2, 12, (1,), generator=g)), E, generator=g)
        f[:, 0] += 1.0 if y else -1.0
        feats.append(f)
        labels.append(y)
    return MemoryStore(feats), np.array(labels)


def splits(store, labels, n_valid=20):
    idx = np.arange(len(labels))
    return (Split(store, idx[n_valid:], labels[n_valid:]),
            Split(store, idx[:n_valid], labels[:n_valid]))


def new_head(seed=0, E=4):
    torch.manual_seed(seed)
    return GRUHead(E, 3, 1, 2, True, 0.25)


def strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in history]


# --- the loop's arithmetic -----------------------------------------------------------------------

def test_run_epoch_means_are_over_examples_not_batches():
    store, labels = toy_data(10)
    head = new_head().eval()
    split = Split(store, np.arange(10), labels)
    loss, acc = run_epoch(head, split, batch_size=4)        # batches of 4, 4, 2
    with torch.no_grad():                                   # one review at a time, no padding
        z = torch.cat([head.out(torch.cat(head.rnn(f[None])[1][-2:].unbind(0), 1))
                       for f in store.feats]).squeeze(1)
    y = torch.tensor(labels, dtype=torch.float32)
    ref_loss = nn.functional.binary_cross_entropy_with_logits(z, y).item()
    ref_acc = (torch.round(torch.sigmoid(z)) == y).float().mean().item()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert acc == pytest.approx(ref_acc)


def test_fit_learns_saves_best_and_is_deterministic(tmp_path):
    store, labels = toy_data()
    tr, va = splits(store, labels)
    config = {"model": dict(emb_dim=4, hidden_dim=3, output_dim=1, n_layers=2,
                            bidirectional=True, dropout=0.25)}
    h1 = fit(new_head(), tr, va, tmp_path / "a", epochs=6, batch_size=8, seed=1, lr=1e-2,
             config=config, log=str)
    h2 = fit(new_head(), tr, va, tmp_path / "b", epochs=6, batch_size=8, seed=1, lr=1e-2,
             config=config, log=str)
    assert strip_times(h1) == strip_times(h2)
    assert ((tmp_path / "a" / ckpt.WEIGHTS).read_bytes()
            == (tmp_path / "b" / ckpt.WEIGHTS).read_bytes())
    assert h1[-1]["valid_acc"] >= 0.9 and h1[-1]["train_loss"] < h1[0]["train_loss"]
    # the saved weights are the best validation epoch's: re-evaluating them gives its loss
    best, _ = ckpt.load_head(tmp_path / "a")
    assert run_epoch(best, va, 8)[0] == pytest.approx(min(r["valid_loss"] for r in h1), rel=1e-6)
    assert [r["best"] for r in h1] == [r["valid_loss"] == min(x["valid_loss"] for x in h1[:i + 1])
                                       for i, r in enumerate(h1)]
    assert not list((tmp_path / "a").glob(".*tmp*"))        # atomic writes leave no temp files


def test_fit_trains_with_denormals_flushed_and_restores_the_setting(tmp_path, monkeypatch):
    """The long-review backward underflows into denormals (slow on x86): fit flushes them while
    it trains and evaluates, and leaves the process as it found it, even when it fails."""
    seen = []

    def probe(*args, **kwargs):
        seen.append(train.denormals_flushed())
        return 0.5, 0.5

    monkeypatch.setattr(train, "run_epoch", probe)
    store, labels = toy_data()
    tr, va = splits(store, labels)
    tiny = torch.finfo(torch.float32).tiny
    assert not train.denormals_flushed() and float(torch.tensor([tiny / 4]) * 1.0) > 0
    fit(new_head(), tr, va, tmp_path, epochs=2, batch_size=8, log=str)
    assert seen == [True, True, True, True]                 # train and valid, two epochs
    assert not train.denormals_flushed()

    def fail(*args, **kwargs):
        assert train.denormals_flushed()
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_epoch", fail)
    with pytest.raises(KeyboardInterrupt):
        fit(new_head(), tr, va, tmp_path / "b", epochs=1, batch_size=8, log=str)
    assert not train.denormals_flushed()


def test_flush_denormals_reaches_every_intra_op_thread():
    """torch.set_flush_denormal sets only the calling thread: with 2 intra-op threads already
    started, half of a large element-wise product (computed by both) used to stay denormal
    inside the block.  flush_denormals flushes on both threads, and restores both after."""
    tiny = torch.finfo(torch.float32).tiny

    def denormal_results():
        r = torch.full((4_000_000,), 1e-30) * 1e-10                  # 1e-40: denormal
        return int(((r != 0) & (r.abs() < tiny)).sum())

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert denormal_results() == 4_000_000                       # the pool has started
        with train.flush_denormals():
            assert denormal_results() == 0
        assert denormal_results() == 4_000_000
        assert not train.denormals_flushed()
    finally:
        torch.set_num_threads(threads)


def test_resume_gives_the_uninterrupted_run(tmp_path):
    store, labels = toy_data()
    tr, va = splits(store, labels)
    full = fit(new_head(), tr, va, tmp_path / "full", epochs=3, batch_size=8, seed=5, log=str)
    fit(new_head(), tr, va, tmp_path / "cut", epochs=1, batch_size=8, seed=5, log=str)
    torch.manual_seed(123)                                  # whatever happened in between
    state = ckpt.load_state(tmp_path / "cut")
    resumed = fit(new_head(seed=9), tr, va, tmp_path / "cut", epochs=3, batch_size=8, seed=5,
                  state=state, log=str)
    assert strip_times(resumed) == strip_times(full)
    assert (ckpt.load_state(tmp_path / "cut")["model"]["rnn.weight_hh_l1"]
            .equal(ckpt.load_state(tmp_path / "full")["model"]["rnn.weight_hh_l1"]))



@pytest.mark.parametrize("epoch, batches", [(1, 2), (2, 4)])
def test_resume_mid_epoch_gives_the_uninterrupted_run(tmp_path, monkeypatch, epoch, batches):
    """save_every = 2 on 5 batches an epoch: killed after batch 2 of epoch 1 (or 4 of epoch
    2), resumed, the run ends where the uninterrupted one does, bit for bit: history, weights,
    Adam's moments, the generator."""
    store, labels = toy_data()
    tr, va = splits(store, labels)
    kw = dict(epochs=3, batch_size=8, seed=5, log=str, save_every=2)
    full = fit(new_head(), tr, va, tmp_path / "full", **kw)
    with monkeypatch.context() as m:
        cut_after(m, ckpt, epoch, batches)
        with pytest.raises(Cut):
            fit(new_head(), tr, va, tmp_path / "cut", **kw)
    state = ckpt.load_state(tmp_path / "cut")
    assert state["epoch"] == epoch - 1 and state["partial"]["batches"] == batches
    assert len(state["history"]) == epoch - 1 and state["partial"]["sums"][2] == 8 * batches
    torch.manual_seed(123)                                  # whatever happened in between
    resumed = fit(new_head(seed=9), tr, va, tmp_path / "cut", state=state, **kw)
    assert strip_times(resumed) == strip_times(full)
    assert resumed[epoch - 1]["train_seconds"] >= state["partial"]["seconds"]
    a, b = (ckpt.load_state(tmp_path / d) for d in ("cut", "full"))
    assert "partial" not in a and a["rng"].equal(b["rng"])
    for k, v in b["model"].items():
        assert a["model"][k].equal(v), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sb:
        assert sa[i]["exp_avg"].equal(sb[i]["exp_avg"]), i
        assert sa[i]["exp_avg_sq"].equal(sb[i]["exp_avg_sq"]), i


def test_mid_epoch_saves_come_every_n_batches_and_never_after_divergence(tmp_path, monkeypatch):
    store, labels = toy_data()
    tr, va = splits(store, labels)
    saved = []
    save = ckpt.save_state
    monkeypatch.setattr(ckpt, "save_state", lambda folder, state: (
        saved.append((state["epoch"], state.get("partial", {}).get("batches"))),
        save(folder, state)))
    fit(new_head(), tr, va, tmp_path / "a", epochs=2, batch_size=8, seed=5, log=str,
        save_every=2)
    assert saved == [(0, 2), (0, 4), (1, None), (1, 2), (1, 4), (2, None)]
    saved.clear()
    fit(new_head(), tr, va, tmp_path / "b", epochs=1, batch_size=8, seed=5, log=str)
    assert saved == [(1, None)]                             # the default: epoch ends only
    saved.clear()
    head = new_head()
    with torch.no_grad():
        head.out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        fit(head, tr, va, tmp_path / "c", epochs=1, batch_size=8, seed=5, log=str, save_every=1)
    assert saved == []

# --- checkpoints ---------------------------------------------------------------------------------

MODEL = dict(emb_dim=16, hidden_dim=5, output_dim=1, n_layers=2, bidirectional=True, dropout=0.25)


def save_run(folder, head, **config):
    ckpt.write_json(folder / ckpt.CONFIG, {"model": MODEL} | config)
    ckpt.save_weights(folder, head)


def test_checkpoint_round_trip_into_head_and_full_model(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    head = GRUHead(**MODEL).eval()
    save_run(tmp_path, head)
    loaded, config = ckpt.load_head(tmp_path)
    x, L = torch.randn(3, 6, 16), torch.tensor([6, 2, 4])
    torch.testing.assert_close(loaded(x, L), head(x, L), rtol=0, atol=0)
    assert config["model"] == MODEL
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=16))
    full = ckpt.load_full_model(tmp_path, bert)
    for k, v in ckpt.head_state(head).items():
        assert torch.equal(full.state_dict()[k], v)
    assert not full.training and not any(p.requires_grad for p in full.bert.parameters())
    bert32 = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ckpt.CheckpointError, match="16-dim features, the encoder gives 32"):
        ckpt.load_full_model(tmp_path, bert32)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory"):
        ckpt.load_head(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="no config.json"):
        ckpt.load_head(tmp_path)
    ckpt.write_json(tmp_path / ckpt.CONFIG, {"model": MODEL})
    with pytest.raises(ckpt.CheckpointError, match="no model.safetensors"):
        ckpt.load_head(tmp_path)
    torch.manual_seed(0)
    ckpt.save_weights(tmp_path, GRUHead(**(MODEL | {"hidden_dim": 7})))
    with pytest.raises(ckpt.CheckpointError, match=r"rnn.weight_ih_l0 has shape \(21, 16\)"):
        ckpt.load_head(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="nothing to resume"):
        ckpt.load_state(tmp_path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_resume_state_loads_with_weights_only(tmp_path):
    torch.save({"epoch": 1, "x": Evil()}, tmp_path / ckpt.STATE)
    with pytest.raises(ckpt.CheckpointError, match="unreadable resume state") as e:
        ckpt.load_state(tmp_path)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)


# --- command-line errors -------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs: must be > 0"),
    (["--batch-size", "x"], "--batch-size: 'x' is not a number"),
    (["--max-length", "600"], "--max-length must be in 2..512"),
    (["--dropout", "1.5"], "--dropout must be in"),
    (["--limit-train", "5"], "--limit-train must be >= 10"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--resume"], "nothing to resume"),
    (["--save-every", "0"], "--save-every: must be > 0"),
    (["--data", "/no/such/imdb.tar.gz"], "no such file or directory"),
])
def test_train_cli_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "run"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_train_cli_needs_out(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "1"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_predict_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(tmp_path / "none"), "a fine film"])
    assert e.value.code == 2 and "no such checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(tmp_path)])
    assert e.value.code == 2 and "TEXT" in capsys.readouterr().err


# --- one tiny run of the real command line -------------------------------------------------------

POS = ["a great and wonderful film, I loved it", "brilliant acting, a joy to watch",
       "wonderful story and great music", "the best film of the year, superb"]
NEG = ["an awful and boring film, I hated it", "terrible acting, a pain to watch",
       "boring story and awful music", "the worst film of the year, dreadful"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A synthetic aclImdb folder and a tiny random BERT (real uncased vocabulary) folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from reference.pipeline.encoders import minilm_path

    root = tmp_path_factory.mktemp("world")
    for split, n in (("train", 5), ("test", 2)):
        for label, texts in (("pos", POS), ("neg", NEG)):
            d = root / "aclImdb" / split / label
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}_{8 if label == 'pos' else 2}.txt").write_text(
                    texts[i % 4] + " " * (i // 4) + "!" * i)
    enc = root / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(enc)
    BertTokenizerFast.from_pretrained(minilm_path()).save_pretrained(enc)
    return root, enc


def test_train_and_predict_cli_end_to_end(tiny_world, tmp_path, capsys):
    root, enc = tiny_world
    common = ["--data", str(root), "--encoder", str(enc), "--batch-size", "4", "--max-length", "16",
              "--cache", str(tmp_path / "cache"), "--device", "cpu", "--no-progress", "--seed", "7"]
    assert train.main([*common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert "waiting" not in capsys.readouterr().out          # nobody else was extracting
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (m["n_train"], m["n_valid"], m["n_test"]) == (7, 3, 4)
    assert [r["epoch"] for r in m["epochs"]] == [1, 2]
    assert 0 <= m["test_acc"] <= 1 and math.isfinite(m["test_loss"])
    assm = {"train_loss", "train_acc", "valid_loss", "valid_acc", "train_seconds", "valid_seconds"}
    assert assm <= set(m["epochs"][0])
    assert m["best_epoch"] == min(m["epochs"], key=lambda r: r["valid_loss"])["epoch"]
    # same seed, fresh folder (features now from the cache): the same numbers
    assert train.main([*common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    m2 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (strip_times(m2["epochs"]) == strip_times(m["epochs"])
            and m2["test_loss"] == m["test_loss"])
    # resume to a third epoch: the first two are kept as they were
    assert train.main([*common, "--epochs", "3", "--out", str(tmp_path / "b"), "--resume"]) == 0
    m3 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert strip_times(m3["epochs"][:2]) == strip_times(m["epochs"]) and len(m3["epochs"]) == 3
    with pytest.raises(SystemExit) as e:                    # resume with other settings: refused
        train.main([*common[:-1], "8", "--epochs", "4", "--out", str(tmp_path / "b"), "--resume"])
    assert e.value.code == 2 and "different seed" in capsys.readouterr().err
    capsys.readouterr()

    assert predict.main(["--checkpoint", str(tmp_path / "a"), POS[0], NEG[0]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith(POS[0]) and lines[1].endswith(NEG[0])
    # the CLI's numbers are predict_sentiment's, which is sigmoid(model(ids)) of the assignment
    model, tok, _ = predict.load_model(tmp_path / "a")
    assert isinstance(model, BERTGRUSentiment)
    p = predict.predict_sentiment(model, tok, POS[0])
    ids = torch.tensor([[101, *tok.convert_tokens_to_ids(tok.tokenize(POS[0])), 102]])
    assert p == pytest.approx(torch.sigmoid(model(ids)).item(), abs=0) and 0 < p < 1
    assert float(lines[0].split()[0]) == pytest.approx(p, abs=5e-5)
