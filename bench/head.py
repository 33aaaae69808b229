"""Sentiment-head training steps: scratch (SentimentHead + scratch Adam, NumPy) vs the reference
(GRUHead + torch.optim.Adam), side by side in one run, one thread each.

    python bench/head.py [--emb 384,768] [--batch 128] [--time 200:256] [--batches 3]
                         [--pattern bucketed|spread] [--features ENTRY] [--no-flush] [--ftz]
                         [--json bench/results/head.json]

An epoch-like loop over ``--batches`` batches, float32.  Random features (the default): batch
b has T_b steps drawn from ``--time`` (lo:hi), review lengths either ``bucketed`` (within 3% of
T_b, as reference.pipeline.data.bucket_batches gives) or ``spread`` (uniform in [T_b/4, T_b]),
features zero past each length (as the feature cache pads them).  ``--features ENTRY``: real encoder
features from a feature-cache entry (a folder with ``index.json``,
:class:`scratch.pipeline.features.FeatureStore`; ``--emb`` is then its width): batches of the
reviews whose lengths lie in ``--time``, drawn at random, random labels.  One training step =
forward (dropout on), BCEWithLogits (sum / B), backward, Adam: scratch's ``head.loss_and_grads`` +
``Adam.step``, the reference's ``reference.pipeline.train.run_epoch`` body, inside
``reference.pipeline.train.flush_denormals()`` as ``fit`` runs it (``--no-flush``: without; scratch
flushes in its own backward: the CPU's mode, :mod:`scratch.flush_to_zero`, where it can).  Both
sides start from the same weights; each draws its own dropout masks.  The two sides alternate
batch by batch, so load from other jobs on the machine falls on both alike; the ratio of their
summed CPU times is the number to read, with the spread of the per-batch ratios (wall times are
reported too).
A first eval-mode forward checks that the two heads compute the same logits.

``--ftz`` (a diagnostic): the CPU's flush-to-zero / denormals-are-zero mode set for the whole run
on the thread both sides compute on (``torch.set_flush_denormal(True)``), forward and Adam
included.  It told, on an Intel Xeon, that flushing arrays (:func:`scratch.gru.denormal_flush`,
scratch's only flush then) was not enough: a product of normal numbers can still underflow into
a denormal, and CPUs that take microcode assists for that (Intel; not AMD Zen 3) slow those
element-wise passes down.  Scratch's GRU backward now sets the same mode itself
(:mod:`scratch.flush_to_zero`), so with it the two columns should agree.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference.model import GRUHead  # noqa: E402
from reference.pipeline.train import denormals_flushed, flush_denormals  # noqa: E402
from scratch.optim import Adam  # noqa: E402
from scratch.pipeline.features import FeatureStore  # noqa: E402
from scratch.pipeline.malloc import reuse_freed_memory  # noqa: E402
from scratch.sentiment import SentimentHead  # noqa: E402


def make_batches(n, batch, t_lo, t_hi, emb, pattern, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        T = int(rng.integers(t_lo, t_hi + 1))
        lo = int(T * 0.97) if pattern == "bucketed" else max(1, T // 4)
        lengths = rng.integers(lo, T + 1, batch)
        lengths[rng.integers(batch)] = T
        x = rng.standard_normal((batch, T, emb), dtype=np.float32)
        x[np.arange(T)[None, :] >= lengths[:, None]] = 0
        yield x, lengths, rng.integers(0, 2, batch).astype(np.float32)


def cached_batches(store, n, batch, t_lo, t_hi, seed=0):
    """``n`` batches of ``batch`` reviews of the cache entry ``store`` with lengths in
    [t_lo, t_hi], drawn without replacement; features float32 (B, L_max, E), random labels."""
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero((store.lengths >= t_lo) & (store.lengths <= t_hi))
    if len(pool) < n * batch:
        raise SystemExit(f"{store.folder}: {len(pool)} reviews of {t_lo}-{t_hi} tokens, "
                         f"{n} batches of {batch} need {n * batch}")
    picked = rng.permutation(pool)[:n * batch].reshape(n, batch)
    for rows in picked:
        x, lengths = store.batch(np.sort(rows))
        yield x, lengths, rng.integers(0, 2, batch).astype(np.float32)


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench(emb, a):
    torch.manual_seed(0)
    ref = GRUHead(emb, a.hidden, 1, 2, True, 0.25)
    head = SentimentHead(emb, a.hidden, 1, 2, True, 0.25, dtype="float32", seed=0)
    head.load_state_dict(ref.state_dict())
    topt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    opt = Adam(head.params, lr=1e-3)
    crit = torch.nn.BCEWithLogitsLoss(reduction="sum")

    def scratch_step(x, lengths, y):
        loss, grads, _ = head.loss_and_grads(x, lengths, y)
        opt.step(grads)
        return loss

    def reference_step(x, lengths, y):
        with flush_denormals() if a.flush else contextlib.nullcontext():
            return reference_train_step(x, lengths, y)

    def reference_train_step(x, lengths, y):
        ref.train()
        logits = ref(torch.from_numpy(x), torch.from_numpy(lengths)).squeeze(1)
        loss = crit(logits, torch.from_numpy(y))
        topt.zero_grad()
        (loss / len(y)).backward()
        topt.step()
        return float(loss.detach()) / len(y)

    data = list(cached_batches(a.store, a.batches, a.batch, a.t_lo, a.t_hi) if a.store
                else make_batches(a.batches, a.batch, a.t_lo, a.t_hi, emb, a.pattern))
    x0, l0, _ = data[0]
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x0), torch.from_numpy(l0)).numpy()
    got = head(x0, l0, cache=False)
    check = float(np.abs(got - want).max()) / float(np.abs(want).max())
    sums = {"scratch": [0.0, 0.0], "reference": [0.0, 0.0]}
    losses = {"scratch": [], "reference": []}
    batch_ratios = []
    for i, (x, lengths, y) in enumerate(data):
        cpus = {}
        for side, fn in (("scratch", scratch_step), ("reference", reference_step)):
            loss, wall, cpu = timed(lambda: fn(x, lengths, y))          # noqa: B023
            sums[side][0] += wall
            sums[side][1] += cpu
            cpus[side] = cpu
            losses[side].append(loss)
            print(f"  E={emb} batch {i + 1}/{len(data)} T={x.shape[1]} {side:>9}: "
                  f"{wall:6.2f} s wall {cpu:6.2f} s CPU  loss {loss:.4f}", flush=True)
        batch_ratios.append(cpus["scratch"] / cpus["reference"])
    row = dict(emb=emb, batches=len(data), tokens=int(sum(int(L.sum()) for _, L, _ in data)),
               scratch_s=sums["scratch"][0], reference_s=sums["reference"][0],
               scratch_cpu_s=sums["scratch"][1], reference_cpu_s=sums["reference"][1],
               ratio=sums["scratch"][0] / sums["reference"][0],
               cpu_ratio=sums["scratch"][1] / sums["reference"][1],
               cpu_ratio_per_batch=batch_ratios, first_forward_max_rel_diff=check,
               losses=losses)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emb", default="384,768", help="comma-separated feature sizes")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--time", default="200:256", help="lo:hi, T_b drawn per batch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--pattern", default="bucketed", choices=("bucketed", "spread"))
    p.add_argument("--features", metavar="ENTRY",
                   help="a feature-cache entry (folder with index.json): real features")
    p.add_argument("--no-flush", dest="flush", action="store_false",
                   help="the reference without flush_denormals (fit flushes)")
    p.add_argument("--ftz", action="store_true",
                   help="diagnostic: the CPU's flush-to-zero mode on for both sides, all run")
    p.add_argument("--json", default="bench/results/head.json")
    a = p.parse_args(argv)
    reuse_freed_memory()                 # as every command runs (scratch.pipeline.cli.run)
    a.t_lo, a.t_hi = (int(v) for v in a.time.split(":"))
    a.store = FeatureStore(a.features) if a.features else None
    if a.store:
        a.emb = str(a.store.hidden_size)
    torch.set_num_threads(1)
    ftz_before = denormals_flushed()
    torch.set_flush_denormal(a.ftz or ftz_before)
    try:
        rows = run(a)
    finally:
        torch.set_flush_denormal(ftz_before)                    # as the caller had it
    return report(rows, a)


def run(a) -> list[dict]:
    rows = []
    with threadpool_limits(1):
        print(f"torch {torch.__version__}, numpy {np.__version__}, 1 thread per side; batch "
              f"{a.batch}, T in [{a.t_lo}, {a.t_hi}] ({a.pattern}), hidden {a.hidden}, 2-layer "
              f"BiGRU, dropout 0.25, float32; forward + BCE + backward + Adam; features "
              f"{a.features or 'random'}; reference {'flushed' if a.flush else 'unflushed'}"
              + ("; flush-to-zero mode on for both sides (--ftz)" if a.ftz else ""),
              flush=True)
        for emb in (int(e) for e in a.emb.split(",")):
            rows.append(bench(emb, a))
    return rows


def report(rows: list[dict], a) -> int:
    print(f"\n{'E':>4} {'batches':>7} {'scratch s':>10} {'reference s':>12} {'ratio':>6} "
          f"{'CPU ratio':>9} {'per batch (min-max)':>19} {'logit diff':>10}")
    for r in rows:
        per = r["cpu_ratio_per_batch"]
        print(f"{r['emb']:>4} {r['batches']:>7} {r['scratch_s']:>10.2f} {r['reference_s']:>12.2f} "
              f"{r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f} {min(per):>9.2f}-{max(per):<9.2f} "
              f"{r['first_forward_max_rel_diff']:>10.1e}")
    meta = {"torch": torch.__version__, "numpy": np.__version__, "threads": 1,
            **{k: v for k, v in vars(a).items() if k != "store"}}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
