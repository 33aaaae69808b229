"""The attention benchmark runs end to end at tiny sizes and writes its JSON and plot (its
numbers are measured, not asserted: timing is not a test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_writes_json_and_png(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/attention.py"), "--min-n", "64",
                        "--max-n", "256", "--decode-max", "16", "--repeat", "1",
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, MPLBACKEND="Agg"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "crossover n" in r.stdout and "per-token" in r.stdout
    data = json.loads((tmp_path / "attention.json").read_text())
    variants = {(row["variant"], row["side"]) for row in data["rows"]}
    assert {("softmax", "scratch"), ("softmax", "torch"), ("linear causal", "scratch"),
            ("efficient", "torch")} <= variants
    assert {row["n"] for row in data["rows"]} == {64, 128, 256}
    assert [p["tokens"] for p in data["decode"]] == [1, 2, 4, 8, 16]
    assert (tmp_path / "attention.png").stat().st_size > 5000
