#!/usr/bin/env bash
# Tuning run on a GPU machine: the sm80 prefill kernel built at several register budgets, a quick
# benchmark of each, the SASS opcode histogram, and an Nsight Compute profile of one launch.
# Writes to $OUT. Needs SageAttention importable if its column is wanted (see bench/prefill.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}
cd "$(dirname "$0")/.."
for mb in ${MIN_BLOCKS:-3 2}; do
  { cmake -S . -B build-mb$mb -G Ninja -DTURBOATTN_CUDA_ARCHS=90a -DTURBOATTN_TESTS=OFF -DTURBOATTN_PREFILL_MIN_BLOCKS=$mb &&
    cmake --build build-mb$mb -j 16 --target turboattn_shared; } > "$OUT/build-mb$mb.log" 2>&1 || { tail -20 "$OUT/build-mb$mb.log"; exit 1; }
  ls build-mb$mb/*.so || { tail -20 "$OUT/build-mb$mb.log"; exit 1; }
  echo "== min blocks per SM: $mb"
  (cd bench && PYTHONPATH=$PWD/../bindings/python TURBOATTN_LIB=$PWD/../build-mb$mb/libturboattn.so python3 prefill.py --quick --out "$OUT/quick-mb$mb.json")
done
first=$(echo ${MIN_BLOCKS:-3 2} | cut -d' ' -f1)
cuobjdump -sass build-mb$first/libturboattn.so | python3 bench/sass_histogram.py flashq_prefill_kernelILi128E6__half > "$OUT/sass.txt"
head -25 "$OUT/sass.txt"
(cd bench && PYTHONPATH=$PWD/../bindings/python TURBOATTN_LIB=$PWD/../build-mb$first/libturboattn.so ncu --clock-control none --kernel-name-base mangled -k regex:flashq_prefill_kernelILi128 \
  --launch-count 1 --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy \
  --section LaunchStats python3 prefill.py --quick --out /tmp/ncu.json > "$OUT/ncu.txt" 2>&1)
grep -E "Stall|Issued|Occupancy|Registers|Warp Cycles|Eligible|Active Warps|No Eligible|Executed Ipc" "$OUT/ncu.txt" | head -40
