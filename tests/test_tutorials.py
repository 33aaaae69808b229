"""Every tutorial runs top to bottom (as CI runs it) and draws its figures."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("part*.py"))


def test_there_is_a_tutorial_per_part():
    parts = {p.name.split("_")[0] for p in TUTORIALS}
    assert {"part1", "part2"} <= parts, parts


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_and_plots(path, tmp_path):
    root = str(path.parents[1])           # this checkout's scratch/ and reference/, not an install's
    env = dict(os.environ, MPLBACKEND="Agg", TUTORIAL_OUT=str(tmp_path), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=path.parents[1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pngs = list(tmp_path.glob("*.png"))
    assert pngs, "a tutorial must draw at least one figure"
    assert all(p.stat().st_size > 5000 for p in pngs)
