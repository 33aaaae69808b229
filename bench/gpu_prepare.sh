#!/usr/bin/env bash
# Run HERE, on the CPU machine, in the checkout the device tool sends (before bench/gpu_check.sh
# runs on the GPU machine): builds what the GPU machine lacks, in two git-ignored folders that
# the `run` call carries, and checks the 64 MiB that may travel.
#
#   bash bench/gpu_prepare.sh          (IMDB_PATH: the archive, default ../shared/...;
#                                       PY: default .venv/bin/python; FORCE=1 rebuilds .gpu/)
#
#   .whl/  array-api-compat as a wheel (scratch.backend imports it; the GPU machine's Python 3.12
#          has torch, CuPy, transformers, ... but not it), the version installed here
#   .gpu/  encoder-f16/      the packaged MiniLM as float16 safetensors + config + tokenizer
#          imdb_tokens.npz   all 50,000 labelled reviews as MiniLM token ids (<= 512 each)
#                            (bench/gpu_travel.py; about 45 s here)
# Then it prints the sizes: git tree + .whl + .gpu must stay within 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DATA="${IMDB_PATH:-../shared/data/imdb/aclImdb_labelled.tar.gz}"
export HF_HUB_OFFLINE=1

for d in .whl .gpu; do
    mkdir -p "$d"
    if ! git check-ignore -q "$d/"; then
        echo "error: $d/ is not git-ignored; it must travel only as a carried folder" >&2
        exit 1
    fi
done

version=$("$PY" -c "import importlib.metadata as m; print(m.version('array-api-compat'))")
rm -f .whl/array_api_compat-*.whl                  # one version only: two stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "array-api-compat==$version"
echo "wheels: $(ls .whl)"

if [ -n "${FORCE:-}" ] || [ ! -f .gpu/imdb_tokens.npz ] || [ ! -f .gpu/encoder-f16/model.safetensors ]; then
    "$PY" bench/gpu_travel.py --out .gpu --data "$DATA"
else
    echo ".gpu/ already built (FORCE=1 rebuilds it)"
fi

echo "what travels with carry [\".whl\", \".gpu\"]:"
"$PY" bench/gpu_travel.py --size .whl .gpu
