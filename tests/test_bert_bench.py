"""The BERT benchmark runs end to end at a tiny size and writes its JSON (its timings are
measured, not asserted: timing is not a test)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_writes_json(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/bert.py"), "--shapes", "2x8,1x16",
                        "--repeat", "1", "--swapped", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "bert.json").read_text())["rows"]
    assert {(row["B"], row["T"], row["attention"]) for row in rows} == {
        (b, t, a) for b, t in ((2, 8), (1, 16)) for a in ("softmax", "efficient", "linear")}
    assert all(row["max_abs_diff"] < 1e-4 and row["ratio"] > 0 for row in rows)
    bad = subprocess.run([sys.executable, str(ROOT / "bench/bert.py"), "--shapes", "2x"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode != 0 and "shapes must look like" in bad.stderr
