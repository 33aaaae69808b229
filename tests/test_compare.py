"""``python -m reference.compare`` prints one row per component with real measurements."""
import json
import subprocess
import sys

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


def test_every_suite_contributes_rows_with_small_errors(capsys):
    """The whole demo table: each component present, errors at floating-point level."""
    assert compare.main(["--repeat", "1", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    for name in ("toy recurrence", "attention softmax", "attention efficient", "attention linear causal",
                 "attention linear recurrent", "GRU"):
        assert name in table, name
    rows = compare.collect(("reference.gru",), repeat=1)
    assert len(rows) >= 2 and all(r.max_abs_err < 1e-3 and r.torch_s > 0 for r in rows)
