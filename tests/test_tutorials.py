"""The seven tutorials: reading order, structure, committed notebooks equal to their sources and
free of errors, and every source running top to bottom in fast mode (as CI runs it).

* the files are ``tutorials/01_...py`` .. ``07_...py`` in the README's reading order, each
  with its executed notebook ``.ipynb`` beside it;
* each opens with "What you will learn", links the scratch modules it explains (links that
  resolve) and ends with 2 or 3 exercises;
* each committed notebook has exactly its source's cells (jupytext's reading of the percent
  format: same types, same text), every code cell executed, no error output, at least one
  figure, a one-line caption cell after every figure, and stays under 1 MB;
* each source runs with ``TUTORIAL_FAST=1`` (small sizes, the same code path) and draws as many
  figures as its committed notebook shows.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
READING_ORDER = ["01_cnn_vs_rnn", "02_toy_recurrence", "03_gru", "04_attention", "05_imdb",
                 "06_scratch_vs_reference", "07_encoder_layer_backward"]
NEEDS_IMDB = {"04_attention", "05_imdb", "06_scratch_vs_reference"}
MAX_NOTEBOOK_BYTES = 1_000_000


def ids(p):
    return p.stem


def test_reading_order():
    assert [p.stem for p in SOURCES] == READING_ORDER


def notebook(path: Path):
    nb_path = path.with_suffix(".ipynb")
    assert nb_path.exists(), f"{nb_path.name} is missing: run make tutorials"
    return nbformat.read(nb_path, as_version=4)


def printed_text(nb) -> str:
    """Everything the notebook's code cells printed, in order."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def image_cells(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
            and any("image/png" in o.get("data", {}) for o in c.outputs)]


@pytest.mark.parametrize("path", SOURCES, ids=ids)
def test_tutorial_structure(path):
    text = path.read_text()
    first = text.split("# %%\n", 1)[0]                       # the opening markdown cell
    assert "**What you will learn**" in first
    links = re.findall(r"\]\((\.\./scratch/[\w/]+\.py)\)", first)
    assert links, "the opening cell links the scratch module(s) it explains"
    for link in links:
        assert (path.parent / link).resolve().is_file(), link
    exercises = text.rsplit("# ## Exercises", 1)
    assert len(exercises) == 2, "ends with an Exercises section"
    assert 2 <= len(re.findall(r"^# \d\. ", exercises[1], flags=re.M)) <= 3


@pytest.mark.parametrize("path", SOURCES, ids=ids)
def test_notebook_is_its_source_executed(path):
    nb, src = notebook(path), jupytext.read(path)
    assert [(c.cell_type, c.source) for c in nb.cells] == \
           [(c.cell_type, c.source) for c in src.cells], "notebook out of date: run make tutorials"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell executed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    figures = image_cells(nb)
    assert figures, "a tutorial shows at least one figure"
    for i in figures:                                         # a caption after each figure
        after = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        captioned = (after is not None and after.cell_type == "markdown"
                     and after.source.startswith("*"))
        assert captioned, f"figure in cell {i} has no caption cell after it"
    assert path.with_suffix(".ipynb").stat().st_size < MAX_NOTEBOOK_BYTES
    if path.stem in NEEDS_IMDB:                               # rendered on the real reviews
        assert "IMDB archive not available" not in printed_text(nb), \
            "rendered without IMDB_PATH: run IMDB_PATH=... make tutorials"


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=ids)
def test_tutorial_runs_in_fast_mode(path, tmp_path, request):
    env = dict(os.environ, MPLBACKEND="Agg", TUTORIAL_OUT=str(tmp_path), TUTORIAL_FAST="1",
               HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if path.stem in NEEDS_IMDB:
        env["IMDB_PATH"] = str(request.getfixturevalue("imdb_path"))
    r = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pngs = sorted(tmp_path.glob("*.png"))
    assert all(p.stat().st_size > 5000 for p in pngs)
    assert len(pngs) == len(image_cells(notebook(path))), [p.name for p in pngs]


def test_imdb_tutorial_shows_the_committed_full_runs():
    """Tutorial 05 section 6 prints every committed full run (results/imdb_runs.json) and the
    MPNet epoch curve (results/imdb_mpnet_epochs.json): a results file updated without
    re-rendering the notebook fails here."""
    import json

    runs = json.loads((ROOT / "results/imdb_runs.json").read_text())["runs"]
    assert any(r["encoder"] == "all-mpnet-base-v2" for r in runs)
    printed = printed_text(notebook(ROOT / "tutorials/05_imdb.py"))
    for r in runs:
        row = [line for line in printed.splitlines() if r["encoder"] in line]
        assert row and f"{r['test_acc']:.4g}" in row[0], f"{r['encoder']}: run make tutorials"
    curve = json.loads((ROOT / "results/imdb_mpnet_epochs.json").read_text())
    assert f"test accuracy {curve['test_acc']:.2%}" in printed, "run make tutorials"


def test_imdb_tutorial_shows_the_committed_unfreeze_runs():
    """Tutorial 05 section 9 prints the full --unfreeze-top runs of
    results/imdb_unfreeze_full.json (each K's test accuracy, or "not yet"), or says they are
    not measured when the file is absent: a results file added or updated without re-rendering
    the notebook fails here."""
    import json

    printed = printed_text(notebook(ROOT / "tutorials/05_imdb.py"))
    path = ROOT / "results/imdb_unfreeze_full.json"
    if not path.exists():
        assert "not measured yet: results/imdb_unfreeze_full.json" in printed
        return
    full = json.loads(path.read_text())
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "train min/epoch" in line) + 2
    rows = {}
    for line in lines[start:]:                  # the table's rows, after its header and rule
        if not line[:1].isdigit():
            break
        rows[line.split()[0]] = line
    for r in full["runs"]:
        row = rows.get(str(r["unfreeze_top"]))
        want = "not yet" if r["test_acc"] is None else f"{r['test_acc']:.4f}"
        assert row and want in row, f"K = {r['unfreeze_top']}: run make tutorials"
