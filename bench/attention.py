"""Attention benchmark: softmax vs Efficient Attention vs linear attention, scratch and torch side
by side in one run, plus autoregressive decoding (recurrent linear state vs softmax over a cache).

    .venv/bin/python bench/attention.py [--min-n 128] [--max-n 16384] [--decode-max 8192]
                                        [--repeat 3] [--max-call-s 30] [--backend numpy|cupy]
                                        [--out bench/results]

Forward pass, d_k = d_v = 64, one head, batch 1, float32, one thread on each side (NumPy's BLAS
and torch; ``BENCH_THREADS`` changes it): the machine is shared and thread oversubscription makes
timings erratic.  For each n: best-of-``repeat`` wall
time, and the peak extra resident memory of one call (Linux: reset the process's peak RSS through
``/proc/self/clear_refs``, call, read ``VmHWM`` - RSS before; page-granular, so tiny sizes read
~0; allocations of 64 KiB and more are mmap-ed so that freed memory is not silently reused).
Rows: scratch and torch for each variant, torch's own ``scaled_dot_product_attention``, and
scratch causal linear attention with ``chunk_size=1`` (per-position prefix sums, memory
O(n d_k d_v), the form torch's reference uses) beside the default chunked one.  A variant whose
call took longer than ``--max-call-s`` is not run at larger n.  Prints the
table, the crossover n (from where on linear / efficient beat softmax), the speed-up at the
largest n and the decode per-token times; writes ``attention.json`` and ``attention.png`` under
``--out``.  Numbers under CPU contention are noisy: the side-by-side ratios are what matter.

``--backend cupy``: scratch on CuPy and torch on CUDA, each timed call ending with a device
synchronisation; the memory column is then the peak of GPU memory the call allocated above
what was allocated before it (CuPy's pool, through a memory hook; torch's
``max_memory_allocated``), and both libraries' cached blocks are released between variants.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference import attention as R
from reference.timing import bench_threads, best_time, pin_threads
from scratch import attention as A
from scratch.backend import get_xp

THREADS = pin_threads(bench_threads())

D = 64

# (variant, side) -> f(q, k, v); "causal" variants need n == m (self-attention: q, k, v all n x d)
VARIANTS = {
    ("softmax", "scratch"): lambda q, k, v: A.softmax_attention(q, k, v),
    ("softmax", "torch"): R.softmax_attention,
    ("softmax", "torch SDPA"): R.softmax_attention_sdpa,
    ("softmax causal", "scratch"): lambda q, k, v: A.softmax_attention(q, k, v, causal=True),
    ("softmax causal", "torch"): lambda q, k, v: R.softmax_attention(q, k, v, causal=True),
    ("efficient", "scratch"): A.efficient_attention,
    ("efficient", "torch"): R.efficient_attention,
    ("linear", "scratch"): A.linear_attention,
    ("linear", "torch"): R.linear_attention,
    ("linear causal", "scratch"): lambda q, k, v: A.linear_attention(q, k, v, causal=True),
    ("linear causal", "torch"): lambda q, k, v: R.linear_attention(q, k, v, causal=True),
    # chunk_size=1: the textbook per-position prefix sums S_i (memory O(n d_k d_v)), like torch's
    ("linear causal", "scratch C=1"): lambda q, k, v: A.linear_attention(q, k, v, causal=True,
                                                                         chunk_size=1),
}


def _fixed_mmap_threshold(nbytes: int = 1 << 16) -> None:
    """glibc: serve every allocation >= ``nbytes`` by mmap and unmap it on free (the default
    threshold grows to 32 MiB as blocks are freed, after which freed heap memory is reused
    without showing in the RSS).  Then peak RSS sees each large temporary array."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)         # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn) -> tuple[float, int | None]:
    """(seconds, peak resident bytes above the RSS before the call) of one call of ``fn``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # reset VmHWM (peak RSS) to the current RSS
        before = _status_kb("VmRSS")
    except OSError:
        before = None
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    del out
    if before is None:
        return seconds, None
    return seconds, max(0, _status_kb("VmHWM") - before) * 1024


def cupy_peak_extra_bytes(fn) -> tuple[float, int]:
    """(seconds, peak bytes CuPy's pool handed out during the call above those held before)."""
    import cupy

    class Peak(cupy.cuda.MemoryHook):
        name = "Peak"

        def __init__(self):
            self.used = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw):
            self.used -= kw["mem_size"]

    hook = Peak()
    with hook:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        del out
    return seconds, hook.peak


def torch_cuda_peak_extra_bytes(fn) -> tuple[float, int]:
    """(seconds, peak bytes torch allocated on the GPU during the call above those before)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    del out
    return seconds, torch.cuda.max_memory_allocated() - before


def release_gpu_memory(xp) -> None:
    """Give the cached blocks of CuPy's pool and torch's allocator back to the driver, so that
    the two libraries' caches never crowd each other out of the GPU's memory."""
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()


def measure(fn, repeat: int, memory=peak_extra_bytes) -> tuple[float, int | None]:
    """(best time over ``repeat`` calls, peak extra memory of the first call by ``memory``)."""
    first, mem = memory(fn)
    if repeat < 2 or first >= 1.0:                       # one call is enough once it takes 1 s
        return first, mem
    _, rest = best_time(fn, repeat - 1, enough=1.0)
    return min(first, rest), mem


def sweep(sizes, repeat, max_call_s, xp=np):
    gpu = xp is not np
    device = "cuda" if gpu else "cpu"
    rows, stopped = [], set()
    for n in sizes:
        rng = np.random.default_rng(n)
        q, k, v = (rng.standard_normal((n, D), dtype=np.float32) for _ in range(3))
        tq, tk, tv = (torch.from_numpy(x).to(device) for x in (q, k, v))
        if gpu:
            q, k, v = (xp.asarray(a) for a in (q, k, v))
        for (variant, side), f in VARIANTS.items():
            if (variant, side) in stopped:
                continue
            scratch = side.startswith("scratch")
            args = (q, k, v) if scratch else (tq, tk, tv)
            if scratch:
                def call(f=f, args=args):
                    out = f(*args)
                    if gpu:
                        xp.cuda.Device().synchronize()
                    return out
                memory = cupy_peak_extra_bytes if gpu else peak_extra_bytes
            else:
                def call(f=f, args=args):
                    with torch.no_grad():
                        out = f(*args)
                    if gpu:
                        torch.cuda.synchronize()
                    return out
                memory = torch_cuda_peak_extra_bytes if gpu else peak_extra_bytes
            seconds, mem = measure(call, repeat, memory)
            release_gpu_memory(xp)
            rows.append(dict(variant=variant, side=side, n=n, seconds=seconds, peak_bytes=mem))
            print(f"  n={n:>6} {variant:<15} {side:<12} {seconds * 1e3:>10.2f} ms  "
                  f"{(mem or 0) / 2**20:>9.1f} MiB", flush=True)
            if seconds > max_call_s:
                stopped.add((variant, side))
    return rows


def lookup(rows, variant, side):
    return {r["n"]: r for r in rows if r["variant"] == variant and r["side"] == side}


def crossover(rows, fast, slow, side):
    """Smallest n from which ``fast`` is faster than ``slow`` at every measured n (or None)."""
    a, b = lookup(rows, fast, side), lookup(rows, slow, side)
    common = sorted(set(a) & set(b))
    for i, n in enumerate(common):
        if all(a[m]["seconds"] < b[m]["seconds"] for m in common[i:]):
            return n
    return None


def decode(max_tokens: int, xp=np):
    """Per-token time: LinearAttentionState.step vs softmax over a growing K/V cache (scratch);
    on CuPy each token's time ends with a device synchronisation."""
    rng = np.random.default_rng(0)
    q, k, v = (xp.asarray(rng.standard_normal((max_tokens, D), dtype=np.float32))
               for _ in range(3))
    sync = xp.cuda.Device().synchronize if xp is not np else (lambda: None)
    state = A.LinearAttentionState(D, D, dtype="float32", xp=xp)
    lin, soft = np.empty(max_tokens), np.empty(max_tokens)
    state.step(q[0], k[0], v[0])                       # warm-up calls, not timed
    A.softmax_attention(q[:1], k[:1], v[:1])
    state.reset()
    sync()
    for t in range(max_tokens):
        t0 = time.perf_counter()
        state.step(q[t], k[t], v[t])
        sync()
        lin[t] = time.perf_counter() - t0
    for t in range(max_tokens):          # the cache is q/k/v[: t + 1]: keys so far, no copy
        t0 = time.perf_counter()
        A.softmax_attention(q[t: t + 1], k[: t + 1], v[: t + 1])
        sync()
        soft[t] = time.perf_counter() - t0
    points = []
    t = 1
    while t <= max_tokens:               # median over the tokens in (t/2, t]
        window = slice(t // 2, t)
        points.append(dict(tokens=t, linear_s=float(np.median(lin[window])),
                           softmax_s=float(np.median(soft[window]))))
        t *= 2
    return points


def plot(rows, points, path, where="CPU"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    styles = {"scratch": "-o", "torch": "--s", "torch SDPA": ":^", "scratch C=1": "-.x"}
    colours = {"softmax": "C3", "softmax causal": "C1", "efficient": "C2", "linear": "C0",
               "linear causal": "C9"}
    for (variant, side) in VARIANTS:
        got = lookup(rows, variant, side)
        ns = sorted(got)
        label = f"{variant} ({side})"
        axes[0].loglog(ns, [got[n]["seconds"] for n in ns], styles[side], color=colours[variant],
                       label=label, ms=4)
        mem = [(n, got[n]["peak_bytes"]) for n in ns if got[n]["peak_bytes"]]
        if mem:
            axes[1].loglog([m[0] for m in mem], [m[1] / 2**20 for m in mem], styles[side],
                           color=colours[variant], label=label, ms=4)
    axes[0].set(xlabel="sequence length n", ylabel="forward time (s)",
                title=f"time vs n (d={D}, float32, {where})")
    axes[1].set(xlabel="sequence length n", ylabel="peak extra memory (MiB)",
                title=f"memory vs n ({where})")
    axes[0].legend(fontsize=7)
    toks = [p["tokens"] for p in points]
    axes[2].loglog(toks, [p["linear_s"] * 1e6 for p in points], "-o", color="C0",
                   label="linear: recurrent state step")
    axes[2].loglog(toks, [p["softmax_s"] * 1e6 for p in points], "-o", color="C3",
                   label="softmax over the K/V cache")
    axes[2].set(xlabel="tokens generated so far", ylabel="time per token (us)",
                title="autoregressive decoding (scratch)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-n", type=int, default=128)
    p.add_argument("--max-n", type=int, default=16384)
    p.add_argument("--decode-max", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-call-s", type=float, default=30.0)
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"),
                   help="numpy: scratch on NumPy, torch on the CPU; cupy: scratch on CuPy, "
                        "torch on CUDA")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    try:
        xp = get_xp(args.backend)
    except RuntimeError as e:                                  # BackendError: no GPU here
        p.error(str(e))
    sizes = [2 ** e for e in range(int(math.log2(args.min_n)), int(math.log2(args.max_n)) + 1)]
    if xp is np:
        where = "CPU"
        print(f"attention forward, d={D}, batch 1, one head, float32; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
        _fixed_mmap_threshold()
    else:
        torch.backends.cuda.matmul.allow_tf32 = False          # float32 on both sides
        where = torch.cuda.get_device_name()
        print(f"attention forward, d={D}, batch 1, one head, float32; scratch on CuPy "
              f"{xp.__version__}, torch {torch.__version__} on {where}")
    t_start = time.perf_counter()
    rows = sweep(sizes, args.repeat, args.max_call_s, xp)
    points = decode(args.decode_max, xp)
    largest = max(sizes)
    summary = {}
    for side in ("scratch", "torch"):
        for fast, slow in [("linear", "softmax"), ("efficient", "softmax"),
                           ("linear causal", "softmax causal")]:
            a, b = lookup(rows, fast, side), lookup(rows, slow, side)
            n = max(set(a) & set(b))
            summary[f"{side}: {fast} vs {slow}"] = dict(
                crossover_n=crossover(rows, fast, slow, side), at_n=n,
                speedup=b[n]["seconds"] / a[n]["seconds"],
                fast_bytes=a[n]["peak_bytes"], slow_bytes=b[n]["peak_bytes"])
    print(f"\nsummary at n = {largest} (speed-up = softmax time / other time):")
    for key, s in summary.items():
        mem = (f"  memory {s['fast_bytes'] / 2**20:.1f} vs {s['slow_bytes'] / 2**20:.1f} MiB"
               if s["fast_bytes"] is not None and s["slow_bytes"] is not None else "")
        print(f"  {key:<42} crossover n = {s['crossover_n']}, speed-up at n={s['at_n']}: "
              f"{s['speedup']:.1f}x{mem}")
    for variant in ("linear", "linear causal", "efficient", "softmax"):
        got = lookup(rows, variant, "scratch")
        if largest in got and largest // 2 in got and got[largest // 2]["peak_bytes"]:
            ratio = got[largest]["peak_bytes"] / got[largest // 2]["peak_bytes"]
            print(f"  scratch {variant:<14} memory({largest}) / memory({largest // 2}) = "
                  f"{ratio:.2f}  (2 = O(n), 4 = O(n^2))")
    print("\nautoregressive decoding, per-token time (scratch):")
    for pt in points:
        print(f"  {pt['tokens']:>6} tokens: linear state {pt['linear_s'] * 1e6:8.1f} us   "
              f"softmax over cache {pt['softmax_s'] * 1e6:8.1f} us")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "attention.json", "w") as f:
        json.dump(dict(d=D, dtype="float32", rows=rows, summary=summary, decode=points,
                       torch=torch.__version__, threads=torch.get_num_threads(),
                       backend=args.backend, where=where,
                       wall_s=time.perf_counter() - t_start), f, indent=2)
    plot(rows, points, out / "attention.png", where)
    print(f"\nwrote {out / 'attention.json'} and {out / 'attention.png'} "
          f"({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
