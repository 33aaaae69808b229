"""Packed GRU: torch's ``pack_padded_sequence`` path vs the fast exact path of
:mod:`reference.model`, side by side in one run (forward + backward of the IMDB head).

    python bench/gru_packing.py [--batch 128] [--steps 275] [--emb 384] [--repeat 3]
                                [--json bench/results/gru_packing.json] [--png ...]

Rows: ``padded`` (nn.GRU over the padded batch: fast but wrong for padded reviews),
``packed`` (torch's packed path: exact, slow on CPU), ``fast exact`` (reference.model.PackedGRU:
exact, the padded kernel).  Two length patterns: ``bucketed`` (lengths within 3% of --steps, as
reference.pipeline.data.bucket_batches gives) and ``spread`` (lengths uniform in [steps/4, steps]).
The largest |fast - packed| over logits and gradients is printed too.  Wall and CPU seconds are
both reported (CPU time, summed over threads, is the steadier one on a shared machine).
Threads: ``BENCH_THREADS`` (default 1), as the other benchmarks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference.model import GRUHead
from reference.timing import bench_threads, best_time, pin_threads

THREADS = pin_threads(bench_threads())


def packed_logits(head: GRUHead, x, lengths):
    """The reference: torch's packed path, then the head's readout."""
    _, hid = head.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    return head.out(head.dropout(torch.cat((hid[-2], hid[-1]), dim=1)))


def step(fn, head, x, lengths):
    head.zero_grad(set_to_none=True)
    y = fn(head, x, lengths)
    y.sum().backward()
    return y.detach(), [p.grad.clone() for p in head.parameters()]


PATHS = {
    "padded": lambda h, x, L: h.out(h.dropout(torch.cat(h.rnn(x)[1][-2:].unbind(0), dim=1))),
    "packed": packed_logits,
    "fast exact": lambda h, x, L: h(x, L),
}


def bench(batch, steps, emb, hidden, repeat, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = GRUHead(emb, hidden, 1, 2, True, 0.25).eval()   # eval: no dropout, outputs comparable
    x = torch.randn(batch, steps, emb, generator=g)
    lo = int(steps * 0.97) if pattern == "bucketed" else steps // 4
    lengths = torch.randint(lo, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    rows, cpu, outs = {}, {}, {}
    for name, fn in PATHS.items():
        outs[name], rows[name], cpu[name] = best_time(lambda fn=fn: step(fn, head, x, lengths),
                                                      repeat, with_cpu=True)
    (yf, gf), (yp, gp) = outs["fast exact"], outs["packed"]
    grad_errs = [float((a - b).abs().max()) for a, b in zip(gf, gp, strict=True)]
    err = max([float((yf - yp).abs().max())] + grad_errs)
    return rows, cpu, err


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=275)
    p.add_argument("--emb", type=int, default=384)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default="bench/results/gru_packing.json")
    p.add_argument("--png", default="bench/results/gru_packing.png")
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {a.batch}, "
          f"{a.steps} steps, {a.emb} -> {a.hidden}, 2-layer BiGRU, forward + backward, "
          f"best of {a.repeat}")
    results = []
    for pattern in ("bucketed", "spread"):
        rows, cpu, err = bench(a.batch, a.steps, a.emb, a.hidden, a.repeat, pattern)
        for name, t in rows.items():
            print(f"{pattern:>9} {name:>11}: {t:7.2f} s wall, {cpu[name]:7.2f} s CPU   "
                  f"({cpu[name] / cpu['fast exact']:5.2f} x fast exact CPU)")
        print(f"{pattern:>9} max |fast exact - packed| (logits, grads): {err:.2e}")
        results.append({"pattern": pattern, "seconds": rows, "cpu_seconds": cpu,
                        "max_abs_err": err})
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), **vars(a)}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(PATHS)
    for i, r in enumerate(results):
        ax.bar([j + 0.4 * i for j in range(len(names))], [r["seconds"][n] for n in names], 0.4,
               label=r["pattern"])
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel("seconds, forward + backward")
    ax.set_title(f"2-layer BiGRU, batch {a.batch}, {a.steps} steps, {a.emb}->{a.hidden}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.png, dpi=120)
    print(f"wrote {a.json}, {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
