"""``python -m reference.compare``: every scratch component beside its torch reference.

One row per component: the largest |scratch - reference| over its outputs (and gradients where
the row says so), the best-of-N wall time of each side measured in this run, and their ratio
(scratch / torch; below 1 means scratch is faster).  Each component module exposes
``compare_rows(repeat) -> list[Row]``; :data:`SUITES` lists them in order.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from scratch.backend import to_numpy

SUITES = ("reference.recurrence", "reference.attention", "reference.gru")


@dataclass
class Row:
    component: str
    max_abs_err: float
    scratch_s: float
    torch_s: float

    @property
    def ratio(self) -> float:
        return self.scratch_s / self.torch_s if self.torch_s > 0 else float("inf")


def best_time(fn, repeat: int = 3):
    """(result of the last call, best wall time in seconds over ``repeat`` calls)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def max_abs_diff(a, b) -> float:
    """max |a - b| over paired arrays/tensors (tuples are zipped)."""
    if isinstance(a, (tuple, list)):
        return max(max_abs_diff(x, y) for x, y in zip(a, b, strict=True))
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare_row(component: str, scratch_fn, torch_fn, repeat: int = 3) -> Row:
    """Time both sides and compare their outputs."""
    s_out, s_t = best_time(scratch_fn, repeat)
    t_out, t_t = best_time(torch_fn, repeat)
    return Row(component, max_abs_diff(s_out, t_out), s_t, t_t)


def collect(suites=SUITES, repeat: int = 3) -> list[Row]:
    rows: list[Row] = []
    for name in suites:
        rows.extend(importlib.import_module(name).compare_rows(repeat=repeat))
    return rows


def format_table(rows: list[Row]) -> str:
    head = (f"{'component':<54} {'max|scratch-ref|':>16} {'scratch s':>10} {'torch s':>10} "
            f"{'scratch/torch':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.component:<54} {r.max_abs_err:>16.3e} {r.scratch_s:>10.4f} "
                     f"{r.torch_s:>10.4f} {r.ratio:>13.2f}")
    lines.append("scratch/torch = scratch s / torch s, both measured in this run "
                 "(below 1: scratch is faster)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m reference.compare",
        description="Run every scratch component beside its torch reference and print "
                    "max |scratch - reference|, both times and their ratio (scratch / torch).")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats, best kept (default 3)")
    p.add_argument("--only", action="append", metavar="MODULE",
                   help=f"run only these suites (default: all of {', '.join(SUITES)})")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, metavar="N",
                   help="limit both sides to N threads (BLAS and torch); default: libraries' own")
    args = p.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    rows = collect(args.only or SUITES, args.repeat)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
