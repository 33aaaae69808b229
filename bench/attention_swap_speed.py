"""Encoder speed against sequence length: the pretrained MiniLM with softmax, Efficient and linear
attention in every layer, scratch (NumPy) and torch (transformers + the registered swapped
attention of :mod:`reference.bert_attention`) side by side in one run.

    .venv/bin/python bench/attention_swap_speed.py [--lengths 128,256,512,1024,2048,4096]
        [--batch 1] [--repeat 5] [--variants all] [--max-call-s 60] [--out bench/results]

Float32, one thread per side (``BENCH_THREADS``), batch ``--batch`` of random token ids (the
time does not depend on which words), no padding.  Beyond the 512 learned positions the
position table is *tiled* (position p uses row p mod 512), so the whole encoder is timed at
every length: embeddings, six layers of projections, attention, feed-forward and LayerNorms
(the outputs past 512 mean nothing; the cost is the real one).  For each length and
attention: the best wall time and the best CPU time of ``--repeat`` alternating calls per side
(one call when the first took over a CPU second), and the peak extra resident memory of the
first call (Linux: ``/proc/self/clear_refs`` then ``VmHWM`` - RSS before, as
``bench/attention.py``).
A variant whose call took longer than ``--max-call-s`` is not run at larger lengths.

Crossover, on CPU time (one thread per side: the work done, steady on a shared machine whose
other jobs stretch the wall time; the wall-time crossover is recorded beside it): per side and
variant, the smallest measured length from which the variant is faster than softmax at every
longer measured length, and the length where the time ratio crosses 1, interpolated on log-log
axes between the two measured lengths around it.  Writes ``attention_swap_speed.json`` and
``attention_swap_speed.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention import _fixed_mmap_threshold, peak_extra_bytes
from reference.bert_attention import swap_attention
from reference.pipeline.encoders import load_encoder
from reference.timing import bench_threads, pin_threads
from scratch.bert import BertEncoder
from scratch.bert_folder import BertConfig, read_weights

THREADS = pin_threads(bench_threads())
POSITIONS = "embeddings.position_embeddings.weight"
VARIANTS = {"softmax": {},
            "efficient-softmax": dict(attention="efficient", normalization="softmax"),
            "efficient-scaling": dict(attention="efficient", normalization="scaling"),
            "linear-alpha1": dict(attention="linear", alpha=1.0),
            "linear-alpha0.1": dict(attention="linear", alpha=0.1)}
SIDES = ("scratch", "torch")


def tile_positions(table: np.ndarray, n: int) -> np.ndarray:
    """(P, H) position table -> (n, H): row p is ``table[p mod P]``."""
    return np.ascontiguousarray(table[np.arange(n) % table.shape[0]])


def tiled_encoders(name: str, n: int):
    """(scratch BertEncoder, torch BertModel, learned positions) of encoder ``name`` with (at
    least) ``n`` positions tiled from its table, float32, frozen, eval mode."""
    from transformers import BertModel

    ref = load_encoder(name)
    cfg = BertConfig.from_folder(Path(ref.source))
    weights = read_weights(Path(ref.source), cfg)
    learned = cfg.max_position_embeddings
    n = max(n, learned)
    weights[POSITIONS] = tile_positions(weights[POSITIONS], n)
    enc = BertEncoder(dataclasses.replace(cfg, max_position_embeddings=n), weights,
                      "float32", xp=np)
    config = ref.model.config
    config.max_position_embeddings = n
    model = BertModel(config, add_pooling_layer=False).eval().requires_grad_(False)
    state = dict(ref.model.state_dict())
    state[POSITIONS] = torch.from_numpy(weights[POSITIONS])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise RuntimeError(f"tiled model: missing {missing}, unexpected {unexpected}")
    return enc, model.float(), learned


def timed_calls(calls: dict, repeat: int, enough: float = 1.0) -> dict:
    """{side: {seconds, cpu_seconds, peak_bytes, out}}: each side's first call is timed and its
    peak extra memory measured; then up to ``repeat - 1`` alternating rounds (none once every
    first call took ``enough`` CPU seconds), the best wall and the best CPU time kept (CPU time
    of this process: with one thread per side, the work itself, whatever else the machine
    runs)."""
    got = {}
    for side, fn in calls.items():
        box, c0 = [], time.process_time()
        seconds, mem = peak_extra_bytes(lambda fn=fn, box=box: box.append(fn()))
        got[side] = {"seconds": seconds, "cpu_seconds": time.process_time() - c0,
                     "peak_bytes": mem, "out": box[0]}
    for _ in range(repeat - 1):
        if min(g["cpu_seconds"] for g in got.values()) >= enough:
            break
        for side, fn in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            got[side]["out"] = fn()
            g = got[side]
            g["seconds"] = min(g["seconds"], time.perf_counter() - t0)
            g["cpu_seconds"] = min(g["cpu_seconds"], time.process_time() - c0)
    return got


def sweep(enc, model, lengths, batch, variants, repeat, max_call_s):
    rows, stopped = [], set()
    rng = np.random.default_rng(0)
    warm = rng.integers(1000, enc.config.vocab_size, (batch, lengths[0]))
    enc(warm)                                  # first calls set up libraries: not measured
    with torch.no_grad():
        model(torch.from_numpy(warm))
    for n in lengths:
        ids = rng.integers(1000, enc.config.vocab_size, (batch, n))
        tids = torch.from_numpy(ids)
        for name in variants:
            sides = [s for s in SIDES if (name, s) not in stopped]
            if not sides:
                continue
            swap_attention(model, **(VARIANTS[name] or {"attention": "softmax"}))
            ours = enc.with_attention(**VARIANTS[name]) if VARIANTS[name] else enc

            def torch_fn(tids=tids):
                with torch.no_grad():
                    return model(tids).last_hidden_state.numpy()

            def scratch_fn(ours=ours, ids=ids):
                return ours(ids)

            fns = {"scratch": scratch_fn, "torch": torch_fn}
            got = timed_calls({s: fns[s] for s in sides}, repeat)
            diff = (float(np.abs(got["scratch"]["out"] - got["torch"]["out"]).max())
                    if len(got) == 2 else None)
            for side, g in got.items():
                seconds, mem = g["seconds"], g["peak_bytes"]
                rows.append(dict(variant=name, side=side, n=n, batch=batch, seconds=seconds,
                                 cpu_seconds=g["cpu_seconds"], peak_bytes=mem,
                                 max_abs_diff=diff))
                print(f"  n={n:>5} {name:<18} {side:<8} {seconds:>9.3f} s wall "
                      f"{g['cpu_seconds']:>9.3f} s CPU {(mem or 0) / 2**20:>9.1f} MiB", flush=True)
                if seconds > max_call_s:
                    stopped.add((name, side))
    swap_attention(model, "softmax")
    return rows


def lookup(rows, variant, side, clock="cpu_seconds"):
    return {r["n"]: r[clock] for r in rows if r["variant"] == variant and r["side"] == side}


def crossover(rows, variant, side, clock="cpu_seconds"):
    """(smallest measured n from which ``variant`` beats softmax at every longer measured n,
    the n where the time ratio crosses 1 interpolated log-log, ratio softmax/variant per n),
    on ``clock``: cpu_seconds (default) or seconds (wall)."""
    a, b = lookup(rows, variant, side, clock), lookup(rows, "softmax", side, clock)
    ns = sorted(set(a) & set(b))
    ratio = {n: b[n] / a[n] for n in ns}
    grid = next((n for i, n in enumerate(ns) if all(ratio[m] > 1 for m in ns[i:])), None)
    interp = None                       # None: not faster at the longest n, or already at the first
    if grid is not None and grid != ns[0]:
        lo, hi = ns[ns.index(grid) - 1], grid
        r0, r1 = math.log(ratio[lo]), math.log(ratio[hi])          # r0 <= 0 < r1
        interp = round(math.exp(math.log(lo) + math.log(hi / lo) * -r0 / (r1 - r0)))
    return grid, interp, ratio


def plot(rows, variants, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    styles = {"scratch": "-o", "torch": "--s"}
    for k, name in enumerate(variants):
        for side in SIDES:
            got = sorted((r["n"], r["cpu_seconds"], r["peak_bytes"]) for r in rows
                         if r["variant"] == name and r["side"] == side)
            if not got:
                continue
            ns = [g[0] for g in got]
            kw = dict(color=f"C{k}", ms=4, label=f"{name} ({side})")
            axes[0].loglog(ns, [g[1] for g in got], styles[side], **kw)
            if all(g[2] for g in got):
                axes[1].loglog(ns, [g[2] / 2**20 for g in got], styles[side], **kw)
            if name != "softmax":
                ratio = {int(m): r for m, r in summary[side][name]["ratio"].items()}
                axes[2].semilogx(sorted(ratio), [ratio[m] for m in sorted(ratio)], styles[side],
                                 **kw)
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[0].set(xlabel="sequence length (tokens)", ylabel="encoder forward CPU time (s)",
                title="MiniLM forward, float32, 1 thread")
    axes[1].set(xlabel="sequence length (tokens)", ylabel="peak extra memory (MiB)",
                title="memory of one forward")
    axes[2].set(xlabel="sequence length (tokens)", ylabel="softmax CPU time / variant's",
                title="speed-up over softmax (> 1: faster)")
    lengths = sorted({r["n"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parse_lengths(text: str) -> list[int]:
    try:
        ns = sorted({int(s) for s in text.split(",")})
    except ValueError:
        ns = []
    if not ns or ns[0] < 2:
        raise argparse.ArgumentTypeError(f"lengths must look like 128,256,512 (each >= 2), "
                                         f"got {text!r}")
    return ns


def parse_variants(text: str) -> list[str]:
    names = list(VARIANTS) if text == "all" else text.split(",")
    if bad := [n for n in names if n not in VARIANTS]:
        raise argparse.ArgumentTypeError(f"unknown variants {bad}: use all or some of "
                                         f"{', '.join(VARIANTS)}")
    return ["softmax"] + [n for n in names if n != "softmax"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/attention_swap_speed.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=parse_lengths,
                   default=parse_lengths("128,256,512,1024,2048,4096"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5, help="alternating calls, best kept")
    p.add_argument("--variants", type=parse_variants, default=list(VARIANTS))
    p.add_argument("--max-call-s", type=float, default=60.0)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    if a.batch < 1 or a.repeat < 1:
        p.error("--batch and --repeat must be >= 1")
    _fixed_mmap_threshold()
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    enc, model, learned = tiled_encoders(a.encoder, max(a.lengths))
    print(f"{a.encoder} forward, float32, batch {a.batch}, {THREADS} thread(s) per side, best "
          f"of {a.repeat}; positions beyond {learned} tiled")
    rows = sweep(enc, model, a.lengths, a.batch, a.variants, a.repeat, a.max_call_s)
    summary = {side: {} for side in SIDES}
    for side in SIDES:
        for name in a.variants[1:]:
            grid, interp, ratio = crossover(rows, name, side)
            wall_grid, _, wall_ratio = crossover(rows, name, side, "seconds")
            summary[side][name] = dict(crossover_n=grid, crossover_interpolated_n=interp,
                                       ratio={str(n): r for n, r in ratio.items()},
                                       wall_crossover_n=wall_grid,
                                       wall_ratio={str(n): r for n, r in wall_ratio.items()})
            print(f"  {side:<8} {name:<18} beats softmax (CPU time) from n = {grid} "
                  f"(interpolated {interp}; wall time: from {wall_grid}); speed-up at "
                  f"n = {max(ratio)}: {ratio[max(ratio)]:.2f}x")
    a.out.mkdir(parents=True, exist_ok=True)
    meta = dict(encoder=a.encoder, dtype="float32", batch=a.batch, threads=THREADS,
                repeat=a.repeat,
                positions=f"tiled beyond the {learned} learned (row p mod {learned})",
                torch=torch.__version__, numpy=np.__version__, machine=platform.machine(),
                cpus=os.cpu_count(), loadavg_start=load0, loadavg_end=os.getloadavg(),
                wall_s=round(time.perf_counter() - t0, 1),
                cpu_s=round(time.process_time() - c0, 1))
    with open(a.out / "attention_swap_speed.json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1)
    plot(rows, a.variants, summary, a.out / "attention_swap_speed.png")
    print(f"wrote {a.out / 'attention_swap_speed.json'} and {a.out / 'attention_swap_speed.png'}"
          f" ({meta['wall_s']:.0f} s wall, {meta['cpu_s']:.0f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
