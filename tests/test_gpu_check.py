"""bench/gpu_check.sh's plumbing, proven on the CPU before GPU time is spent: the travel forms
(float16 encoder folder, token ids) round-trip to exactly what the reference pipeline uses, the
device feature store holds exactly the reference encoder's features, and the whole script runs
end to end in its smoke mode (every stage tiny, NumPy and torch on the CPU), writing the 8
files that come back from the GPU machine.  What only a GPU can show (CuPy numbers) is not
claimed here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from bench.gpu_assignment import DeviceFeatureStore, encode
from bench.gpu_travel import ENCODER_DIR, TOKENS, TravelError, load_tokens
from bench.gpu_travel import main as travel_main
from reference.pipeline.data import load_imdb, tokenize
from reference.pipeline.encoders import load_encoder, minilm_path
from reference.pipeline.features import _encode, token_batches
from scratch.backend import cupy_usable

from .imdb_fixtures import make_archive, tree_files

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {"gpu_check.log", "env.txt", "pytest.xml", "gru.json", "gru.png",
                  "attention.json", "attention.png", "assignment.json"}


@pytest.fixture(scope="module")
def travel(tmp_path_factory):
    """Travel forms of a synthetic 2 x 60-review archive, 64 tokens, the packaged MiniLM."""
    root = tmp_path_factory.mktemp("travel")
    archive = make_archive(root / "imdb.tar.gz", tree_files(30))
    assert travel_main(["--out", str(root / "out"), "--data", str(archive),
                        "--max-length", "64"]) == 0
    return archive, root / "out"


def test_shell_scripts_parse():
    for script in ("bench/gpu_check.sh", "bench/gpu_prepare.sh"):
        r = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_token_file_holds_the_reference_pipelines_ids_in_load_imdb_order(travel):
    archive, out = travel
    data, meta = load_tokens(out / TOKENS)
    reviews = load_imdb(archive)
    tok = load_encoder("minilm").tokenizer
    assert meta["max_length"] == 64 and meta["encoder"] == "minilm"
    for split in ("train", "test"):
        ids, labels = data[split]
        want = tokenize(tok, reviews[split].texts, 64)
        assert len(ids) == len(want) == 60
        assert all(np.array_equal(a, b) for a, b in zip(ids, want, strict=True))
        np.testing.assert_array_equal(labels, reviews[split].labels)


def test_encoder_folder_is_minilm_rounded_to_float16(travel):
    _, out = travel
    half = load_file(out / ENCODER_DIR / "model.safetensors")
    full = load_file(Path(minilm_path()) / "model.safetensors")
    assert set(half) == set(full)
    for name, w in full.items():                          # float weights halved, ids kept
        want = w.astype(np.float16) if w.dtype.kind == "f" else w
        assert half[name].dtype == want.dtype
        np.testing.assert_array_equal(half[name], want)
    enc = load_encoder(str(out / ENCODER_DIR))          # loads and passes the tokenizer checks
    assert enc.hidden_size == 384 and enc.pad_id == 0


def test_damaged_token_file_is_a_one_line_error(travel, tmp_path):
    _, out = travel
    with np.load(out / TOKENS) as z:
        arrays = dict(z)
    arrays["train_lengths"] = arrays["train_lengths"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TravelError, match="lengths and ids do not add up"):
        load_tokens(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TravelError, match="not a readable token file"):
        load_tokens(tmp_path / "junk.npz")
    with pytest.raises(TravelError, match="gpu_prepare"):
        load_tokens(tmp_path / "missing.npz")


def test_device_store_holds_exactly_the_reference_encoders_features(travel):
    """encode() (one flat float16 tensor, length-sorted batches) ==
    reference.pipeline.features._encode on the same batches, bit for bit; batch() == the
    zero-padded stack of those features."""
    _, out = travel
    data, _ = load_tokens(out / TOKENS)
    ids = data["test"][0][:23]
    encoder = load_encoder(str(out / ENCODER_DIR))
    encoder.model.float()
    store = encode(encoder, ids, "cpu", batch_tokens=60, autocast=False)
    assert isinstance(store, DeviceFeatureStore) and len(store) == 23
    lengths = np.array([len(a) for a in ids])
    order = np.argsort(lengths, kind="stable")
    want = {}
    batches = list(token_batches(lengths[order], 60))
    assert len(batches) > 2                                  # several batches were exercised
    for start, stop in batches:
        members = order[start:stop]
        feats = _encode(encoder, [ids[i] for i in members], False, "cpu")
        for i, f in zip(members, feats, strict=True):
            want[i] = f
    idx = np.array([5, 0, 22, 13])
    x, L = store.batch(idx)
    assert x.dtype == torch.float32 and L.tolist() == lengths[idx].tolist()
    for b, i in enumerate(idx):
        np.testing.assert_array_equal(x[b, :L[b]].numpy(), want[i].astype(np.float32))
        assert not x[b, L[b]:].any()


@pytest.mark.skipif(cupy_usable(), reason="CuPy runs here: the option works")
def test_cupy_backend_without_a_gpu_is_a_one_line_error():
    for script in ("bench/gru.py", "bench/attention.py"):
        r = subprocess.run([sys.executable, script, "--backend", "cupy"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "CuPy cannot run here" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_gpu_check_smoke_run_writes_the_eight_files(travel, tmp_path):
    """The whole script in smoke mode: every stage runs and succeeds, its JSON is the shape
    bench/gpu_summary.py reads, and exactly the 8 files (the most that come back) are left."""
    _, out = travel
    results = tmp_path / "OUT"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", OUT=str(results), TRAVEL=str(out),
               PY=sys.executable, MPLBACKEND="Agg")
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert {p.name for p in results.iterdir()} == EXPECTED_FILES
    assert all(p.stat().st_size < 16 * 2**20 for p in results.iterdir())
    log = (results / "gpu_check.log").read_text()
    for stage in ("tests", "gru", "attention", "assignment"):
        assert f"=== {stage}: ok" in log, stage
    a = json.loads((results / "assignment.json").read_text())
    assert (a["n_train"], a["n_valid"], a["n_test"]) == (34, 14, 24)
    assert 0 <= a["test_acc"] <= 1 and len(a["epochs"]) == 2
    assert set(a["stage_seconds"]) >= {"features train", "features test", "test"}
    assert json.loads((results / "gru.json").read_text())["rows"]
    assert json.loads((results / "attention.json").read_text())["summary"]
    assert "| stage | seconds |" in log and "CuPy tests (`pytest -m gpu`)" in log
