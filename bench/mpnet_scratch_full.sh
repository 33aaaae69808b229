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
# THREADS (default 1), PY (default .venv/bin/python), REF_EPOCHS (default 2: the reference's
# epochs; 1 gives the side-by-side epoch time and leaves its core to other work sooner: stop the
# reference once it waits for the test features).  Extra arguments go to both training commands.
# Run the same command again after an interruption: a side that saved an epoch goes on with
# --resume.  If the test features are still being extracted, both commands wait for them after
# training.  The summary goes to $OUT/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA="${IMDB_PATH:-../shared/data/imdb/aclImdb_labelled.tar.gz}"
OUT="${OUT:-runs/mpnet_full_sbs}"
CACHE="${CACHE:-.cache/features}"
THREADS="${THREADS:-1}"
REF_EPOCHS="${REF_EPOCHS:-2}"
PY="${PY:-.venv/bin/python}"
COMMON=(--data "$DATA" --encoder mpnet --batch-size 128 --max-length 512
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
    "$@" >> "$OUT/$name.log" 2>&1
}
resume() {  # the side's saved state -> --resume (unless the arguments have it)
  if [ -f "$1" ] && [[ " $ARGS " != *" --resume "* ]]; then echo --resume; fi
}
ARGS="$*"
run scratch "$PY" -m scratch.pipeline.train "${COMMON[@]}" --epochs 2 --out "$OUT/scratch" \
    --init "$OUT/init" $(resume "$OUT/scratch/last.safetensors") "$@" &
run reference "$PY" -m reference.pipeline.train "${COMMON[@]}" --epochs "$REF_EPOCHS" \
    --out "$OUT/reference" --device cpu $(resume "$OUT/reference/last.pt") "$@" &
wait
tail -n 3 "$OUT/scratch.log" "$OUT/reference.log"
"$PY" - "$OUT" "$THREADS" <<'PYEOF'
import json
import platform
import sys
from pathlib import Path

out, summary = Path(sys.argv[1]), {"threads_per_side": int(sys.argv[2])}
cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
       if line.startswith("model name")]
summary["machine"] = f"{cpu[0] if cpu else platform.processor()}, {len(cpu)} cores"
for side in ("scratch", "reference"):
    path = out / side / "metrics.json"
    if not path.exists():
        print(f"{side}: no metrics.json")
        continue
    m = json.loads(path.read_text())
    summary[side] = {k: m.get(k) for k in ("epochs", "best_epoch", "test_acc", "test_loss")}
    for e in m["epochs"]:
        print(f"{side} epoch {e['epoch']}: train {e['train_seconds']:.0f} s, valid "
              f"{e['valid_seconds']:.0f} s, valid acc {e['valid_acc']:.2%}")
    if "test_acc" in m:
        print(f"{side} test acc {m['test_acc']:.2%} (loss {m['test_loss']:.4f}, best epoch "
              f"{m['best_epoch']})")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
PYEOF
echo "done $(date -u +%FT%TZ)"
