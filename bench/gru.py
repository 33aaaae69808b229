"""GRU benchmark: scratch (NumPy) vs ``torch.nn.GRU`` on the CPU, side by side in one run; or,
with ``--backend cupy``, scratch on CuPy vs torch's cuDNN GRU on the GPU.

    .venv/bin/python bench/gru.py [--shapes assignment,small] [--repeat 1] [--time T]
                                  [--no-packed] [--backend numpy|cupy] [--out bench/results]
    .venv/bin/python bench/gru.py --ab REV [--shapes assignment] [--repeat 7] [--time T]

Shapes: ``assignment``, the BERT-BiGRU head (batch 128, time 256, 768 -> 256, 2 layers,
bidirectional, float32); ``batch1024``, the same at batch 1024; ``small`` (batch 16, time 32,
32 -> 32, 2 layers, bidirectional).
For each: forward (torch under ``no_grad``) and forward + backward (all parameter gradients and
dx), without lengths, and with lengths (uniform in [T/4, T], unsorted: torch goes through
``pack_padded_sequence(enforce_sorted=False)``, scratch through ``lengths=``).  Best of
``--repeat`` wall times; ratio = scratch / torch (below 1: scratch faster); GFLOP/s counts the
matrix products only (2 m n k each; backward = 2x forward) over the *valid* steps, so with
lengths they count the useful work.  Threads: ``BENCH_THREADS`` (default 1) for NumPy's BLAS
and torch alike; the machine is shared, so absolute times are noisy and the side-by-side ratios
are what matter.  Writes ``gru.json`` and ``gru.png`` under ``--out``.

``--backend cupy``: every timed call ends with a device synchronisation (CuPy's and torch's), and
each scratch row is timed twice, with the fused step kernels (:mod:`scratch.gru`, the default:
``scratch_s``) and without them (``scratch_unfused_s``; ``fused_vs_unfused`` is the largest
difference of the two results relative to their scale).

``--ab REV``: A/B of two versions of scratch's GRU in one process.  ``scratch/`` as of the git
revision REV (``git archive``: gru.py and everything it imports) is imported as a package of
its own beside this working tree's ``scratch``; the two GRUs (same weights) and torch's run
forward (inference) and forward + backward without lengths, interleaved: every repeat times
each of the three once, in an order rotated from repeat to repeat, in CPU seconds of the one
thread (``time.thread_time``).  The ratios are paired within a repeat (working tree / REV,
working tree / torch, REV / torch); the table gives their median, min-max and a bootstrap 95%
interval of the median (resampling the repeats).  Writes ``gru_ab.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reference.gru import run_packed, torch_gru_like  # noqa: E402
from reference.timing import bench_threads, best_time, pin_threads  # noqa: E402
from scratch import gru as gru_module  # noqa: E402
from scratch.backend import get_xp, to_numpy  # noqa: E402
from scratch.gru import GRU  # noqa: E402
from scratch.pipeline.malloc import reuse_freed_memory  # noqa: E402

THREADS = pin_threads(bench_threads())

SHAPES = {
    "assignment": dict(batch=128, time=256, input_size=768, hidden_size=256, num_layers=2),
    "batch1024": dict(batch=1024, time=256, input_size=768, hidden_size=256, num_layers=2),
    "small": dict(batch=16, time=32, input_size=32, hidden_size=32, num_layers=2),
}


def gru_flops(s, steps_total, backward=False):
    """Matrix-product FLOPs of a bidirectional GRU over ``steps_total`` (sequence, step) pairs:
    per layer and direction 2 * steps * 3H * (I_k + H); the backward costs twice that."""
    H, D = s["hidden_size"], 2
    f = 0
    for k in range(s["num_layers"]):
        i_k = s["input_size"] if k == 0 else D * H
        f += D * 2 * steps_total * 3 * H * (i_k + H)
    return f * (3 if backward else 1)


def synchronized(fn, xp, device):
    """``fn`` followed by waiting for the GPU work it queued (CuPy's and torch's), so that a
    wall time covers the work and not only its launch; ``fn`` itself on the CPU."""
    if xp is np and device == "cpu":
        return fn

    def call(*args):
        out = fn(*args)
        if xp is not np:
            xp.cuda.Device().synchronize()
        if device != "cpu":
            torch.cuda.synchronize()
        return out
    return call


def bench_shape(name, s, repeat, packed=True, quiet=False, xp=np, device="cpu"):
    rng = np.random.default_rng(0)
    B, T = s["batch"], s["time"]
    gru = GRU(s["input_size"], s["hidden_size"], s["num_layers"], batch_first=True,
              bidirectional=True, dtype="float32", seed=0, xp=xp)
    ref = torch_gru_like(gru, device=device).eval()
    x = rng.standard_normal((B, T, s["input_size"])).astype(np.float32)
    d_out = rng.standard_normal((B, T, 2 * s["hidden_size"])).astype(np.float32)
    lengths = rng.integers(max(1, T // 4), T + 1, B)
    lengths[rng.integers(B)] = T
    xt, dt = torch.from_numpy(x).to(device), torch.from_numpy(d_out).to(device)
    if xp is not np:
        x, d_out = xp.asarray(x), xp.asarray(d_out)

    def torch_fwd(L):
        with torch.no_grad():
            return run_packed(ref, xt, None, L)[0]

    def torch_fwd_bwd(L):
        xg = xt.clone().requires_grad_()
        ref.zero_grad(set_to_none=True)
        out, _ = run_packed(ref, xg, None, L)
        out.backward(dt)
        return xg.grad

    def scratch_fwd(L):                     # inference: nothing kept for a backward
        return gru(x, lengths=L, cache=False)[0]

    def scratch_fwd_bwd(L):
        gru(x, lengths=L)
        return gru.backward(d_out)[0]

    rows = []
    cases = [("no lengths", None)] + ([("lengths (torch packed)", lengths)] if packed else [])
    for case, L in cases:
        steps = B * T if L is None else int(np.sum(L))
        for kind, s_fn, t_fn, bwd in (("forward", scratch_fwd, torch_fwd, False),
                                      ("fwd+bwd", scratch_fwd_bwd, torch_fwd_bwd, True)):
            s_call, t_call = synchronized(s_fn, xp, device), synchronized(t_fn, xp, device)
            s_out, s_t = best_time(partial(s_call, L), repeat)
            t_out, t_t = best_time(partial(t_call, L), repeat)
            s_out, t_out = to_numpy(s_out), to_numpy(t_out)
            flops = gru_flops(s, steps, backward=bwd)
            scale = max(1.0, float(np.abs(t_out).max()))
            row = dict(shape=name, case=case, pass_=kind, scratch_s=s_t, torch_s=t_t,
                       ratio=s_t / t_t, scratch_gflops=flops / s_t / 1e9,
                       torch_gflops=flops / t_t / 1e9,
                       max_rel_err=float(np.abs(s_out - t_out).max()) / scale)
            if xp is not np:                # the same scratch call without the fused kernels
                gru_module.FUSED = False
                try:
                    u_out, u_t = best_time(partial(s_call, L), repeat)
                finally:
                    gru_module.FUSED = True
                row.update(scratch_unfused_s=u_t, fused_speedup=u_t / s_t,
                           fused_vs_unfused=float(np.abs(s_out - to_numpy(u_out)).max()) / scale)
            rows.append(row)
            if not quiet:
                print(format_row(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# --ab REV: two versions of scratch's GRU, side by side.
# --------------------------------------------------------------------------------------------

def scratch_at(rev):
    """The ``scratch`` package as of git revision ``rev``, imported under a name of its own
    (``scratch_at_<rev>``) from a temporary folder, beside this working tree's ``scratch``."""
    name = "scratch_at_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(["git", "archive", rev, "scratch"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench_gru_ab_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "scratch").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{name}.gru")


def bootstrap_median(values, n=2000, seed=0):
    """A 95% bootstrap interval of the median of ``values`` (resampled with replacement)."""
    v = np.asarray(values)
    rng = np.random.default_rng(seed)
    medians = np.median(v[rng.integers(0, len(v), (n, len(v)))], axis=1)
    return float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def ab_compare(rev, name, s, repeat):
    """Working tree vs ``rev`` vs torch at shape ``s``: {pass: {pair: [paired ratios]}}."""
    old = scratch_at(rev)
    rng = np.random.default_rng(0)
    B, T = s["batch"], s["time"]
    args = (s["input_size"], s["hidden_size"], s["num_layers"])
    new_gru = GRU(*args, batch_first=True, bidirectional=True, dtype="float32", seed=0)
    old_gru = old.GRU(*args, batch_first=True, bidirectional=True, dtype="float32", seed=0)
    old_gru.load_state_dict(new_gru.state_dict())
    ref = torch_gru_like(new_gru).eval()
    x = rng.standard_normal((B, T, s["input_size"])).astype(np.float32)
    d_out = rng.standard_normal((B, T, 2 * s["hidden_size"])).astype(np.float32)
    xt, dt = torch.from_numpy(x), torch.from_numpy(d_out)

    def torch_fwd():
        with torch.no_grad():
            return ref(xt)[0].numpy()

    def torch_fwd_bwd():
        xg = xt.clone().requires_grad_()
        ref.zero_grad(set_to_none=True)
        ref(xg)[0].backward(dt)
        return xg.grad.numpy()

    def scratch_calls(gru):
        def fwd_bwd():
            gru(x)
            return gru.backward(d_out)[0]
        return lambda: gru(x, cache=False)[0], fwd_bwd

    sides = {"working": scratch_calls(new_gru), rev: scratch_calls(old_gru),
             "torch": (torch_fwd, torch_fwd_bwd)}
    for k, (fwd, fwd_bwd) in sides.items():              # warm-up; results agree
        for want, got in ((sides["torch"][0](), fwd()), (sides["torch"][1](), fwd_bwd())):
            err = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
            assert err < 1e-4, f"{k}: {err:.1e} from torch"
    times = {p: {k: [] for k in sides} for p in ("forward", "fwd+bwd")}
    names = list(sides)
    for i in range(repeat):
        for k in names[i % 3:] + names[:i % 3]:                   # rotated order
            for p, fn in zip(("forward", "fwd+bwd"), sides[k], strict=True):
                c0 = time.thread_time()
                fn()
                times[p][k].append(time.thread_time() - c0)
        print(f"  repeat {i + 1}/{repeat}: " + "  ".join(
            f"{p} " + " ".join(f"{k} {times[p][k][-1]:.2f}" for k in names) for p in times),
            flush=True)
    pairs = (("working", rev), ("working", "torch"), (rev, "torch"))
    rows = []
    for p in times:
        for a, b in pairs:
            r = np.array(times[p][a]) / np.array(times[p][b])
            lo, hi = bootstrap_median(r)
            rows.append(dict(shape=name, pass_=p, pair=f"{a} / {b}", median=float(np.median(r)),
                             min=float(r.min()), max=float(r.max()), ci95=[lo, hi],
                             ratios=r.tolist(), seconds_a=times[p][a], seconds_b=times[p][b]))
    return rows


def main_ab(a):
    rows = []
    for name in a.shapes.split(","):
        s = dict(SHAPES[name]) | ({"time": a.time} if a.time else {})
        print(f"{name}: {s}, {a.repeat} repeats, CPU seconds of one thread")
        rows += ab_compare(a.ab, name, s, a.repeat)
    print(f"\n{'shape':<11} {'pass':<8} {'pair':<26} {'median':>6} {'min-max':>11} "
          f"{'95% CI of median':>16}")
    for r in rows:
        print(f"{r['shape']:<11} {r['pass_']:<8} {r['pair']:<26} {r['median']:>6.3f} "
              f"{r['min']:>5.2f}-{r['max']:<5.2f} {r['ci95'][0]:>7.3f}-{r['ci95'][1]:<7.3f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(threads=THREADS, torch=torch.__version__, numpy=np.__version__, rev=a.ab,
                repeat=a.repeat, shapes={n: SHAPES[n] | ({"time": a.time} if a.time else {})
                                         for n in a.shapes.split(",")})
    (out / "gru_ab.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out / 'gru_ab.json'}")
    return 0


HEAD = (f"{'shape':<11} {'case':<23} {'pass':<8} {'scratch s':>9} {'torch s':>9} {'ratio':>6} "
        f"{'scratch GF/s':>12} {'torch GF/s':>10} {'rel err':>8}")
HEAD_GPU = HEAD + f" {'unfused s':>9} {'fused gain':>10} {'fused-unf':>9}"


def format_row(r):
    line = (f"{r['shape']:<11} {r['case']:<23} {r['pass_']:<8} {r['scratch_s']:>9.3f} "
            f"{r['torch_s']:>9.3f} {r['ratio']:>6.2f} {r['scratch_gflops']:>12.1f} "
            f"{r['torch_gflops']:>10.1f} {r['max_rel_err']:>8.1e}")
    if "scratch_unfused_s" in r:
        line += (f" {r['scratch_unfused_s']:>9.3f} {r['fused_speedup']:>9.2f}x"
                 f" {r['fused_vs_unfused']:>9.1e}")
    return line


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']}\n{r['case']}\n{r['pass_']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.7 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("scratch time / torch time")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="assignment,small",
                   help="comma-separated, of: " + ", ".join(SHAPES))
    p.add_argument("--repeat", type=int, default=1, help="timing repeats, best kept")
    p.add_argument("--time", type=int, help="override the time length of every shape")
    p.add_argument("--no-packed", action="store_true", help="skip the lengths / packed rows")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"),
                   help="numpy: scratch on NumPy vs torch on the CPU; cupy: scratch on CuPy "
                        "(fused and unfused steps) vs torch's cuDNN GRU")
    p.add_argument("--ab", metavar="REV",
                   help="A/B: this working tree's scratch GRU vs the one at git revision REV "
                        "(and torch), interleaved, CPU time")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    reuse_freed_memory()                 # as every command runs (scratch.pipeline.cli.run)
    unknown = [n for n in a.shapes.split(",") if n not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}: use {', '.join(SHAPES)}")
    if a.ab:
        if a.backend != "numpy":
            p.error("--ab compares on NumPy only")
        return main_ab(a)
    try:
        xp = get_xp(a.backend)
    except RuntimeError as e:                                  # BackendError: no GPU here
        p.error(str(e))
    device = "cpu" if xp is np else "cuda"
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False                # float32 on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        where = f"GPU {torch.cuda.get_device_name()}, cupy {xp.__version__}"
    else:
        where = f"threads: {THREADS}"
    print(f"{where}  torch {torch.__version__}  numpy {np.__version__}")
    head = HEAD if xp is np else HEAD_GPU
    print(head)
    print("-" * len(head))
    bench_shape("warm-up", dict(SHAPES["small"], time=4), 1, quiet=True, xp=xp,
                device=device)                                 # first-call set-up, compiles
    rows = []
    for name in a.shapes.split(","):
        s = dict(SHAPES[name])
        if a.time:
            s["time"] = a.time
        repeat = max(a.repeat, 5) if name == "small" else a.repeat    # small: cheap, noisy
        rows += bench_shape(name, s, repeat, packed=not a.no_packed, xp=xp, device=device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(threads=THREADS, torch=torch.__version__, numpy=np.__version__,
                backend=a.backend, where=where,
                shapes={n: SHAPES[n] | ({"time": a.time} if a.time else {})
                        for n in a.shapes.split(",")}, repeat=a.repeat)
    (out / "gru.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    title = (f"scratch GRU vs torch.nn.GRU, CPU, {THREADS} thread(s), float32" if xp is np
             else f"scratch GRU (CuPy, fused steps) vs torch cuDNN GRU, {where}, float32")
    plot(rows, out / "gru.png", title)
    print(f"wrote {out / 'gru.json'} and {out / 'gru.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
