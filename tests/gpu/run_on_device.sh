#!/usr/bin/env bash
# Builds turboattn on a GPU machine and runs the GPU and CPU tests there, writing logs to $OUT.
# Used through the device tool: GoogleTest travels in .carry/gtest (tests/gpu/carry_gtest.sh makes it).
#   bash tests/gpu/run_on_device.sh [extra ctest args]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
gtest=()
[ -d .carry/gtest ] && gtest=(-DGTest_DIR="$root/.carry/gtest/lib/x86_64-linux-gnu/cmake/GTest")
cmake -S . -B build -G Ninja -DTURBOATTN_CUDA_ARCHS=90a "${gtest[@]}" > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build -j 16 > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
echo "build ok"
./build/tests/turboattn_gpu_tests --gtest_brief=1 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
gpu_rc=${PIPESTATUS[0]}
if [ -x build/tests/turboattn_wgmma_tests ]; then  # the sm_90a instruction probes
  ./build/tests/turboattn_wgmma_tests --gtest_brief=1 2>&1 | tee "$OUT/wgmma_tests.log" | tail -4
  gpu_rc=$(( gpu_rc | PIPESTATUS[0] ))
fi
ctest --test-dir build -LE gpu -j 16 --output-on-failure "$@" > "$OUT/cpu_tests.log" 2>&1
cpu_rc=$?
tail -3 "$OUT/cpu_tests.log"
echo "gpu tests rc=$gpu_rc cpu tests rc=$cpu_rc"
exit $(( gpu_rc | cpu_rc ))
