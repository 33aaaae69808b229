"""float32 against bf16 autocast for the frozen encoder's forward, side by side.

For each encoder (default: minilm, and mpnet when installed): a synthetic batch of BATCH x LENGTH
tokens, one warm-up forward in each precision, then REPEATS interleaved pairs (the order
alternating), each timed in process CPU time and wall time, on THREADS torch threads; prints
the median and the range of each and the ratio float32 / bf16 (> 1: bf16 is faster).  Then,
with --probe-runs N, N runs of the chooser's own probe (reference.pipeline.autocast.probe, its
PROBE_SHAPE) and their ratios, for the spread its margin must cover.

    python bench/autocast.py [--encoders minilm,mpnet] [--batch 16] [--length 256]
                             [--threads 1] [--repeats 7] [--probe-runs 5] [--json PATH]
"""
import argparse
import json
import os
import statistics
import time

import torch

from reference.pipeline import autocast as ac
from reference.pipeline.encoders import EncoderError, load_encoder


def measure(encoder, batch: int, length: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, encoder.model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    times = {m: {"cpu": [], "wall": []} for m in ("float32", "bf16")}
    for bf16 in (False, True):
        ac._forward(encoder.model, ids, mask, bf16)                      # warm-up
    for r in range(repeats):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            c, w = time.process_time(), time.perf_counter()
            ac._forward(encoder.model, ids, mask, bf16)
            t = times["bf16" if bf16 else "float32"]
            t["cpu"].append(time.process_time() - c)
            t["wall"].append(time.perf_counter() - w)
    out = {}
    for clock in ("cpu", "wall"):
        f, b = times["float32"][clock], times["bf16"][clock]
        out[clock] = {"float32": f, "bf16": b,
                      "ratio_of_medians": statistics.median(f) / statistics.median(b),
                      "pair_ratios": [x / y for x, y in zip(f, b, strict=True)]}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", default=None, help="comma-separated (default minilm[,mpnet])")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--probe-runs", type=int, default=0)
    p.add_argument("--json", help="write every time measured here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    names = a.encoders.split(",") if a.encoders else ["minilm", "mpnet"]
    cpu = ac.cpu_description()
    print(f"{cpu['model']} ({', '.join(cpu['flags']) or 'no bf16 flags'}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, native bf16: "
          f"{ac.bf16_supported('cpu')}; load average {os.getloadavg()[0]:.2f}")
    results = {"cpu": cpu, "torch": torch.__version__, "threads": a.threads,
               "batch": a.batch, "length": a.length, "repeats": a.repeats,
               "loadavg_start": os.getloadavg(), "encoders": {}}
    print(f"{'encoder':8s} {'clock':5s} {'float32 s median [min-max]':>28s} "
          f"{'bf16 s median [min-max]':>26s} {'f32/bf16':>9s} {'pairs [min-max]':>16s}")
    for name in names:
        try:
            enc = load_encoder(name)
        except EncoderError as e:
            print(f"{name}: not available ({e})")
            continue
        r = measure(enc, a.batch, a.length, a.repeats)
        results["encoders"][name] = r
        for clock, m in r.items():
            f, b, pr = m["float32"], m["bf16"], m["pair_ratios"]
            print(f"{name:8s} {clock:5s} {statistics.median(f):10.3f} [{min(f):.3f}-{max(f):.3f}]"
                  f"     {statistics.median(b):10.3f} [{min(b):.3f}-{max(b):.3f}]"
                  f" {m['ratio_of_medians']:9.2f}   [{min(pr):.2f}-{max(pr):.2f}]", flush=True)
        if a.probe_runs:
            runs = [ac.probe(enc) for _ in range(a.probe_runs)]
            results["encoders"][name]["probe"] = runs
            ratios = [x["ratio"] for x in runs]
            print(f"{name:8s} probe {ac.PROBE_SHAPE[0]}x{ac.PROBE_SHAPE[1]} x{a.probe_runs}: "
                  f"f32/bf16 {', '.join(f'{x:.2f}' for x in ratios)} (median "
                  f"{statistics.median(ratios):.2f}; margin {ac.MARGIN})", flush=True)
    results["loadavg_end"] = os.getloadavg()
    print(f"load average at the end {results['loadavg_end'][0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
