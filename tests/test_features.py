"""The frozen-feature cache: values equal an unpadded encoder run, hits, invalidation, resume."""
import json
import re

import numpy as np
import pytest
import torch

from reference.pipeline import features as Fe
from tests.imdb_fixtures import review, tiny_encoder

TEXTS = [review(i, i % 2 == 0) * (1 + i % 5) for i in range(23)]


def direct(encoder, text, max_length=512):
    ids = encoder.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder.model(**ids)[0][0].numpy()


def test_features_equal_an_unpadded_run_of_each_review(tmp_path):
    enc = tiny_encoder()
    st = Fe.extract_features(enc, TEXTS, tmp_path, batch_tokens=200, shard_size=5,
                             autocast=False, progress=False)
    assert len(st) == len(TEXTS) and st.hidden_size == 32
    for i in range(len(TEXTS)):
        ref = direct(enc, TEXTS[i])
        got = st.get(i)
        assert got.dtype == np.float16 and got.shape == ref.shape and st.lengths[i] == len(ref)
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    x, lengths = st.batch([3, 0, 7])
    assert x.shape == (3, int(st.lengths[[3, 0, 7]].max()), 32) and x.dtype == torch.float32
    assert lengths.tolist() == st.lengths[[3, 0, 7]].tolist()
    assert (x[1, lengths[1]:] == 0).all()
    np.testing.assert_array_equal(x[0, :lengths[0]].numpy(), st.get(3).astype(np.float32))


def test_bf16_autocast_stays_close_to_float32(tmp_path):
    enc = tiny_encoder()
    a = Fe.extract_features(enc, TEXTS[:4], tmp_path, autocast=True, progress=False)
    b = Fe.extract_features(enc, TEXTS[:4], tmp_path, autocast=False, progress=False)
    assert a.folder != b.folder                       # the autocast choice is part of the key
    for i in range(4):
        np.testing.assert_allclose(a.get(i).astype(np.float32), b.get(i).astype(np.float32),
                                   atol=0.1)


def test_token_batches_respect_the_budget():
    lengths = np.sort(np.random.default_rng(0).integers(1, 300, 500))
    runs = list(Fe.token_batches(lengths, 1000))
    assert runs[0][0] == 0 and runs[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))
    assert all((stop - start) * lengths[stop - 1] <= 1000 or stop - start == 1
               for start, stop in runs)


def test_cache_hit_does_not_run_the_encoder(tmp_path, monkeypatch):
    enc = tiny_encoder()
    st = Fe.extract_features(enc, TEXTS, tmp_path, shard_size=8, autocast=False, progress=False)
    monkeypatch.setattr(Fe, "_encode", lambda *a, **k: pytest.fail("cache miss"))
    again = Fe.extract_features(enc, TEXTS, tmp_path, shard_size=8, autocast=False, progress=False)
    assert again.folder == st.folder
    np.testing.assert_array_equal(again.get(5), st.get(5))


def test_stale_caches_are_never_used(tmp_path):
    enc = tiny_encoder()
    base = Fe.extract_features(enc, TEXTS, tmp_path, autocast=False, progress=False).folder
    other_weights = tiny_encoder(seed=1)
    kw = dict(autocast=False, progress=False)
    assert Fe.extract_features(other_weights, TEXTS, tmp_path, **kw).folder != base
    assert Fe.extract_features(enc, TEXTS[:-1] + ["changed"], tmp_path, **kw).folder != base
    assert Fe.extract_features(enc, TEXTS, tmp_path, max_length=16, **kw).folder != base
    with torch.no_grad():
        enc.model.encoder.layer[0].output.dense.bias[0] += 1e-3      # one weight changed in place
    assert Fe.extract_features(enc, TEXTS, tmp_path, autocast=False, progress=False).folder != base


def crash_after(n_batches: int, error: BaseException):
    """An ``Fe._encode`` that encodes ``n_batches`` batches, then raises ``error``."""
    real, calls = Fe._encode, []

    def encode(*a, **k):
        if len(calls) == n_batches:
            raise error
        calls.append(1)
        return real(*a, **k)
    return encode


def test_interrupted_extraction_resumes_and_matches_a_clean_run(tmp_path, monkeypatch):
    enc = tiny_encoder()
    real_encode = Fe._encode
    monkeypatch.setattr(Fe, "_encode", crash_after(3, KeyboardInterrupt("simulated interruption")))
    kw = dict(batch_tokens=10**6, shard_size=5, autocast=False, progress=False)  # 1 batch/shard
    with pytest.raises(KeyboardInterrupt):
        Fe.extract_features(enc, TEXTS, tmp_path / "c", **kw)
    (folder,) = (tmp_path / "c").iterdir()
    assert sorted(p.name for p in folder.glob("shard_*")) == [
        f"shard_{i:05d}.safetensors" for i in range(3)]
    assert not (folder / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="not complete"):
        Fe.FeatureStore(folder)

    calls = []
    monkeypatch.setattr(Fe, "_encode", lambda *a, **k: (calls.append(1), real_encode(*a, **k))[1])
    resumed = Fe.extract_features(enc, TEXTS, tmp_path / "c", **kw)
    assert len(calls) == 2                                      # only the 2 missing shards of 5
    clean = Fe.extract_features(enc, TEXTS, tmp_path / "clean", **kw)
    for i in range(len(TEXTS)):
        np.testing.assert_array_equal(resumed.get(i), clean.get(i))
    meta = json.loads((folder / "index.json").read_text())
    assert meta["n"] == len(TEXTS) and len(meta["shards"]) == 5 and meta["dtype"] == "float16"
    assert not list(folder.glob(".*tmp*"))


def test_a_changed_shard_plan_restarts_cleanly(tmp_path):
    enc = tiny_encoder()
    kw = dict(autocast=False, progress=False)
    a = Fe.extract_features(enc, TEXTS, tmp_path, shard_size=5, **kw)
    before = [a.get(i).astype(np.float32) for i in range(len(TEXTS))]
    (a.folder / "index.json").unlink()                       # pretend it was interrupted
    b = Fe.extract_features(enc, TEXTS, tmp_path, shard_size=7, **kw)
    assert len(b.meta["shards"]) == 4 and len(list(b.folder.glob("shard_*"))) == 4
    for i in range(len(TEXTS)):
        np.testing.assert_allclose(b.get(i).astype(np.float32), before[i], atol=2e-3)


def test_a_second_writer_waits_then_reads_the_first_ones_cache(tmp_path, monkeypatch):
    """Two extractions of one entry never run side by side: the second waits on the lock, then
    finds the cache complete and runs the encoder not once."""
    import threading
    import time

    enc = tiny_encoder()
    real_encode, callers, started = Fe._encode, [], threading.Event()

    def slow_encode(*a, **k):
        callers.append(threading.current_thread().name)
        started.set()
        time.sleep(0.3)
        return real_encode(*a, **k)

    monkeypatch.setattr(Fe, "_encode", slow_encode)
    kw = dict(batch_tokens=10**6, shard_size=8, autocast=False, progress=False)   # 3 shards
    first = threading.Thread(target=Fe.extract_features, args=(enc, TEXTS, tmp_path), kwargs=kw,
                             name="first")
    first.start()
    assert started.wait(30)
    second = Fe.extract_features(enc, TEXTS, tmp_path, **kw)
    first.join()
    assert callers == ["first"] * 3                 # the second writer computed nothing
    assert second.wait_seconds >= 0.3 and len(second) == len(TEXTS)
    assert Fe.extract_features(enc, TEXTS, tmp_path, **kw).wait_seconds == 0.0   # plain hit


# --- failures, resume and the lock (issue 10) ---------------------------------------------------

def entries(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize("error", [RuntimeError("encoder crashed"), KeyboardInterrupt()])
def test_a_run_that_fails_before_its_first_shard_leaves_no_entry(tmp_path, monkeypatch, error):
    def crash(*a, **k):
        raise error

    monkeypatch.setattr(Fe, "_encode", crash)
    with pytest.raises(type(error)):
        Fe.extract_features(tiny_encoder(), TEXTS, tmp_path, shard_size=5, autocast=False,
                            progress=False)
    assert entries(tmp_path) == []                       # no plan.json-only folder, no .lock


def test_a_failed_run_keeps_its_finished_shards_and_says_so_on_resume(tmp_path, monkeypatch,
                                                                        caplog):
    enc = tiny_encoder()
    real = Fe._encode
    monkeypatch.setattr(Fe, "_encode", crash_after(3, RuntimeError("encoder crashed")))  # shard 4
    kw = dict(batch_tokens=10**6, shard_size=5, autocast=False, progress=False)
    with pytest.raises(RuntimeError):
        Fe.extract_features(enc, TEXTS, tmp_path, **kw)
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock", "plan.json", *(f"shard_{i:05d}.safetensors" for i in range(3)), "sums"]
    assert sorted(p.name for p in (folder / "sums").iterdir()) == [
        f"shard_{i:05d}.safetensors.json" for i in range(3)]          # each shard's checksum
    monkeypatch.setattr(Fe, "_encode", real)
    with caplog.at_level("INFO", logger="scratch.pipeline.features"):
        Fe.extract_features(enc, TEXTS, tmp_path, **kw)
    assert "features: resuming: 3 of 5 shards done" in caplog.messages


def test_a_batch_must_hold_the_longest_review(tmp_path):
    with pytest.raises(ValueError,
                       match=r"batch_tokens 8 is smaller than the longest review \(\d+ tokens\)"):
        Fe.extract_features(tiny_encoder(), TEXTS, tmp_path, batch_tokens=8, progress=False)
    assert entries(tmp_path) == []


def test_an_uncontended_lock_reports_no_wait(tmp_path):
    with Fe.writer_lock(tmp_path / "entry") as waited:
        assert waited == 0.0


def test_a_waiting_writer_takes_over_when_the_first_one_fails_empty(tmp_path, monkeypatch):
    """The first writer fails before its first shard and removes the entry, .lock included;
    the second, which was waiting on the removed lock file, locks the new one and extracts."""
    import threading
    import time

    enc = tiny_encoder()
    real, started, errors = Fe._encode, threading.Event(), []

    def first_fails(*a, **k):
        if threading.current_thread().name == "first":
            started.set()
            time.sleep(0.5)                      # the second writer is waiting on the lock now
            raise RuntimeError("encoder crashed")
        return real(*a, **k)

    def first():
        try:
            Fe.extract_features(enc, TEXTS, tmp_path, **kw)
        except RuntimeError as e:
            errors.append(e)

    monkeypatch.setattr(Fe, "_encode", first_fails)
    kw = dict(shard_size=8, autocast=False, progress=False)
    t = threading.Thread(target=first, name="first")
    t.start()
    assert started.wait(30)
    second = Fe.extract_features(enc, TEXTS, tmp_path, **kw)
    t.join()
    assert len(errors) == 1 and second.wait_seconds > 0.2 and len(second) == len(TEXTS)
    assert (second.folder / ".lock").exists() and (second.folder / "index.json").exists()


def test_features_cli_shard_size_lets_a_small_subset_resume(tmp_path, monkeypatch, caplog, capsys):
    """--shard-size 2 on a 6-review subset: an interrupted run keeps whole shards, and the
    next run resumes from them, saying so."""
    from tests.imdb_fixtures import make_tree, save_tiny_encoder

    make_tree(tmp_path / "data")
    enc = save_tiny_encoder(tmp_path / "enc")
    argv = ["--data", str(tmp_path / "data"), "--encoder", str(enc), "--cache", str(tmp_path / "c"),
            "--limit-train", "6", "--limit-test", "4", "--shard-size", "2", "--max-length", "32",
            "--batch-tokens", "64", "--device", "cpu", "--no-autocast", "--no-progress"]
    real = Fe._encode
    monkeypatch.setattr(Fe, "_encode", crash_after(2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        Fe.main(argv)
    (entry,) = (tmp_path / "c").iterdir()
    assert len(list(entry.glob("shard_*"))) >= 1 and not (entry / "index.json").exists()
    assert json.loads((entry / "plan.json").read_text())["shard_size"] == 2
    monkeypatch.setattr(Fe, "_encode", real)
    with caplog.at_level("INFO", logger="scratch.pipeline.features"):
        assert Fe.main(argv) == 0
    assert any(re.fullmatch(r"train: resuming: \d of 3 shards done", m) for m in caplog.messages)
    out = capsys.readouterr().out
    assert "train: 6 reviews" in out and "test: 4 reviews" in out
