#!/usr/bin/env bash
# Everything that needs a real GPU, in one call of the device tool:
#   scripts/gpu-check.sh [STAGE...]   stages: tests profiler kernels train w2a8 decode (default: all);
#                                     decode is decode-packed decode-ctx2048 decode-reference, each a stage too
#                                     and multi (torchrun on several GPUs; MULTI_GPUS, MULTI_SIZES, MULTI_BATCH, MULTI_STEPS,
#                                     MULTI_DECODE_SIZES ('' skips decoding); not in the default)
# Writes run folders and logs beside $OUT (in $OUT.runs; OUT defaults to ./gpu-out) and packs them
# into $OUT/runs.tgz after every stage: the one file that comes back (the device tool returns at most
# 8 files from $OUT), also when the call is stopped at its time limit.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests profiler kernels train w2a8 decode)
RUNS="${RUNS_DIR:-${OUT%/}.runs}"  # outside $OUT: only the archive is to come back
LOGS="$RUNS/logs"
mkdir -p "$LOGS"
# SKIP_INSTALL=1: the caller installed mmprof already (several copies of this script running at once)
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 \
  || { cat "$LOGS/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.sm --format=csv | tee "$LOGS/gpu.txt"
status=0
pack() {  # the archive of everything so far, replaced whole (a call stopped mid-way keeps the last one)
  tar czf "$OUT/runs.tgz.part" -C "$RUNS" . && mv "$OUT/runs.tgz.part" "$OUT/runs.tgz"
}
part_of() { [ "$stage" = decode ] || [ "$stage" = "$1" ]; }  # STAGE: asked for, alone or within decode
decode_run() {  # NAME ARGS...: one decode-power run folder, its log and its plot
  local name="$1"; shift
  timeout "${STAGE_TIMEOUT:-600}" python3 -m mmprof decode-power "$@" --out "$RUNS/$name" 2>&1 \
    | tee "$LOGS/$name.log" || status=1
  python3 -m mmprof plot "$RUNS/$name" --out "$RUNS/$name/plot.png" || status=1
}
for stage in "${STAGES[@]}"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case "$stage" in
    tests)
      # PYTEST_ARGS: test paths to limit the run to (default: all). A first run compiles and autotunes every
      # kernel configuration, on the CPU, one test at a time: about 15 min on an H200 host in one process.
      # PYTEST_SHARDS (default 8) processes share the GPU, each taking every N-th test id, so the
      # compiles run side by side (129 tests in 2.5 min on an H200 host); each writes its own log, and the
      # named failures are gathered at the end. The profiler's tests measure idle and load power on
      # the real NVML, so they run alone afterwards, on a GPU nothing else is using.
      shards="${PYTEST_SHARDS:-8}"
      # shellcheck disable=SC2086
      python3 -m pytest -m gpu -q --collect-only -p no:cacheprovider ${PYTEST_ARGS:-} 2>/dev/null | grep '::' >"$LOGS/pytest-ids.txt"
      grep '^tests/profiler/' "$LOGS/pytest-ids.txt" >"$LOGS/pytest-ids-quiet.txt"
      grep -v '^tests/profiler/' "$LOGS/pytest-ids.txt" >"$LOGS/pytest-ids-shared.txt"
      echo "$(wc -l <"$LOGS/pytest-ids.txt") GPU tests: $(wc -l <"$LOGS/pytest-ids-shared.txt") in $shards shards, then $(wc -l <"$LOGS/pytest-ids-quiet.txt") alone"
      pids=()
      for ((i = 0; i < shards; i++)); do
        awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' "$LOGS/pytest-ids-shared.txt" >"$LOGS/pytest-ids-$i.txt"
        # shellcheck disable=SC2046
        timeout "${STAGE_TIMEOUT:-540}" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider $(cat "$LOGS/pytest-ids-$i.txt") \
          >"$LOGS/pytest-gpu-$i.log" 2>&1 &
        pids+=($!)
      done
      for pid in "${pids[@]}"; do wait "$pid" || status=1; done
      if [ -s "$LOGS/pytest-ids-quiet.txt" ]; then
        # shellcheck disable=SC2046
        timeout "${STAGE_TIMEOUT:-540}" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider $(cat "$LOGS/pytest-ids-quiet.txt") \
          >"$LOGS/pytest-gpu-quiet.log" 2>&1 || status=1
      fi
      for log in "$LOGS"/pytest-gpu-*.log; do echo "--- $(basename "$log" .log): $(tail -1 "$log")"; done | tee "$LOGS/pytest-gpu.log"
      grep -h '^FAILED\|^ERROR' "$LOGS"/pytest-gpu-*.log | tee -a "$LOGS/pytest-gpu.log" ;;
    profiler)
      # shellcheck disable=SC2086  # PROFILER_ARGS: more options of profiler_check.py (e.g. --log-rounds)
      timeout "${STAGE_TIMEOUT:-300}" python3 scripts/profiler_check.py --out "$RUNS/profiler-check.csv" ${PROFILER_ARGS:-} 2>&1 | tee "$LOGS/profiler-check.log" || status=1 ;;
    kernels)
      timeout "${STAGE_TIMEOUT:-300}" python3 scripts/bench_kernels.py --out "$RUNS/bench-kernels.csv" 2>&1 | tee "$LOGS/bench-kernels.log" || status=1 ;;
    train)
      timeout "${STAGE_TIMEOUT:-600}" python3 -m mmprof train-memory --size "${TRAIN_SIZE:-1.3b}" --seq 2048 --batch "${TRAIN_BATCH:-1,2,4,8,16,32}" \
        --estimate --out "$RUNS/train-memory" 2>&1 | tee "$LOGS/train-memory.log" || status=1
      python3 -m mmprof plot "$RUNS/train-memory" --out "$RUNS/train-memory/plot.png" || status=1 ;;
    w2a8)
      timeout "${STAGE_TIMEOUT:-300}" python3 scripts/bench_w2a8.py --sizes "${DECODE_SIZES:-1.3b,2.7b,13b}" \
        --out "$RUNS/bench-w2a8.csv" 2>&1 | tee "$LOGS/bench-w2a8.log" || status=1
      timeout "${STAGE_TIMEOUT:-300}" python3 scripts/profile_packed_step.py --sizes "${PROFILE_SIZES:-1.3b,13b}" --launch both \
        --out "$RUNS/profile-packed-step.csv" 2>&1 | tee "$LOGS/profile-packed-step.log" || status=1 ;;
    decode|decode-packed|decode-ctx2048|decode-reference)
      # decode-packed: both models decoded carefully (CUDA graphs; packed ternary weights, bf16 Transformer++)
      if part_of decode-packed; then
        decode_run decode-power-packed --size "${DECODE_SIZES:-1.3b,2.7b,13b}" --weights packed \
          --new-tokens "${DECODE_TOKENS:-256}"
      fi
      # decode-ctx2048: 13b packed with a 2048-token context: prompt 1792 + 256 new tokens
      if part_of decode-ctx2048; then
        decode_run decode-power-13b-ctx2048 --size 13b --arch mmfree --weights packed --prompt-len 1792 --new-tokens 256
      fi
      # decode-reference: the reference's way at 1.3b, fake-quant bf16 weights, eager and graphed
      if part_of decode-reference; then
        decode_run decode-power-eager --size 1.3b --weights fake-quant --no-graph --new-tokens "${EAGER_TOKENS:-64}"
        decode_run decode-power-fake-quant-graph --size 1.3b --arch mmfree --weights fake-quant \
          --new-tokens "${DECODE_TOKENS:-256}"
      fi ;;
    multi)
      # torchrun over MULTI_GPUS GPUs (default: all): FSDP2 train-memory per size with and without activation
      # checkpointing, beside its per-rank estimate on meta; then data-parallel decoding, one replica per GPU
      NGPU="${MULTI_GPUS:-$(nvidia-smi -L | wc -l)}"
      TORCHRUN=(python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU")
      for size in ${MULTI_SIZES:-2.7b 13b}; do
        ARGS=(--size "$size" --shard fsdp --arch mmfree,transformer --bitlinear fused --batch "${MULTI_BATCH:-1,2}"
              --seq 2048 --checkpointing none,layer)
        timeout "${STAGE_TIMEOUT:-600}" "${TORCHRUN[@]}" -m mmprof train-memory "${ARGS[@]}" --steps "${MULTI_STEPS:-3}" --warmup "${MULTI_WARMUP:-2}" \
          --estimate --out "$RUNS/train-memory-fsdp-$size-x$NGPU" 2>&1 | tee "$LOGS/train-memory-fsdp-$size-x$NGPU.log" || status=1
        timeout "${STAGE_TIMEOUT:-600}" python3 -m mmprof train-memory "${ARGS[@]}" --device meta --world-size "$NGPU" \
          --out "$RUNS/train-memory-fsdp-$size-x$NGPU-estimate" 2>&1 | tee -a "$LOGS/train-memory-fsdp-$size-x$NGPU.log" || status=1
        python3 -m mmprof plot "$RUNS/train-memory-fsdp-$size-x$NGPU" --out "$RUNS/train-memory-fsdp-$size-x$NGPU/plot.png" || status=1
        pack
      done
      if [ -n "${MULTI_DECODE_SIZES-2.7b}" ]; then
        timeout "${STAGE_TIMEOUT:-600}" "${TORCHRUN[@]}" -m mmprof decode-power --size "${MULTI_DECODE_SIZES:-2.7b}" \
          --shard replicate --new-tokens "${DECODE_TOKENS:-256}" --out "$RUNS/decode-power-replicate-x$NGPU" 2>&1 \
          | tee "$LOGS/decode-power-replicate-x$NGPU.log" || status=1
      fi ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  pack
done
exit $status
