#!/usr/bin/env bash
# GPU run: kernel tests, then the kernel benchmarks, writing logs and JSON under $OUT.
#   bash benchmarks/run_gpu.sh [tests] [sweep] [roofline] [capacity] [switch]   (default: all)
set -o pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-tests sweep roofline capacity switch}
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for step in $steps; do
  echo "=== $step ($(date +%T))"
  case $step in
    tests) timeout 300 python3 -m pytest tests/test_kernels.py -q -x -p no:cacheprovider -k "kernel_ or dispatches" \
             2>&1 | tail -n 40 | tee "$OUT/tests.log" || { status=1; break; } ;;
    sweep) timeout 240 python3 benchmarks/kernel_sweep.py --out "$OUT/kernel_sweep.json" 2>&1 | tee "$OUT/sweep.log" ;;
    roofline) timeout 420 python3 benchmarks/kernel_roofline.py --out "$OUT/kernel_roofline.json" \
                2>&1 | tee "$OUT/roofline.log" ;;
    capacity) timeout 120 python3 benchmarks/capacity.py --allocate --out "$OUT/capacity.json" 2>&1 | tail -n 30 ;;
    switch) timeout 120 python3 benchmarks/switch_cost.py --out "$OUT/switch_cost.json" 2>&1 | tail -n 30 ;;
    decode) timeout 480 python3 benchmarks/decode_e2e.py --out "$OUT/decode_e2e.json" 2>&1 | tee "$OUT/decode.log" ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
