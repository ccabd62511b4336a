#!/usr/bin/env bash
# The GPU benchmark on the lent GPU machine (one H200): install the carried wheels, then python3 -m bench.gpu into $OUT.
#   run: command "bash bench/gpu.sh --budget 480", carry [".whl"], timeout_s 600; options go to bench/gpu.py
# The image has torch with CUDA but not deepspeed, hjson, pydantic, datasets' dill and multiprocess: they travel as
# wheels in .whl (git-ignored; `make gpu-wheels` makes them), installed into /tmp/site (kept while the machine stays
# warm).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/polyak-gpu-out}
mkdir -p "$out"
if [ ! -f /tmp/site/.polyak-wheels ] || [ "$(ls .whl)" != "$(cat /tmp/site/.polyak-wheels)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the wheels in .whl failed (carry [\".whl\"])"; exit 1; }
  ls .whl > /tmp/site/.polyak-wheels
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
exec python3 -m bench.gpu --out "$out" "$@"
