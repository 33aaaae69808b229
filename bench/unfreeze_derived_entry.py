"""A ``--unfreeze-top K`` entry computed from a deeper one against one extracted directly, on
real reviews with an installed encoder (off CI: MPNet is too large for it).

    .venv/bin/python bench/unfreeze_derived_entry.py [--encoder mpnet] [--reviews 48]
        [--max-length 256] [--autocast float32|bf16] [--threads 1]

Extracts, for ``--reviews`` stratified IMDB test reviews (seed 2), the K = 2 entry, then the
K = 1 entry from it (:func:`reference.pipeline.features.deeper_entry`: one layer), and, in a
second cache, the K = 1 entry directly (11 of MPNet's 12 layers).  Prints the largest
difference between the two K = 1 entries (both stored float16, so one float16 step at the
features' magnitude is the floor) and the CPU seconds of each extraction.  The caches live in a
temporary folder, removed at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DEFAULT_DATA = "../shared/data/imdb/aclImdb_labelled.tar.gz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("IMDB_PATH", DEFAULT_DATA))
    p.add_argument("--encoder", default="mpnet")
    p.add_argument("--reviews", type=int, default=48)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--autocast", choices=["float32", "bf16"], default="float32")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from reference.pipeline import features as rf
    from reference.pipeline.data import find_imdb, load_imdb, stratified_subset
    from reference.pipeline.encoders import load_encoder

    torch.set_num_threads(a.threads)
    test = load_imdb(find_imdb(a.data), splits=("test",))["test"]
    texts = [test.texts[i] for i in stratified_subset(test.labels, a.reviews, seed=2)]
    encoder = load_encoder(a.encoder)
    root = Path(tempfile.mkdtemp(prefix="derived-entry-"))
    kw = dict(max_length=a.max_length, autocast=a.autocast == "bf16", progress=False,
              batch_tokens=max(4096, a.max_length))
    seconds, stores = {}, {}
    try:
        for name, cache, k in (("K=2", "a", 2), ("K=1 from K=2", "a", 1), ("K=1 direct", "b", 1)):
            t = time.process_time()
            stores[name] = rf.extract_features(encoder, texts, root / cache, unfreeze_top=k, **kw)
            seconds[name] = time.process_time() - t
        derived, direct = stores["K=1 from K=2"], stores["K=1 direct"]
        assert derived.meta["computed_from"]["unfreeze_top"] == 2, derived.meta
        assert "computed_from" not in direct.meta
        diff = max(float(np.max(np.abs(derived.get(i).astype(np.float64) - direct.get(i))))
                   for i in range(len(texts)))
        scale = max(float(np.max(np.abs(direct.get(i)))) for i in range(len(texts)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{a.encoder}, {len(texts)} reviews, {a.max_length} tokens, {a.autocast}, "
          f"{a.threads} thread(s)")
    print(f"K = 1 from K = 2 vs direct: max |difference| {diff:.3g} (largest |feature| "
          f"{scale:.3g}; one float16 step there: {2.0 ** (np.floor(np.log2(scale)) - 10):.3g})")
    print("CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
          + f"; from K = 2 / direct: {seconds['K=1 from K=2'] / seconds['K=1 direct']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
