#!/usr/bin/env bash
# Issue 15 on a real GPU, in ONE prepared run of about 8 minutes: CuPy proven against torch on
# CUDA, the fused GRU steps timed against cuDNN, attention up to n = 65,536, and the whole
# assignment (all 50,000 reviews at 512 tokens, two epochs, test accuracy) with wall times.
#
# 1. Here, on the CPU machine, in the checkout the device tool sends:
#        bash bench/gpu_prepare.sh            (builds .whl/ and .gpu/, prints the 64 MiB check)
# 2. The device tool's run call:
#        command:   bash bench/gpu_check.sh
#        carry:     [".whl", ".gpu"]
#        timeout_s: 560
#    The stages' budgets add up to 485 s; each runs under `timeout`, so a slow stage cannot eat
#    the others, and a failed stage does not stop the next.  $OUT gets 8 files (the most that
#    come back), none in subfolders:
#
#    stage        budget  what                                                  $OUT/
#    env            15 s  nvidia-smi; Python, torch, CuPy, NumPy versions;      env.txt
#                         array-api-compat installed from .whl/
#    tests         190 s  pytest -m gpu: every scratch-vs-torch test with CuPy  pytest.xml
#                         arrays against torch on CUDA, float64 and float32 to
#                         the CPU tolerances (hypothesis profile "gpu")
#    gru            80 s  bench/gru.py --backend cupy: scratch fused, scratch   gru.json, gru.png
#                         unfused, torch cuDNN; B128 and B1024, T256, 768->256,
#                         2 layers, bi; forward and forward + backward
#    attention      60 s  bench/attention.py --backend cupy, n = 128 .. 65,536  attention.json,
#                                                                               attention.png
#    assignment    140 s  bench/gpu_assignment.py: features of 50,000 reviews,  assignment.json
#                         2 epochs of the head, test accuracy, time per stage
#    summary              bench/gpu_summary.py: the README's GPU tables, from the JSON files
#    and everything printed, in gpu_check.log.
#
# Smoke run on a CPU (tests/test_gpu_check.py): GPU_CHECK_SMOKE=1 OUT=DIR TRAVEL=DIR PY=python
# runs every stage tiny, with NumPy and torch on the CPU, to prove the plumbing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
SMOKE="${GPU_CHECK_SMOKE:-}"
TRAVEL="${TRAVEL:-.gpu}"
PY="${PY:-python3}"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
unset CUPY_TF32                  # CuPy float32 products in true float32 (TF32 only if set)
T0=$(date +%s)
declare -A STATUS
FAILED=0

run_stage() {   # run_stage NAME BUDGET_SECONDS COMMAND...
    local name=$1 budget=$2
    shift 2
    echo
    echo "=== $name: at most ${budget} s; started $(( $(date +%s) - T0 )) s into the run ==="
    local t=$(date +%s)
    timeout --kill-after=10 "$budget" "$@"
    local rc=$? took=$(( $(date +%s) - t ))
    case $rc in
        0) STATUS[$name]="ok, ${took} s" ;;
        124|137) STATUS[$name]="TIMED OUT after ${budget} s"; FAILED=1 ;;
        *) STATUS[$name]="FAILED (exit $rc) after ${took} s"; FAILED=1 ;;
    esac
    echo "=== $name: ${STATUS[$name]} ==="
}

if [ -n "$SMOKE" ]; then
    export PYTHONPATH="$PWD"
    TESTS=(tests/test_functional.py)
    GRU=(--backend numpy --shapes small --time 4 --repeat 1)
    ATTENTION=(--backend numpy --min-n 64 --max-n 256 --decode-max 16 --repeat 1)
    ASSIGNMENT=(--device cpu --tiny)
else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "wheel install FAILED"
    export PYTHONPATH="/tmp/site:$PWD"
    TESTS=(tests)
    GRU=(--backend cupy --shapes assignment,batch1024 --repeat 3)
    ATTENTION=(--backend cupy --min-n 128 --max-n 65536 --decode-max 8192 --repeat 3)
    ASSIGNMENT=(--device cuda)
fi
XDIST=()
if [ -z "$SMOKE" ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n 4)                 # 4 processes share the GPU; the CPU side is the slow part
fi

env_stage() {
    (nvidia-smi || echo "no nvidia-smi here") 2>&1
    "$PY" - <<'EOF'
import importlib.metadata as md, os, platform, sys
print("python", sys.version.split()[0], platform.machine(), os.cpu_count(), "CPUs")
for name in ("numpy", "torch", "cupy-cuda13x", "cupy-cuda12x", "transformers", "tokenizers",
             "safetensors", "scipy", "hypothesis", "pytest", "pytest-xdist", "array-api-compat"):
    try:
        print(f"{name:18s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18s} -")
import torch
print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "",
      "cuDNN", torch.backends.cudnn.version() if torch.cuda.is_available() else "")
from scratch.backend import backend_name, cupy_usable
print("scratch backend auto ->", backend_name("auto"), "| cupy usable:", cupy_usable())
if cupy_usable():
    import cupy
    rt = cupy.cuda.runtime
    print("cupy", cupy.__version__, "CUDA runtime", rt.runtimeGetVersion(), "driver",
          rt.driverGetVersion(), rt.getDeviceProperties(0)["name"].decode())
EOF
}
echo "=== env ==="
export -f env_stage
export PY
timeout 15 bash -c env_stage | tee "$OUT/env.txt"
STATUS[env]="done"

# -v: one line per test as it ends, so a stage cut by its timeout still shows what passed
run_stage tests 190 env HYPOTHESIS_PROFILE=gpu MINILM_FOLDER="$TRAVEL/encoder-f16" \
    "$PY" -m pytest -m gpu -v --tb=short -rfEs -p no:cacheprovider --timeout 120 "${XDIST[@]}" \
    --junitxml "$OUT/pytest.xml" "${TESTS[@]}"
run_stage gru 80 "$PY" bench/gru.py "${GRU[@]}" --out "$OUT"
run_stage attention 60 "$PY" bench/attention.py "${ATTENTION[@]}" --out "$OUT"
run_stage assignment 140 "$PY" bench/gpu_assignment.py --tokens "$TRAVEL/imdb_tokens.npz" \
    --encoder "$TRAVEL/encoder-f16" "${ASSIGNMENT[@]}" --json "$OUT/assignment.json"

echo
echo "=== summary: $(( $(date +%s) - T0 )) s in all ==="
for s in env tests gru attention assignment; do
    printf '  %-11s %s\n' "$s" "${STATUS[$s]:-not run}"
done
timeout 30 "$PY" bench/gpu_summary.py "$OUT" || echo "(summary failed)"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$FAILED"
