"""``python -m reference.compare`` prints one row per component with real measurements."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import compare
from scratch.pipeline.data import load_imdb
from tests.imdb_fixtures import make_archive, tree_files

ROOT = Path(__file__).resolve().parents[1]


def test_table_rows_have_errors_and_times(tmp_path):
    out = tmp_path / "rows.json"
    assert compare.main(["--repeat", "1", "--only", "reference.recurrence", "--json", str(out),
                         "--threads", "1"]) == 0
    rows = json.loads(out.read_text())
    names = [r["component"] for r in rows]
    assert any(n.startswith("toy recurrence: loop") for n in names)
    for r in rows:
        assert 0.0 <= r["max_abs_err"] < 1e-12
        assert r["scratch_s"] > 0 and r["torch_s"] > 0
        assert abs(r["ratio"] - r["scratch_s"] / r["torch_s"]) < 1e-12


def test_max_abs_diff_detects_a_difference():
    assert compare.max_abs_diff(([1.0, 2.0], [3.0]), ([1.0, 2.5], [3.0])) == 0.5


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "reference.compare", "--help"],
                       capture_output=True, text=True, check=True)
    assert "scratch / torch" in r.stdout and "--repeat" in r.stdout


@pytest.mark.imdb
@pytest.mark.slow
def test_every_suite_contributes_rows_with_small_errors(capsys, imdb_path, monkeypatch):
    """The whole demo table: each component present, errors at floating-point level."""
    monkeypatch.setenv("IMDB_PATH", str(imdb_path))
    assert compare.main(["--repeat", "1", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == f"reviews: IMDB ({imdb_path})"
    for name in ("toy recurrence", "attention softmax", "attention efficient",
                 "attention linear causal", "attention linear recurrent", "GRU",
                 "encoder MiniLM float32", "head fwd+bwd", "Adam: 10 steps",
                 "training epoch: 256 IMDB demo reviews"):
        assert name in table, name
    rows = compare.collect(("gru",), repeat=1)
    assert len(rows) >= 2 and all(r.max_abs_err < 1e-3 and r.torch_s > 0 for r in rows)


def test_suites_by_name_in_order_and_the_old_module_spelling():
    assert list(compare.SUITES) == ["recurrence", "attention", "gru", "encoder", "sentiment"]
    assert compare.suite_name("reference.gru") == "gru" == compare.suite_name("gru")
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        compare.suite_name("nope")
    r = subprocess.run([sys.executable, "-m", "reference.compare", "--only", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown suite" in r.stderr and "Traceback" not in r.stderr


def test_a_registered_suite_joins_the_table(monkeypatch):
    monkeypatch.setattr(compare, "SUITES", dict(compare.SUITES))

    @compare.suite("identity")
    def identity_rows(repeat):
        x = np.arange(3.0)
        return [compare.compare_row("identity", lambda: x, lambda: torch.from_numpy(x), repeat)]

    rows = compare.collect(["identity"], repeat=1)
    assert [r.component for r in rows] == ["identity"] and rows[0].max_abs_err == 0.0
    assert "identity" in compare.format_table(rows)


MIRRORS = ("reference.recurrence", "reference.attention", "reference.gru")


@pytest.mark.parametrize("mirror", MIRRORS)
def test_torch_mirrors_hold_torch_maths_only(mirror):
    """Dependencies point one way: a mirror imports neither scratch nor the comparison."""
    code = (f"import sys, {mirror}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scratch' "
            "or m in ('reference.compare', 'reference.timing')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
    assert not hasattr(importlib.import_module(mirror), "compare_rows")


@pytest.mark.imdb
def test_encoder_rows_on_real_reviews(imdb_path, monkeypatch):
    monkeypatch.setattr(compare, "SOURCE", compare.ReviewSource(str(imdb_path)))
    rows = compare.encoder_rows(repeat=1, n=2, max_length=16)
    assert [r.component.split(":")[0] for r in rows] == [
        "encoder MiniLM float32", "encoder MiniLM float64", "encoder efficient, all layers, f64",
        "encoder linear, top 2 layers, f64"]
    assert max(len(r.component) for r in rows) <= 56          # the table's column width
    assert rows[0].max_abs_err < 1e-4 and max(r.max_abs_err for r in rows[1:]) < 1e-10
    assert all(r.scratch_s > 0 and r.torch_s > 0 for r in rows)


# --- without the archive: the reviews the project ships ----------------------------------------

def test_shipped_reviews_are_package_data_both_classes_varied_lengths():
    texts, labels = compare.shipped_reviews()
    assert len(texts) == 16 and labels.sum() == 8 and set(labels) == {0, 1}
    words = sorted(len(t.split()) for t in texts)
    assert words[0] < 10 and words[-1] > 120                 # one word to past 128 tokens
    assert "reference = reviews.json" in (ROOT / "setup.cfg").read_text()


def test_encoder_and_epoch_rows_run_on_the_shipped_reviews(tmp_path, monkeypatch):
    """No IMDB anywhere: the encoder rows and the training-epoch row use the shipped reviews
    (the epoch's features cached in the working folder), errors at floating-point level."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "SOURCE", compare.ReviewSource())
    rows = compare.encoder_rows(repeat=1, n=2, max_length=16)
    assert rows[0].max_abs_err < 1e-4 and max(r.max_abs_err for r in rows[1:]) < 1e-10
    epoch = compare._epoch_row()
    assert epoch.component == "training epoch: 16 shipped reviews, B4, no dropout"
    assert epoch.max_abs_err < 1e-4 and epoch.scratch_s > 0 and epoch.torch_s > 0


@pytest.fixture
def recorded(monkeypatch):
    """The suites replaced by one that records its call and the reviews it would read."""
    calls = []

    def fake(repeat):
        calls.append((repeat, compare.SOURCE.texts(2)))
        return [compare.Row("fake", 0.0, 1.0, 1.0)]

    monkeypatch.setattr(compare, "SUITES", {name: fake for name in compare.SUITES})
    monkeypatch.delenv("IMDB_PATH", raising=False)
    return calls


def test_the_table_says_which_reviews_it_used(recorded, capsys, tmp_path, monkeypatch):
    assert compare.main(["--only", "encoder", "--repeat", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("reviews: the 16 shipped with the project (reference/reviews.json)")
    assert recorded == [(2, compare.shipped_reviews()[0][:2])]
    archive = make_archive(tmp_path / "imdb.tar.gz", tree_files(3))
    monkeypatch.setenv("IMDB_PATH", str(archive))
    assert compare.main(["--only", "sentiment"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"reviews: IMDB ({archive})"
    assert recorded[-1][1] == load_imdb(archive)["test"].texts[:2]
    assert compare.main(["--only", "gru"]) == 0               # no reviews read: no such line
    assert capsys.readouterr().out.splitlines()[0].startswith("component")


def test_only_takes_a_comma_list_and_repeats(recorded, capsys):
    assert compare.suite_list("recurrence, gru") == ["recurrence", "gru"]
    assert compare.main(["--only", "recurrence,reference.gru", "--only", "gru"]) == 0
    assert len(recorded) == 2                                  # each suite once, in that order
    assert compare.main(["--only", "attention"]) == 0 and len(recorded) == 3


def unwritable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


BAD = [
    (["--threads", "0"], r"argument --threads: must be > 0, got 0"),
    (["--threads", "-3"], r"argument --threads: must be > 0, got -3"),
    (["--threads", "two"], r"argument --threads: 'two' is not a number"),
    (["--repeat", "0"], r"argument --repeat: must be > 0, got 0"),
    (["--repeat", "-1"], r"argument --repeat: must be > 0, got -1"),
    (["--repeat", "1.5"], r"argument --repeat: '1.5' is not a number"),
    (["--only", "nosuch"], r"argument --only: unknown suite 'nosuch'; choose from recurrence"),
    (["--only", "gru,nosuch"], r"argument --only: unknown suite 'nosuch'"),
    (["--only", ","], r"argument --only: no suite named in ','"),
    (["--json", "{tmp}/missing/rows.json"], r"--json .*missing/rows.json: .*missing is not a dir"),
    (["--json", "{tmp}"], r"--json .*: is a directory"),
    (["--json", "{ro}/rows.json"], r"--json .*ro/rows.json: not writable"),
    (["--data", "/no/such/imdb.tar.gz"], r"/no/such/imdb.tar.gz: no such file or directory"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, pattern", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_are_one_line_before_any_measurement(argv, pattern, recorded, tmp_path,
                                                         capsys):
    if os.geteuid() == 0 and "{ro}" in " ".join(argv):
        pytest.skip("root writes anywhere")
    ro = unwritable(tmp_path)
    argv = [a.format(tmp=tmp_path, ro=ro) for a in argv]
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and recorded == []               # nothing measured
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.match(r"python -m reference\.compare: error: ", err)
    assert re.search(pattern, err), err
