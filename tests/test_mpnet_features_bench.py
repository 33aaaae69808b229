"""bench/mpnet_features.py runs end to end on a tiny random MPNet and a tiny archive: the scratch
and torch features agree, a complete cache entry and a partial one (shards missing, no
index.json) are found by the split's key and compared, a checkpoint's predictions are compared,
and bad input is one line with exit status 2 (its timings are measured, not asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import mpnet_features as bench
from reference.pipeline.encoders import load_encoder
from reference.pipeline.features import extract_features
from scratch.pipeline.data import load_imdb
from tests.imdb_fixtures import make_archive, save_tiny_checkpoint, tree_files
from tests.test_encoders import tiny_mpnet_folder

ROOT = Path(__file__).resolve().parents[1]
ML = 24                                    # --max-length: some reviews are cut, some not


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpnet-bench")
    archive = make_archive(root / "imdb.tar.gz", tree_files(n_per_class=8))
    folder = tiny_mpnet_folder(root / "tiny-mpnet")
    return root, archive, folder


def run(tmp_path, archive, folder, *extra):
    out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    assert bench.main(["--data", str(archive), "--encoder", str(folder), "--reviews", "10",
                       "--max-length", str(ML), "--batch", "3", "--repeat", "2",
                       "--time-reviews", "6", "--cache", str(tmp_path / "cache"),
                       "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_features_agree_and_the_cache_is_found_complete_then_partial(world, tmp_path, capsys):
    _, archive, folder = world
    r = run(tmp_path, archive, folder)                   # no cache yet
    d = r["differences"]["scratch f32 vs torch f32"]
    assert d["reviews"] == 10 and d["tokens"] == r["meta"]["tokens"] > 10 * 5
    assert d["rel"] < 1e-5 and d["token_rel"] < 1e-5
    assert r["meta"]["tokenizers_differ"] == 0 and r["cache"] == []
    assert r["full_pass"]["cpu_ratio"] > 0 and r["timed"]["batches"] == 2    # of 4
    assert len(r["timed"]["cpu_ratio_per_pass"]) == 2 and r["timed"]["cpu_ratio"] > 0
    assert "nothing to compare" in capsys.readouterr().out

    texts = load_imdb(archive)["test"].texts             # the pipeline's entry of the split
    store = extract_features(load_encoder(str(folder)), texts, tmp_path / "cache",
                             max_length=ML, autocast=True, shard_size=4, progress=False)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", folder, hidden=32, max_length=ML)
    r = run(tmp_path, archive, folder, "--checkpoint", str(ckpt))
    (row,) = r["cache"]
    assert row["complete"] and row["reviews_present"] == 10 and row["autocast_bf16"]
    assert row["folder"] == str(store.folder) and row["shards"] == [4, 4]
    for ref in ("scratch", "torch"):
        c = r["differences"][f"cache bf16 vs {ref} f32"]
        assert c["reviews"] == 10 and 0 < c["rel"] < 0.05       # bf16 + float16: ~1e-2
    p = r["predictions"]
    assert p["scratch f32 vs torch f32"]["max_abs_dp"] < 1e-5
    assert p["scratch f32 vs cache bf16"]["reviews"] == 10
    assert p["scratch f32 vs cache bf16"]["max_abs_dp"] < 0.05

    (store.folder / "index.json").unlink()               # extraction "under way": 3 of 4 shards
    (store.folder / "shard_00003.safetensors").unlink()
    r = run(tmp_path, archive, folder)
    (row,) = r["cache"]
    assert not row["complete"] and row["shards"] == [3, 4]
    assert 0 < row["reviews_present"] < 10
    assert r["differences"]["cache bf16 vs scratch f32"]["reviews"] == row["reviews_present"]
    assert "partial" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing.tar.gz"], "missing.tar.gz: no such file or directory"),
    (["--reviews", "0"], "--reviews: must be > 0, got 0"),
    (["--reviews", "17"], "--reviews 17 is larger than the test split (16 reviews)"),
    (["--max-length", "600"], "--max-length must be in 2..512"),
    (["--checkpoint", "{tmp}/nothing"], "--checkpoint {tmp}/nothing: "),
])
def test_bad_input_is_one_line_and_status_2(world, tmp_path, capsys, args, message):
    _, archive, folder = world
    argv = ["--data", str(archive), "--encoder", str(folder), "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        bench.main(argv + [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.format(tmp=tmp_path) in err
    assert err.count("\n") == 1 and not (tmp_path / "r.json").exists()


def test_mpnet_not_installed_says_how_to_install_it(tmp_path):
    """As a program: one line, exit 2, no traceback."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench/mpnet_features.py"), "--encoder",
                        "mpnet"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "python -m reference.pipeline.encoders install mpnet" in r.stderr
