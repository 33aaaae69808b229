"""The feature cache's format, torch-free: both pipelines read (and write) the same entries.

A frozen encoder's output for a review never changes, so it is computed once and stored::

    CACHE_ROOT/<key>/plan.json                     what the shards will hold (written first)
    CACHE_ROOT/<key>/shard_00000.safetensors ...   features (sum L_i, H) float16,
                                                   lengths (k,) int64, index (k,) int64
    CACHE_ROOT/<key>/index.json                    written last: the entry is complete

Shard ``s`` holds the reviews ``index`` (positions in the list of texts the entry was made
for), their token features one after the other (review ``index[j]`` has ``lengths[j]`` rows:
[CLS] first, [SEP] last).  :class:`FeatureStore` maps review ``i`` to its rows without reading
them (``safetensors`` slices are memory-mapped).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open


class FeatureStore:
    """Read-only view of a complete cache: review ``i`` -> float16 (L_i, H), memory-mapped."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{self.folder}: no index.json, the cache is not complete")
        self.meta = json.loads(index_file.read_text())
        self.hidden_size = int(self.meta["hidden_size"])
        n = int(self.meta["n"])
        self.lengths = np.zeros(n, dtype=np.int64)
        self._where = np.full((n, 2), -1, dtype=np.int64)       # (shard, row offset)
        self._shards = []
        for s, fname in enumerate(self.meta["shards"]):
            f = safe_open(str(self.folder / fname), framework="numpy")
            lengths, index = f.get_tensor("lengths"), f.get_tensor("index")
            self.lengths[index] = lengths
            self._where[index, 0] = s
            self._where[index, 1] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self._shards.append(f.get_slice("features"))
        self.wait_seconds = 0.0          # set by extract_features: time spent behind another writer
        if (self._where[:, 0] < 0).any():
            raise ValueError(f"{self.folder}: corrupt cache, some reviews have no features")

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> np.ndarray:
        """Token features of review ``i``: float16 (L_i, H), [CLS] first, [SEP] last."""
        s, off = self._where[i]
        return self._shards[s][int(off):int(off + self.lengths[i])]

    def batch(self, indices, dtype=np.float32):
        """Zero-padded ``x`` (B, L_max, H) of ``dtype`` and ``lengths`` (B,) int64 for reviews
        ``indices`` (NumPy arrays)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        x = np.zeros((len(indices), int(lengths.max()), self.hidden_size), dtype=dtype)
        for b, i in enumerate(indices):
            x[b, :lengths[b]] = self.get(i)
        return x, lengths
