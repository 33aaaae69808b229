#!/usr/bin/env bash
# The full run from scratch beside the reference's (off CI): all 25,000 train reviews (17,500 /
# 7,500, seed 3407) and all 25,000 test reviews, MPNet features at 512 tokens read from the cache
# reference.pipeline.features wrote, the assignment's head and recipe, 2 epochs, batch 128.
#
#   nohup bash bench/mpnet_scratch_full.sh > runs/mpnet_scratch_full.log 2>&1 &
#
# Both sides start from the same initial weights (the reference's: torch seeded with 3407, as
# reference.pipeline.train draws them, saved to $OUT/init and given to scratch with --init) and
# run side by side, THREADS threads each (default 1), so that their epoch times are measured
# under the same load.  Each run's process CPU time is printed at its end (/usr/bin/time).
#
# Environment: IMDB_PATH (default ../shared/data/imdb/...), OUT (default runs/mpnet_full_sbs:
# scratch in $OUT/scratch, reference in $OUT/reference), CACHE (default .cache/features),
# THREADS (default 1), PY (default .venv/bin/python).  Extra arguments go to both training
# commands (e.g. --resume after an interruption).  If the test features are still being
# extracted, both commands wait for them after training.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA="${IMDB_PATH:-../shared/data/imdb/aclImdb_labelled.tar.gz}"
OUT="${OUT:-runs/mpnet_full_sbs}"
CACHE="${CACHE:-.cache/features}"
THREADS="${THREADS:-1}"
PY="${PY:-.venv/bin/python}"
COMMON=(--data "$DATA" --encoder mpnet --epochs 2 --batch-size 128 --max-length 512
        --cache "$CACHE" --seed 3407 --no-progress)
mkdir -p "$OUT"

echo "start $(date -u +%FT%TZ) on $(nproc) cores, $THREADS thread(s) per side: $DATA -> $OUT"
if [ ! -f "$OUT/init/model.safetensors" ]; then
  "$PY" - "$OUT/init" <<'PYEOF'
import sys
from pathlib import Path

import torch

from reference.model import GRUHead
from reference.pipeline import checkpoint as rckpt

model = {"emb_dim": 768, "hidden_dim": 256, "output_dim": 1, "n_layers": 2,
         "bidirectional": True, "dropout": 0.25}
torch.manual_seed(3407)                      # as reference.pipeline.train draws its head
rckpt.save_weights(Path(sys.argv[1]), GRUHead(**model), {"encoder": "mpnet", "model": model})
print(f"initial weights: {sys.argv[1]}")
PYEOF
fi

run() {  # name, command...
  local name="$1"; shift
  OMP_NUM_THREADS="$THREADS" /usr/bin/time -f "$name: %U s user, %S s system, %e s wall" \
    "$@" > "$OUT/$name.log" 2>&1
}
run scratch "$PY" -m scratch.pipeline.train "${COMMON[@]}" --out "$OUT/scratch" \
    --init "$OUT/init" "$@" &
run reference "$PY" -m reference.pipeline.train "${COMMON[@]}" --out "$OUT/reference" \
    --device cpu "$@" &
wait
tail -n 3 "$OUT/scratch.log" "$OUT/reference.log"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

for side in ("scratch", "reference"):
    m = json.loads((Path(sys.argv[1]) / side / "metrics.json").read_text())
    for e in m["epochs"]:
        print(f"{side} epoch {e['epoch']}: train {e['train_seconds']:.0f} s, valid "
              f"{e['valid_seconds']:.0f} s, valid acc {e['valid_acc']:.2%}")
    print(f"{side} test acc {m['test_acc']:.2%} (loss {m['test_loss']:.4f}, best epoch "
          f"{m['best_epoch']})")
PYEOF
echo "done $(date -u +%FT%TZ)"
