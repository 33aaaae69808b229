"""BERT / MPNet encoder benchmark: scratch.bert (NumPy) vs transformers' BertModel / MPNetModel on
the CPU, float32, side by side in one run, one thread each.

    .venv/bin/python bench/bert.py [--shapes 8x128,2x512] [--repeat 5] [--swapped]
                                   [--encoder FOLDER] [--out bench/results]

Each shape ``BxT`` is a batch of B sequences of T tokens of the packaged MiniLM (6 layers,
hidden 384, 12 heads), random token ids (timing does not depend on which words), no padding.
Scratch and torch run alternately ``--repeat`` times (so load on the shared machine hits both
alike); the best wall time and the best CPU time of each are kept; ratio = scratch / torch
(below 1: scratch faster).
``--encoder mpnet`` times the installed all-mpnet-base-v2 instead (softmax only).
``--swapped`` adds Efficient and linear attention in all layers (scratch vs the torch mirror
of :mod:`reference.bert_attention`; BERT encoders only).  Threads: ``BENCH_THREADS`` (default
1) for NumPy's BLAS and torch alike.  Writes ``bert.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)          # before NumPy loads its BLAS

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

torch.set_num_threads(THREADS)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference.bert_attention import swap_attention  # noqa: E402
from reference.pipeline.encoders import load_encoder  # noqa: E402
from scratch.bert import BertEncoder  # noqa: E402
from scratch.pipeline.malloc import reuse_freed_memory  # noqa: E402

VARIANTS = {"softmax": {}, "efficient": dict(attention="efficient"),
            "linear": dict(attention="linear")}


def parse_shapes(text: str):
    try:
        shapes = [tuple(int(n) for n in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 8x128,2x512, got {text!r}")
    return shapes


def side_by_side(scratch_fn, torch_fn, repeat: int):
    """Best wall and best CPU time of each over ``repeat`` alternating calls (CPU time: this
    process's, all threads; with one thread per side it is the wall time minus the time the
    shared machine gave to others), and the last outputs."""
    wall, cpu = [float("inf")] * 2, [float("inf")] * 2
    outs = [None, None]
    for _ in range(repeat):
        for i, fn in enumerate((scratch_fn, torch_fn)):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[i] = fn()
            wall[i] = min(wall[i], time.perf_counter() - t0)
            cpu[i] = min(cpu[i], time.process_time() - c0)
    return wall, cpu, outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/bert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("8x128,2x512"),
                   help="comma-separated BxT (default 8x128,2x512)")
    p.add_argument("--repeat", type=int, default=5, help="alternating runs, best kept")
    p.add_argument("--swapped", action="store_true",
                   help="also time Efficient and linear attention (all layers)")
    p.add_argument("--encoder", default="minilm", help="encoder name or BERT/MPNet folder")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    reuse_freed_memory()                 # as every command runs (scratch.pipeline.cli.run)
    threadpool_limits(THREADS)
    ref = load_encoder(a.encoder)
    model = ref.model.float()
    is_bert = model.config.model_type == "bert"    # the torch mirror swaps BertModel's only
    if a.swapped and not is_bert:
        p.error(f"--swapped needs a BERT encoder, {ref.name} is {model.config.model_type}")
    enc = BertEncoder.from_pretrained(ref.source, dtype="float32", backend="numpy")
    rng = np.random.default_rng(0)
    rows = []
    print(f"threads per side: {THREADS}; best of {a.repeat}; float32; {ref.name}")
    print(f"{'shape':>9} {'attention':>10} {'scratch s':>10} {'torch s':>10} {'ratio':>6} "
          f"{'scratch cpu':>10} {'torch cpu':>10} {'ratio':>6} {'max|diff|':>10}")
    for B, T in a.shapes:
        if T > enc.config.max_position_embeddings:
            p.error(f"T={T} exceeds the encoder's {enc.config.max_position_embeddings} positions")
        ids = rng.integers(1000, enc.config.vocab_size, (B, T))
        mask = np.ones((B, T), dtype=np.int64)
        tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
        for name in (VARIANTS if a.swapped else ["softmax"]):
            if is_bert:
                swap_attention(model, **(VARIANTS[name] or {"attention": "softmax"}))
            ours = enc.with_attention(**VARIANTS[name]) if VARIANTS[name] else enc

            def torch_fn(tids=tids, tmask=tmask):
                with torch.no_grad():
                    return model(tids, attention_mask=tmask).last_hidden_state.numpy()

            (s, t), (sc, tc), (so, to) = side_by_side(partial(ours, ids, mask), torch_fn,
                                                      a.repeat)
            diff = float(np.abs(so - to).max())
            rows.append(dict(B=B, T=T, attention=name, scratch_s=s, torch_s=t, ratio=s / t,
                             scratch_cpu_s=sc, torch_cpu_s=tc, cpu_ratio=sc / tc,
                             max_abs_diff=diff))
            print(f"{B:>4}x{T:<4} {name:>10} {s:>10.4f} {t:>10.4f} {s / t:>6.2f} "
                  f"{sc:>10.4f} {tc:>10.4f} {sc / tc:>6.2f} {diff:>10.2e}")
    if is_bert:
        swap_attention(model, "softmax")
    a.out.mkdir(parents=True, exist_ok=True)
    meta = dict(threads=THREADS, repeat=a.repeat, encoder=ref.name, dtype="float32",
                numpy=np.__version__, torch=torch.__version__, machine=platform.machine(),
                processor=platform.processor())
    (a.out / "bert.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {a.out / 'bert.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
