"""``make tutorials``: execute each tutorial as a notebook and commit-ready ``.ipynb`` beside it.

    python tutorials/render.py [NAME ...] [--fast] [--timeout SECONDS]

Each source ``tutorials/NN_name.py`` (jupytext "percent" format: ``# %%`` code cells,
``# %% [markdown]`` prose cells) is read with jupytext, executed top to bottom in a fresh
Python kernel (nbclient) running in ``tutorials/`` with this checkout first on ``PYTHONPATH``,
and written to ``tutorials/NN_name.ipynb`` with its outputs and figures (atomically: a failed
run leaves the old notebook in place).  ``NAME`` selects tutorials by prefix (``01``,
``05_imdb``); none means all.  ``--fast`` sets ``TUTORIAL_FAST=1`` (small sizes; for a quick
look, not for committing).  ``IMDB_PATH`` is passed through to the kernel.

``tests/test_tutorials.py`` checks that every committed notebook's cells equal its source's
and that no output is an error: after editing a source, run this again.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def sources(names) -> list[Path]:
    found = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if not names:
        return found
    picked = [p for p in found if any(p.stem.startswith(n) for n in names)]
    unknown = [n for n in names if not any(p.stem.startswith(n) for p in found)]
    if unknown:
        sys.exit(f"render: no tutorial named {', '.join(unknown)} "
                 f"(have: {', '.join(p.stem for p in found)})")
    return picked


def kernel_env(fast: bool) -> dict:
    """The kernel inherits the environment: this checkout's packages and tutorial_kit first,
    inline figures (no MPLBACKEND), the offline hub, fast mode or not."""
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(HERE), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)
    # tqdm.auto's notice that ipywidgets is not installed (plain bars work): not a reader's concern
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"),
                                                   "ignore:IProgress not found"]))
    env.pop("TUTORIAL_OUT", None)
    if fast:
        env["TUTORIAL_FAST"] = "1"
    else:
        env.pop("TUTORIAL_FAST", None)
    return env


def render(src: Path, timeout: int) -> Path:
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.pop("jupytext", None)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()
    dst = src.with_suffix(".ipynb")
    tmp = dst.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, dst)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tutorials/render.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="tutorials to render, by name prefix (default: all)")
    p.add_argument("--fast", action="store_true", help="TUTORIAL_FAST=1: small sizes, a quick look")
    p.add_argument("--timeout", type=int, default=1800,
                   help="seconds one cell may run (default 1800)")
    a = p.parse_args(argv)
    if a.timeout < 1:
        p.error("--timeout must be a positive number of seconds")
    from nbclient.exceptions import CellExecutionError

    env = kernel_env(a.fast)                 # the kernel starts with this process's environment
    os.environ.clear()
    os.environ.update(env)
    for src in sources(a.names):
        t0 = time.perf_counter()
        try:
            dst = render(src, a.timeout)
        except CellExecutionError as e:
            lines = [s for s in str(e).strip().splitlines() if s.strip()]
            print(f"render: {src.name} failed: {lines[-1] if lines else type(e).__name__}",
                  file=sys.stderr)
            return 1
        print(f"{dst.relative_to(ROOT)}: {time.perf_counter() - t0:.0f} s, "
              f"{dst.stat().st_size / 1024:.0f} KiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
