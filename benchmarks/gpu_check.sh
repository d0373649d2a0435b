#!/usr/bin/env bash
# The 5-minute GPU check of the tli kernels, for one H100/H200, from a bare copy of the repository
# (no compiled extension, PYTHONPATH=.): BENCHMARKS.md says when to run it and what to do with it.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on the GPU machine (budget: 290 s in all)
#   bash benchmarks/gpu_check.sh --cpu-smoke OUT_DIR  # on a CPU: tiny shapes, tests only collected
#
# 1. the machine: nvidia-smi, versions (OUT/env.txt); TRITON_INTERPRET is refused on CUDA
# 2. benchmarks/gpu_check.py: what SDPA runs; the Llama-3-8B and -1B layers against stock,
#    torch.compile, Liger (when importable) and the GEMM+attention reference; generate() tokens/s;
#    the kernels; JSON rewritten after every section (OUT/gpu_check.{json,md}, OUT/gpu_check.log)
# 3. pytest on CUDA: tests/ops tests/modules tests/integrations, then every test marked gpu
#    (OUT/pytest.log), in what is left of the budget
# 4. OUT/summary.txt: exit status and seconds of each step
#
# Liger-Kernel is measured when importable: carry its wheel in .whl/ (see BENCHMARKS.md), it is
# installed into /tmp/site here. Environment: TLI_GIT_COMMIT (the commit, for a copy without .git),
# TLI_CHECK_BUDGET_S (default 290), PYTHON (default python3).
set -u
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; shift; fi
OUT=${1:?usage: gpu_check.sh [--cpu-smoke] OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${TLI_CHECK_BUDGET_S:-290}
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
left() { echo $((BUDGET - ($(date +%s) - START))); }
step() {  # step NAME SECONDS CMD...: run CMD under a hard timeout, record status and seconds
    local name=$1 limit=$2; shift 2
    local t0 rc
    t0=$(date +%s)
    if [ "$limit" -lt 10 ]; then
        echo "$name: skipped, ${limit} s left of ${BUDGET}" | tee -a "$OUT/summary.txt"
        return
    fi
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}
: > "$OUT/summary.txt"

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
else
    if [ -n "${TRITON_INTERPRET:-}" ] && [ "$TRITON_INTERPRET" != 0 ]; then
        echo "gpu_check: unsetting TRITON_INTERPRET=$TRITON_INTERPRET (the kernels must be compiled, not interpreted)"
    fi
    unset TRITON_INTERPRET
    if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (Liger-Kernel): never fetched from a network here
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi

{
    date -u +"%Y-%m-%d %H:%M UTC"
    echo "commit: ${TLI_GIT_COMMIT:-unknown}"
    (nvidia-smi || echo "no nvidia-smi") 2>&1
    "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as m, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for name in ("triton", "transformers", "numpy", "liger-kernel", "flash-attn"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
print("cuda devices:", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# 2. The measurements: most of the budget, leaving ~110 s for the tests.
if [ "$SMOKE" = 1 ]; then
    step benchmarks "$(left)" "$PYTHON" benchmarks/gpu_check.py --smoke --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
else
    BENCH_LIMIT=$(( $(left) - 115 ))
    step benchmarks "$BENCH_LIMIT" "$PYTHON" benchmarks/gpu_check.py --out "$OUT" --budget-s $((BENCH_LIMIT - 15)) \
        2>&1 | tee "$OUT/gpu_check.log"
fi

# 3. The tests on CUDA (on a CPU: only collected, to show the selection holds).
COLLECT=""
if [ "$SMOKE" = 1 ]; then COLLECT="--collect-only"; fi
step "pytest ops/modules/integrations" $(( $(left) - 35 )) "$PYTHON" -m pytest -q -p no:cacheprovider $COLLECT \
    --durations=10 tests/ops tests/modules tests/integrations 2>&1 | tee "$OUT/pytest.log"
step "pytest -m gpu" $(( $(left) - 5 )) "$PYTHON" -m pytest -q -p no:cacheprovider $COLLECT -m gpu tests \
    2>&1 | tee -a "$OUT/pytest.log"

echo "total: $(( $(date +%s) - START )) s of a ${BUDGET} s budget" | tee -a "$OUT/summary.txt"
