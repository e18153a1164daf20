#!/usr/bin/env bash
# Everything that needs a real GPU, in one call of the device tool:
#   scripts/gpu-check.sh [STAGE...]   stages: tests profiler kernels train decode (default: all)
# Writes logs and run folders under $OUT (default ./gpu-out), packed as $OUT/<stage>.tgz so that
# each run folder (measurements.csv, meta.json, power_trace.csv, phases.csv, plot.png) comes back.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests profiler kernels train decode)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.sm --format=csv | tee "$OUT/gpu.txt"
RUNS="$OUT/runs"
mkdir -p "$RUNS"
status=0
for stage in "${STAGES[@]}"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case "$stage" in
    tests)
      timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25 || status=1 ;;
    profiler)
      timeout "${STAGE_TIMEOUT:-300}" python3 scripts/profiler_check.py --out "$RUNS/profiler-check.csv" 2>&1 | tee "$OUT/profiler-check.log" || status=1 ;;
    kernels)
      timeout "${STAGE_TIMEOUT:-300}" python3 scripts/bench_kernels.py --out "$RUNS/bench-kernels.csv" 2>&1 | tee "$OUT/bench-kernels.log" || status=1 ;;
    train)
      timeout "${STAGE_TIMEOUT:-600}" python3 -m mmprof train-memory --size "${TRAIN_SIZE:-1.3b}" --seq 2048 --batch "${TRAIN_BATCH:-1,2,4,8,16,32}" \
        --estimate --out "$RUNS/train-memory" 2>&1 | tee "$OUT/train-memory.log" || status=1
      python3 -m mmprof plot "$RUNS/train-memory" --out "$RUNS/train-memory/plot.png" || status=1 ;;
    decode)
      timeout "${STAGE_TIMEOUT:-600}" python3 -m mmprof decode-power --size "${DECODE_SIZES:-370m,1.3b,2.7b}" \
        --new-tokens "${DECODE_TOKENS:-256}" --out "$RUNS/decode-power" 2>&1 \
        | tee "$OUT/decode-power.log" || status=1
      python3 -m mmprof plot "$RUNS/decode-power" --out "$RUNS/decode-power/plot.png" || status=1 ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
tar czf "$OUT/runs.tgz" -C "$RUNS" . && rm -rf "$RUNS"
exit $status
