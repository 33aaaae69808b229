#!/usr/bin/env bash
# The full IMDB run (off CI): all 25,000 train reviews (17,500 train / 7,500 valid, seed 3407)
# and all 25,000 test reviews, the packaged MiniLM encoder, 2 epochs, batch 128, 512 tokens,
# on this machine's CPU.  Reproduces the README's results row:
#
#   nohup bash bench/imdb_full.sh > runs/imdb_full.log 2>&1 &
#
# Environment: IMDB_PATH (archive or aclImdb folder; default ../shared/data/imdb/...),
# OUT (default runs/imdb_full), CACHE (feature cache root, default .cache/features),
# ENCODER (default minilm), PY (default .venv/bin/python).  Extra arguments go to
# reference.pipeline.train (e.g. --unfreeze-top 1).  Run the same command again after an
# interruption: features already in CACHE are reused (a partial entry resumes at its first
# missing shard), and a run that saved its state ($OUT/last.pt: after each epoch and every 10
# training batches, --save-every 10) goes on with --resume from there.  If
# another process is still extracting the features, reference.pipeline.train waits for it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA="${IMDB_PATH:-../shared/data/imdb/aclImdb_labelled.tar.gz}"
OUT="${OUT:-runs/imdb_full}"
CACHE="${CACHE:-.cache/features}"
ENCODER="${ENCODER:-minilm}"
PY="${PY:-.venv/bin/python}"

echo "start $(date -u +%FT%TZ) on $(nproc) cores: $DATA -> $OUT (cache $CACHE)"
RESUME=()
if [ -f "$OUT/last.pt" ] && [[ " $* " != *" --resume "* ]]; then
  RESUME=(--resume)
  echo "resuming the run saved in $OUT"
fi
"$PY" -m reference.pipeline.train --data "$DATA" --encoder "$ENCODER" --epochs 2 --batch-size 128 \
    --max-length 512 --out "$OUT" --cache "$CACHE" --device cpu --seed 3407 --save-every 10 \
    "${RESUME[@]}" "$@"
echo "cache size: $(du -sh "$CACHE" | cut -f1) ($CACHE)"
"$PY" -m reference.pipeline.predict --checkpoint "$OUT" \
    "This film is terrible, the worst two hours of my life." \
    "This film is great, I loved every minute of it."
"$PY" - "$OUT/metrics.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
for e in m["epochs"]:
    print(f"epoch {e['epoch']}: train {e['train_seconds']:.0f} s, valid {e['valid_seconds']:.0f} s, "
          f"valid acc {e['valid_acc']:.2%}")
print(f"test acc {m['test_acc']:.2%} (loss {m['test_loss']:.4f}, best epoch {m['best_epoch']}), "
      f"features {m['feature_seconds']} s, total {m['total_seconds']:.0f} s")
PYEOF
echo "done $(date -u +%FT%TZ)"
