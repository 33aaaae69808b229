#!/usr/bin/env bash
# --unfreeze-top K on the demo subset, both pipelines, several seeds (off CI): how far apart the
# two sides' test accuracies are when only their random draws differ (the seed sets the subset,
# the split, the initial weights and the dropout; scratch starts from the reference run's
# initial weights through --init, so only the dropout masks differ: NumPy's and torch's
# generators).  One run per side and seed, one after the other, one thread each.
#
#   bash bench/unfreeze_seeds.sh                 # K = 1, seeds 3407 1 2 3 4
#   K=2 SEEDS="3407 1" bash bench/unfreeze_seeds.sh
#
# Environment: IMDB_PATH, K (default 1), SEEDS, OUT (default runs/unfreeze_seeds), CACHE
# (default .cache/features), PY (default .venv/bin/python).  Prints one row per seed and the
# mean and spread of the difference (scratch - reference, points).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
DATA="${IMDB_PATH:-../shared/data/imdb/aclImdb_labelled.tar.gz}"
K="${K:-1}"
SEEDS="${SEEDS:-3407 1 2 3 4}"
OUT="${OUT:-runs/unfreeze_seeds}"
CACHE="${CACHE:-.cache/features}"
PY="${PY:-.venv/bin/python}"
SUBSET=(--data "$DATA" --encoder minilm --limit-train 1000 --limit-test 500 --max-length 128
        --batch-size 32 --epochs 2 --unfreeze-top "$K" --cache "$CACHE" --no-progress)

for seed in $SEEDS; do
  dir="$OUT/k$K-seed$seed"
  mkdir -p "$dir"
  if [ ! -f "$dir/reference/metrics.json" ]; then
    "$PY" -m reference.pipeline.train "${SUBSET[@]}" --seed "$seed" --device cpu \
        --out "$dir/reference" > "$dir.reference.log" 2>&1 || { cat "$dir.reference.log"; exit 1; }
  fi
  if [ ! -f "$dir/scratch/metrics.json" ]; then
    "$PY" - "$dir" "$seed" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

from reference.pipeline import checkpoint as rckpt
from reference.top_layers import TopGRUHead
from reference.pipeline.encoders import load_encoder

folder, seed = Path(sys.argv[1]), int(sys.argv[2])
config = json.loads((folder / "reference" / "config.json").read_text())
bert = load_encoder(config["encoder_source"]).model
torch.manual_seed(seed)                    # as reference.pipeline.train draws its model
model = TopGRUHead.from_bert(bert, config["unfreeze_top"], **config["model"])
rckpt.save_weights(folder / "init", model, {**config, "model": config["model"]})
PYEOF
    "$PY" -m scratch.pipeline.train "${SUBSET[@]}" --seed "$seed" --init "$dir/init" \
        --out "$dir/scratch" > "$dir.scratch.log" 2>&1 || { cat "$dir.scratch.log"; exit 1; }
  fi
done

"$PY" - "$OUT" "$K" $SEEDS <<'PYEOF'
import json, sys
from pathlib import Path

import numpy as np

out, k, seeds = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
diffs = []
print(f"K = {k}, demo subset (700 / 300 / 500 test), MiniLM, 128 tokens, 2 epochs")
print("seed    reference   scratch   scratch - reference (points)")
for seed in seeds:
    acc = {side: json.loads((out / f"k{k}-seed{seed}" / side / "metrics.json").read_text())
           ["test_acc"] for side in ("reference", "scratch")}
    diffs.append(100 * (acc["scratch"] - acc["reference"]))
    print(f"{seed:>6}   {acc['reference']:8.2%}  {acc['scratch']:8.2%}   {diffs[-1]:+.2f}")
d = np.array(diffs)
sem = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
print(f"mean difference {d.mean():+.2f} points (standard error {sem:.2f}; "
      f"|difference| from {np.abs(d).min():.2f} to {np.abs(d).max():.2f})")
PYEOF
