#!/usr/bin/env bash
# The GPU suite in one command (see benchmarks/gpu_check.py): install the wheels carried in .whl (the
# device image lacks diffusers and cattrs), run the suite, keep its log beside the results in $OUT.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "fewstep: error: installing the wheels in .whl failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if [ -n "${OUT:-}" ]; then
    "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu-check.log"
else
    "$PY" benchmarks/gpu_check.py "$@"
fi
