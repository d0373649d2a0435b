#!/usr/bin/env bash
# The GPU kernel check and the tests on CUDA, without the quality preset: benchmarks/gpu_window.sh
# --no-quality (see there; BENCHMARKS.md says when to run which).
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke OUT_DIR  # on a CPU: tiny shapes, tests only collected
exec bash "$(dirname "$0")/gpu_window.sh" --no-quality "$@"
