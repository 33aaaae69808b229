"""bench/head.py runs end to end at tiny sizes, on random features and on a feature-cache entry
(its numbers are measured, not asserted: timing is not a test)."""
import json
import sys
from pathlib import Path

import numpy as np

from scratch.pipeline.features import extract

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import head as bench_head  # noqa: E402


def test_head_bench_on_random_and_on_cached_features(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [np.arange(n) for n in rng.integers(3, 12, 30)]

    def encode(batch):                     # a stand-in encoder: (L_i, 8) float16 per review
        return [rng.standard_normal((len(a), 8)).astype(np.float16) for a in batch]

    store = extract(tmp_path / "entry", ids, encode, key="toy", meta={"hidden_size": 8},
                    progress=False)
    common = ["--batch", "4", "--time", "5:11", "--batches", "2", "--hidden", "6"]
    assert bench_head.main(common + ["--emb", "8", "--json", str(tmp_path / "random.json")]) == 0
    assert bench_head.main(common + ["--features", str(store.folder),
                                     "--json", str(tmp_path / "cached.json")]) == 0
    out = capsys.readouterr().out
    assert f"features {store.folder}" in out and "reference flushed" in out
    from reference.pipeline.train import denormals_flushed

    before = denormals_flushed()
    assert bench_head.main(common + ["--emb", "8", "--ftz", "--json",
                                     str(tmp_path / "ftz.json")]) == 0
    assert "flush-to-zero mode on for both sides (--ftz)" in capsys.readouterr().out
    assert denormals_flushed() == before                    # the caller's mode given back
    for name in ("random", "cached"):
        (row,) = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert row["emb"] == 8 and len(row["cpu_ratio_per_batch"]) == 2
        assert row["first_forward_max_rel_diff"] < 1e-4
