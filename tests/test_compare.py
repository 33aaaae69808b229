"""``python -m reference.compare`` prints one row per component with real measurements."""
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from reference import compare


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
    for name in ("toy recurrence", "attention softmax", "attention efficient", "attention linear causal",
                 "attention linear recurrent", "GRU", "encoder MiniLM float32", "head fwd+bwd",
                 "Adam: 10 steps", "training epoch, demo subset"):
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
    monkeypatch.setenv("IMDB_PATH", str(imdb_path))
    rows = compare.encoder_rows(repeat=1, n=2, max_length=16)
    assert [r.component.split(":")[0] for r in rows] == [
        "encoder MiniLM float32", "encoder MiniLM float64", "encoder efficient, all layers, f64",
        "encoder linear, top 2 layers, f64"]
    assert max(len(r.component) for r in rows) <= 54          # the table's column width
    assert rows[0].max_abs_err < 1e-4 and max(r.max_abs_err for r in rows[1:]) < 1e-10
    assert all(r.scratch_s > 0 and r.torch_s > 0 for r in rows)
