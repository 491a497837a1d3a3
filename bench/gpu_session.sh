#!/usr/bin/env bash
# Everything a session with a lent GPU owes, in stages that each fit one device call (10 min):
#
#   bash bench/gpu_session.sh build      # the CUDA extension, in place (~1-2 min)
#   bash bench/gpu_session.sh test       # the whole test suite on the GPU machine (CUDA tests included)
#   bash bench/gpu_session.sh sanitize   # compute-sanitizer memcheck over the CUDA kernel and engine tests
#   bash bench/gpu_session.sh bench      # python -m bench --gpu: all GPU figures (< 8 min on an H100)
#   bash bench/gpu_session.sh all        # build + test + sanitize (then run bench in a second call)
#
# Logs and results go under $OUT (the device tool's folder; default ./gpu_out).  A stage after
# `build` in a later call rebuilds first when the machine is fresh (the extension is missing).
# Then commit $OUT/results/* as bench/results/<gpu-slug>/ and say which checks passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

have_ext() {
    "$PY" -c "import ag_kernels, sys; sys.exit(0 if 'ext' in ag_kernels.available_backends('cuda') else 1)" 2>/dev/null
}

build() {
    echo "== build: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    # --no-deps: keep the machine's own CUDA torch; sm_90 is Hopper (H100/H200).
    AG_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
        "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.log" | tail -5
    "$PY" -c "import ag_kernels; print('backends on cuda:', ag_kernels.available_backends('cuda'))"
    have_ext || { echo "build: the CUDA part of the extension did not load (see $OUT/build.log)"; return 1; }
}

ensure_built() { have_ext || build; }

run_tests() {
    ensure_built || return 1
    echo "== test"
    "$PY" -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -25
}

sanitize() {
    ensure_built || return 1
    command -v compute-sanitizer >/dev/null || { echo "sanitize: compute-sanitizer not found"; return 1; }
    echo "== sanitize (memcheck)"
    compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_ext.py tests/test_engine.py -k "cuda" 2>&1 \
        | tee "$OUT/sanitize.log" | tail -15
}

bench() {
    ensure_built || return 1
    echo "== bench --gpu"
    "$PY" -m bench --gpu --out-dir "$OUT/results" "$@" 2>&1 | tee "$OUT/bench.log" | tail -40
}

stage="${1:-all}"
shift || true
case "$stage" in
    build) build ;;
    test) run_tests ;;
    sanitize) sanitize ;;
    bench) bench "$@" ;;
    all) build && run_tests; sanitize ;;
    *) echo "usage: bash bench/gpu_session.sh {build|test|sanitize|bench|all}" >&2; exit 2 ;;
esac
