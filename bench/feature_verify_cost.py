"""What checking a feature-cache entry costs: writes an entry of synthetic float16 features
(MPNet's width, 768) of about GIB GiB under FOLDER, then opens it as a fresh process does
(structure, then every shard's sha256, shards hashed side by side).

    python bench/feature_verify_cost.py FOLDER [GIB] [SHARDS]
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

from scratch.pipeline import features as F


def main():
    root, gib = Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    n_shards = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    length = 300
    k = int(gib * 2**30 / (768 * 2)) // n_shards // length
    ids = [np.zeros(length, np.int64)] * (k * n_shards)
    block = np.random.default_rng(0).standard_normal((length, 768)).astype(np.float16)
    t = time.perf_counter()
    F.extract(root, ids, lambda batch: [block for _ in batch], key="bench",
              meta={"hidden_size": 768}, batch_tokens=length * 256, shard_size=k,
              progress=False)
    size = sum(f.stat().st_size for f in root.glob("shard_*"))
    print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s "
          f"({os.cpu_count()} CPUs)")
    print(F.verify(root))                  # page cache warm: the hashing itself
    F._VERIFIED.clear()
    t = time.perf_counter()
    F.FeatureStore(root, verify=False)
    print(f"structure alone: {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
