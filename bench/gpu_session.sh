#!/usr/bin/env bash
# Everything a lent GPU is for, in ONE call of at most 8 minutes (480 s of stage limits):
#
#   bash bench/gpu_session.sh             # the five stages below, in priority order
#   bash bench/gpu_session.sh --dry-run   # print the stages and their limits, check the plumbing, run nothing
#
#   1 env         GPU name, driver, torch, triton, nvcc, compute-sanitizer
#   2 build       the extension in place with its CUDA part (a failure is logged; the rest runs on Triton)
#   3 cuda_tests  python -m pytest -m cuda on every test file with a test marked cuda (CI runs the CPU ones)
#   4 bench       python -m bench --gpu (about 4 minutes) -> $OUT/bench/results/<gpu-slug>/
#   5 memcheck    compute-sanitizer memcheck on the kernel tests, with the time left
#
# Each stage runs under its own `timeout` and writes its log under $OUT as it goes ($OUT is the
# device tool's folder; default ./gpu_out): what a stage stopped at its limit had finished is kept
# (test lines, bench rows), and $OUT/session.tsv gets one row per stage (limit, seconds, exit status).
# Then commit $OUT/bench/results/<gpu-slug>/ as bench/results/<gpu-slug>/ and say which checks passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
SCRIPT="$REPO/bench/gpu_session.sh"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
# Triton 3.9 fuses multiply-adds by default (3.10 will not): the session pins fusion on, as nvcc's default
# (-fmad=true) does for the extension; the GPU tests' tolerances allow for it (docs/gpu.md).
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

#: The device budget of one call: the stage limits below sum to at most this.
BUDGET=480
#: Stages in priority order: name, limit in seconds ("rest": what the earlier stages left, at least MEMCHECK_MIN).
#: The build compiles one translation unit per op (csrc/cuda/*_cuda.cu) in parallel (ninja, MAX_JOBS=16):
#: its longest unit, not the sum, sets the time (see docs/gpu.md for the figures measured without a GPU).
STAGES=(env:15 build:90 cuda_tests:120 bench:225 memcheck:rest)
MEMCHECK_MIN=30
#: Stage 3 runs every test file that holds a test marked cuda (found by pytest -m cuda --collect-only: a
#: new CUDA test is run without editing this script).  These go first when they hold one: the graph paths
#: of the engine and the solvers and the multistep op have never run on a GPU.
CUDA_TEST_FIRST=(tests/test_engine.py tests/test_solvers.py tests/test_multistep_op.py tests/test_ext.py)
#: Memcheck: the kernel tests only (graph capture needs the caching allocator, which memcheck runs without),
#: not the 2^31-element test or the large sizes (minutes under the sanitizer).
MEMCHECK_FILES=(tests/test_ext.py tests/test_ops.py tests/test_multistep_op.py)
MEMCHECK_DESELECT="not graph_capture and not 64bit and not large"

describe() {
    case "$1" in
        env) echo "GPU name, driver, torch, triton, nvcc, compute-sanitizer -> env.txt" ;;
        build) echo "AG_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} $PY setup.py build_ext --inplace; on failure go on with Triton" ;;
        cuda_tests) echo "$PY -m pytest -m cuda FILES -v, FILES: every test file with a test marked cuda, ${CUDA_TEST_FIRST[*]} first (log line by line, cuda_tests.xml)" ;;
        bench) echo "$PY -m bench --gpu --out-dir \$OUT/bench/results/<gpu-slug> (rows.jsonl row by row; summarized if stopped)" ;;
        memcheck) echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --report-api-errors no on ${MEMCHECK_FILES[*]} -m cuda -k '$MEMCHECK_DESELECT'" ;;
    esac
}

cuda_home() {
    "$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null
}

find_tool() {  # a CUDA tool on PATH, else in $CUDA_HOME/bin, else in /usr/local/cuda/bin
    local tool=$1 home
    command -v "$tool" 2>/dev/null && return 0
    home="${CUDA_HOME:-$(cuda_home)}"
    for dir in "$home/bin" /usr/local/cuda/bin; do
        [ -n "$dir" ] && [ -x "$dir/$tool" ] && { echo "$dir/$tool"; return 0; }
    done
    return 1
}

collect_cuda_tests() {  # pytest -m cuda --collect-only -q over tests/: one node id a line, then the summary
    "$PY" -m pytest tests -m cuda --collect-only -q -p no:cacheprovider 2>&1
}

cuda_test_files() {  # the files of the node ids read on stdin: CUDA_TEST_FIRST's first, then as collected
    local ids first f
    ids=$(grep -o '^tests/[^:]*\.py::' | sed 's/::$//' | awk '!seen[$0]++')
    first=$(printf '%s\n' "${CUDA_TEST_FIRST[@]}")
    for f in "${CUDA_TEST_FIRST[@]}"; do
        grep -qxF "$f" <<< "$ids" && echo "$f"
    done
    grep -vxF "$first" <<< "$ids"
}

gpu_slug() {
    "$PY" -c "from bench.conftest import device_slug; print(device_slug('cuda'))"
}

# ----------------------------------------------------------------------------- the stages (run as children)

stage_env() {
    # One Python process (one torch import) reports everything, the CUDA tools included.
    { nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "nvidia-smi failed"
      "$PY" - <<'EOF'
import importlib.util, os, platform, shutil, subprocess, torch
from torch.utils.cpp_extension import CUDA_HOME
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu 0:", p.name, f"{p.total_memory / 2**30:.0f} GiB", "L2", getattr(p, "L2_cache_size", "?"), "bytes")
try:
    import triton
    print("triton", triton.__version__, "| TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION"))
except Exception as exc:
    print("triton not importable:", exc)
print("ninja", "yes" if importlib.util.find_spec("ninja") else "no (the build compiles one file at a time)")


def find(tool):  # as find_tool in bench/gpu_session.sh: PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin
    for path in (shutil.which(tool), *(os.path.join(d, "bin", tool) for d in (CUDA_HOME, "/usr/local/cuda") if d)):
        if path and os.access(path, os.X_OK):
            return path
    return None


nvcc = find("nvcc")
version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip() if nvcc else ""
print("nvcc:", version.splitlines()[-1] if version else "not found")
print("compute-sanitizer:", find("compute-sanitizer") or "not found")
EOF
    } 2>&1 | tee "$OUT/env.txt"
}

stage_build() {
    # sm_90 is Hopper (H100/H200); MAX_JOBS: the device machine has 16 cores.
    AG_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" setup.py build_ext --inplace
    "$PY" -c "import ag_kernels; print('backends on cuda:', ag_kernels.available_backends('cuda'))"
    "$PY" -c "import ag_kernels, sys; sys.exit(0 if 'ext' in ag_kernels.available_backends('cuda') else 1)" && return 0
    echo "build: the CUDA part of the extension did not load; the later stages run with Triton (ext cases skip)"
    return 1
}

stage_cuda_tests() {
    local files
    mapfile -t files < <(collect_cuda_tests | cuda_test_files)
    if [ ${#files[@]} -eq 0 ]; then
        echo "cuda_tests: pytest -m cuda collected no test:"
        collect_cuda_tests | tail -n 20
        return 1
    fi
    echo "cuda_tests: ${files[*]}"
    "$PY" -m pytest -m cuda "${files[@]}" -v -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
}

stage_bench() {
    local limit=$1 slug dir rc
    slug=$(gpu_slug) || return 1
    dir="$OUT/bench/results/$slug"
    mkdir -p "$dir"
    # 25 s of the stage are kept for summarizing what finished if the run is stopped.
    timeout -k 3 $((limit - 25)) "$PY" -m bench --gpu --out-dir "$dir"
    rc=$?
    if [ ! -f "$dir/results.json" ] || [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        if [ -s "$dir/rows.jsonl" ]; then
            echo "bench: stopped (exit $rc); summarizing the rows that finished"
            "$PY" bench/report.py --rows "$dir/rows.jsonl" --out-dir "$dir" \
                --incomplete "python -m bench --gpu stopped at the session's time limit (exit $rc)" > /dev/null
        fi
    fi
    return $rc
}

stage_memcheck() {
    local san
    san=$(find_tool compute-sanitizer) || { echo "memcheck: compute-sanitizer not found on PATH, in \$CUDA_HOME/bin or /usr/local/cuda/bin"; return 1; }
    # Without the caching allocator every tensor is its own allocation, so an access past its end is caught.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --report-api-errors no --error-exitcode 99 \
        --print-limit 20 "$PY" -m pytest -m cuda "${MEMCHECK_FILES[@]}" -k "$MEMCHECK_DESELECT" -q -x -p no:cacheprovider
}

if [ "${1:-}" = "--stage" ]; then
    mkdir -p "$OUT"
    "stage_$2" "${3:-0}"
    exit $?
fi

# ----------------------------------------------------------------------------- the plan

limits_sum=0
for entry in "${STAGES[@]}"; do
    limit=${entry#*:}
    [ "$limit" = rest ] && limit=$MEMCHECK_MIN
    limits_sum=$((limits_sum + limit))
done
if [ $limits_sum -gt $BUDGET ]; then
    echo "gpu_session: the stage limits sum to $limits_sum s, over the budget of $BUDGET s" >&2
    exit 2
fi

print_plan() {
    local i=0 name limit
    for entry in "${STAGES[@]}"; do
        i=$((i + 1)); name=${entry%%:*}; limit=${entry#*:}
        if [ "$limit" = rest ]; then
            printf 'stage %d %-10s limit: the time left of %d s (at least %d s): %s\n' $i "$name" $BUDGET $MEMCHECK_MIN "$(describe "$name")"
        else
            printf 'stage %d %-10s limit %3d s: %s\n' $i "$name" "$limit" "$(describe "$name")"
        fi
    done
    echo "sum of the limits: at most $BUDGET s (fixed stages $((limits_sum - MEMCHECK_MIN)) s + memcheck >= $MEMCHECK_MIN s)"
}

if [ "${1:-}" = "--dry-run" ]; then
    echo "gpu_session: dry run: nothing runs; results would go to $OUT"
    print_plan
    ok=1
    command -v timeout > /dev/null && echo "plumbing: timeout found" || { echo "plumbing: timeout NOT found"; ok=0; }
    "$PY" -c "import torch, ag_kernels; print('plumbing: torch', torch.__version__, '| ag_kernels imports | CUDA', torch.cuda.is_available())" \
        || { echo "plumbing: python cannot import torch and ag_kernels"; ok=0; }
    listing=$(collect_cuda_tests)
    collected=$(tail -n 1 <<< "$listing")
    case "$collected" in
        *" collected"*) echo "plumbing: stage 3 selects ${collected%% in *}" ;;
        *) echo "plumbing: pytest -m cuda does not collect: $collected"; ok=0 ;;
    esac
    echo "plumbing: stage 3 runs these files in this order (tests marked cuda in each):"
    while read -r f; do
        printf '  %s (%d)\n' "$f" "$(grep -c "^$f::" <<< "$listing")"
    done < <(cuda_test_files <<< "$listing")
    for f in "${MEMCHECK_FILES[@]}"; do
        grep -q "^$f::" <<< "$listing" || { echo "plumbing: memcheck file $f holds no test marked cuda"; ok=0; }
    done
    "$PY" -m bench --help > /dev/null && echo "plumbing: python -m bench --help ok" || { echo "plumbing: python -m bench fails"; ok=0; }
    "$PY" bench/report.py --help | grep -q -- "--rows" && echo "plumbing: bench/report.py --rows ok" \
        || { echo "plumbing: bench/report.py has no --rows"; ok=0; }
    san=$(find_tool compute-sanitizer) && echo "plumbing: compute-sanitizer at $san" \
        || echo "plumbing: compute-sanitizer not found here (stage 5 looks on PATH, in \$CUDA_HOME/bin and /usr/local/cuda/bin)"
    [ $ok -eq 1 ] && { echo "dry run ok"; exit 0; }
    echo "dry run FAILED"
    exit 1
fi
if [ $# -gt 0 ]; then
    echo "usage: bash bench/gpu_session.sh [--dry-run]" >&2
    exit 2
fi

# ----------------------------------------------------------------------------- the run

mkdir -p "$OUT"
start=$SECONDS
printf 'stage\tname\tlimit_s\tseconds\texit\n' > "$OUT/session.tsv"
print_plan | tee "$OUT/plan.txt"
i=0
for entry in "${STAGES[@]}"; do
    i=$((i + 1)); name=${entry%%:*}; limit=${entry#*:}
    if [ "$limit" = rest ]; then
        limit=$((BUDGET - (SECONDS - start)))
        if [ $limit -lt $MEMCHECK_MIN ]; then
            echo "== stage $i $name: skipped, ${limit} s left"
            printf '%d\t%s\t%d\t0\tskipped\n' $i "$name" "$limit" >> "$OUT/session.tsv"
            continue
        fi
    fi
    log="$OUT/$i-$name.log"
    echo "== stage $i $name (limit $limit s) -> $log"
    t0=$SECONDS
    # 3 s of the limit are the grace between TERM and KILL, so the stage ends within its limit.
    timeout -k 3 $((limit - 3)) bash "$SCRIPT" --stage "$name" "$((limit - 3))" > "$log" 2>&1
    rc=$?
    printf '%d\t%s\t%d\t%d\t%d\n' $i "$name" "$limit" $((SECONDS - t0)) $rc >> "$OUT/session.tsv"
    case $rc in
        0) echo "   ok in $((SECONDS - t0)) s" ;;
        124|137) echo "   stopped at its limit after $((SECONDS - t0)) s (what finished is in the log)" ;;
        *) echo "   exit $rc after $((SECONDS - t0)) s" ;;
    esac
    tail -n 6 "$log" | sed 's/^/   | /'
done
echo "== done in $((SECONDS - start)) s; stages:"
column -t "$OUT/session.tsv" 2>/dev/null || cat "$OUT/session.tsv"
