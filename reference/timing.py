"""How this project measures time: best of N wall-clock runs, on a pinned number of threads.

One copy for everything that times code: ``python -m reference.compare``, the scripts in
``bench/`` and the tutorials (they all sit above ``reference`` in the dependency order
tutorials, bench -> reference -> scratch, so they can all import it; ``scratch`` measures
nothing).  The machine is shared, so a single run is as likely to be disturbed as not: the
*least* disturbed of N runs is the number kept, and two sides are compared as a ratio of such
numbers measured in the same run, never as absolute times.
"""
from __future__ import annotations

import math
import os
import time


def best_time(fn, repeat: int = 3, enough: float = math.inf, with_cpu: bool = False):
    """Call ``fn()`` up to ``repeat`` times (at least once) and keep the best time.

    Returns (result of the last call, best wall seconds), or with ``with_cpu=True``
    (result, best wall seconds, best CPU seconds of this process: summed over its threads,
    steadier than wall time on a busy machine).  ``enough``: stop after a call that took at
    least this many seconds (one slow call already measures the work well).
    """
    best_wall = best_cpu = math.inf
    out = None
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t0
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, time.process_time() - c0)
        if wall >= enough:
            break
    return (out, best_wall, best_cpu) if with_cpu else (out, best_wall)


def bench_threads() -> int:
    """The thread count benchmarks run on: ``$BENCH_THREADS``, default 1 (one per side)."""
    n = os.environ.get("BENCH_THREADS", "1")
    if not n.isdigit() or int(n) < 1:
        raise SystemExit(f"BENCH_THREADS must be a positive integer, got {n!r}")
    return int(n)


def pin_threads(n: int) -> int:
    """Limit NumPy's BLAS (through threadpoolctl, at run time) and torch's intra-op pool to
    ``n`` threads each, so both sides of a comparison get the same cores.  Returns n."""
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)           # applied now, kept for the rest of the process
    torch.set_num_threads(n)
    return n
