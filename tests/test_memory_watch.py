"""bench/memory_watch.py: a process's peak memory, read from /proc/PID/status until it ends."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WATCH = ROOT / "bench" / "memory_watch.py"

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")


def test_it_records_the_peak_of_a_process_that_grows_then_ends(tmp_path):
    """A child that holds 300 MiB of its own for a while: the watcher's peak of its anonymous
    memory is at least that, VmHWM at least as much, and the file says when it ended."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import time, numpy as np; a = np.ones(300 * 2**18, np.float32); "
                              "time.sleep(1.5)"])
    out = tmp_path / "peak.json"
    r = subprocess.run([sys.executable, str(WATCH), str(child.pid), "--out", str(out),
                        "--every", "0.1"], capture_output=True, text=True, timeout=60)
    child.wait()
    assert r.returncode == 0, r.stderr
    peak = json.loads(out.read_text())
    assert peak["pid"] == child.pid and "ended" in peak
    assert peak["RssAnon_peak_gib"] >= 0.29, peak
    assert peak["VmHWM_peak_gib"] >= peak["RssAnon_peak_gib"]


def test_it_refuses_a_missing_process_and_a_missing_target(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run([sys.executable, str(WATCH), dead, "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"no process {dead}" in r.stderr
    r = subprocess.run([sys.executable, str(WATCH), "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "give a PID or --match TEXT" in r.stderr
