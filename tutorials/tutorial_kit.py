"""What the seven tutorials share: fast mode, figures, tables, the IMDB archive, result files.

* ``TUTORIAL_FAST=1`` (CI, ``tests/test_tutorials.py``) runs every tutorial with small sizes
  through the same code: a tutorial writes ``pick(full, fast)`` wherever a size is chosen.
* Figures are saved as PNG under ``$TUTORIAL_OUT`` (default ``tutorials/_build/``) and, inside
  a notebook, shown inline (``make tutorials`` executes the notebooks; a script run only saves);
  ``show_html`` does the same for HTML (coloured text).
* ``imdb()`` finds the archive through ``IMDB_PATH`` (``reference.pipeline.data.find_imdb``) and
  says in one line what happens instead when it is missing.

Tutorials import this module as ``tutorial_kit``: a script run puts ``tutorials/`` on
``sys.path``, and a notebook runs in ``tutorials/``.
"""
from __future__ import annotations

import json
import numbers
import os
import sys
from pathlib import Path

import matplotlib

ROOT = Path(__file__).resolve().parents[1]           # the repository
FAST = os.environ.get("TUTORIAL_FAST", "") not in ("", "0")
IN_NOTEBOOK = "ipykernel" in sys.modules
if not IN_NOTEBOOK:
    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(os.environ.get("TUTORIAL_OUT", ROOT / "tutorials" / "_build"))
OUT.mkdir(parents=True, exist_ok=True)
DPI = 90                                            # ~900 px wide figures: a laptop screen
plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 10,
                     "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 9})


def pick(full, fast):
    """``fast`` under ``TUTORIAL_FAST=1``, else ``full``: the only way sizes depend on the mode."""
    return fast if FAST else full


def show(fig, name: str) -> None:
    """Save ``fig`` as ``$TUTORIAL_OUT/name.png``; show it when in a notebook; close it."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    path = OUT / f"{name}.png"
    fig.savefig(path)
    if IN_NOTEBOOK:
        from IPython.display import display

        display(fig)
    plt.close(fig)


def show_html(body: str, name: str) -> None:
    """Save ``body`` as ``$TUTORIAL_OUT/name.html``; render it when in a notebook."""
    (OUT / f"{name}.html").write_text(body, encoding="utf-8")
    if IN_NOTEBOOK:
        from IPython.display import HTML, display

        display(HTML(body))


def table(rows, columns=None, floatfmt="{:.4g}") -> str:
    """Print ``rows`` (dicts, or sequences with ``columns``) as an aligned text table."""
    rows = [dict(zip(columns, r, strict=True)) if not isinstance(r, dict) else r for r in rows]
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    def cell(v):
        real = isinstance(v, numbers.Real) and not isinstance(v, (numbers.Integral, bool))
        return floatfmt.format(v) if real else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    text = "\n".join(lines)
    print(text)
    return text


def imdb(splits=("train", "test")):
    """``{split: Reviews}`` from the archive ``IMDB_PATH`` names, or None (saying so) without it."""
    from reference.pipeline.data import ImdbError, find_imdb, load_imdb

    try:
        path = find_imdb()
        return load_imdb(path, splits=splits)
    except ImdbError as e:
        print(f"IMDB archive not available ({str(e).splitlines()[0]}); "
              "set IMDB_PATH to the aclImdb .tar.gz or folder for the real reviews")
        return None


def results(name: str):
    """The JSON document ``results/name`` of the repository, or None when it is not there yet."""
    path = ROOT / "results" / name
    if not path.exists():
        return None
    return json.loads(path.read_text())
