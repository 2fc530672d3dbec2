#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and initcheck over the GPU kernels on a set of small shapes (odd lengths,
# every head dim, masks, layouts, dtypes; each prefill case runs on every prefill kernel the device has). Run after tests/gpu/run_on_device.sh has built build/.
set -uo pipefail
OUT=${OUT:-/tmp/out}
cd "$(dirname "$0")/../.."
# GpuPrefill case index = ((dim index * 9 + length index) * 2 + causal) * 2 + input kind (kLengths in
# tests/test_gpu_attention.cpp): D 64 {1,1}, {63,63} causal, {65,65} causal, {200,64} causal; D 96
# {63,63}; D 128 {63,63} causal, {200,64} causal; D 256 {1,1} causal, {65,65} causal.
filter='Shapes/GpuPrefill.MatchesReferenceAndFloat64/0:Shapes/GpuPrefill.MatchesReferenceAndFloat64/7:'
filter+='Shapes/GpuPrefill.MatchesReferenceAndFloat64/10:Shapes/GpuPrefill.MatchesReferenceAndFloat64/34:'
filter+='Shapes/GpuPrefill.MatchesReferenceAndFloat64/41:Shapes/GpuPrefill.MatchesReferenceAndFloat64/79:'
filter+='Shapes/GpuPrefill.MatchesReferenceAndFloat64/106:Shapes/GpuPrefill.MatchesReferenceAndFloat64/110:'
filter+='Shapes/GpuPrefill.MatchesReferenceAndFloat64/118:All/GpuPrefillVariants.*:GpuPrefill.RowsWithNoVisibleKeyAreZero:'
filter+='Shapes/GpuQuantize.BitExactWithReference/1*:All/GpuPrefillVarlen.*:GpuPrefillInt8Kv.*:GpuPrefillNumerics.*:Offsets/GpuPrefillNan.*:'
# The cache: writes at every head dim and bit width, decode variants, the C API's errors, graph replay.
filter+='All/GpuCacheBytes.*/0:All/GpuCacheBytes.*/6:All/GpuCacheBytes.*/9:All/GpuCacheBytes.*/15:'
# GpuDecode: 4 bits (Q' in registers), 2 bits (B rows of their own), the 4/2 mix (2-bit B rows in the
# ring), D 96, D 256 2 bits, two row groups, D 64 mix, q_len 8, SAS off and bf16, q_len over 8, rings
# sized for 8-bit heads holding 2- and 4-bit heads, the 4-bit path alone with a merge, and a 4/2 layer
# with two row groups and a merge.
filter+='Shapes/GpuDecode.*/2:Shapes/GpuDecode.*/3:Shapes/GpuDecode.*/4:Shapes/GpuDecode.*/5:Shapes/GpuDecode.*/7:'
filter+='Shapes/GpuDecode.*/9:Shapes/GpuDecode.*/10:Shapes/GpuDecode.*/13:Shapes/GpuDecode.*/15:Shapes/GpuDecode.*/17:'
filter+='Shapes/GpuDecode.*/19:Shapes/GpuDecode.*/20:Shapes/GpuDecode.*/21:Shapes/GpuDecode.*/22:'
filter+='GpuCacheCapi.*:GpuCacheGraph.*:GpuCacheNumerics.InputsNear*:GpuCacheNumerics.NonFinite*:'
filter+='GpuCacheNumerics.EqualScores*:GpuCacheNumerics.Sequences*'
rc=0
for tool in memcheck racecheck initcheck; do
  compute-sanitizer --tool $tool --error-exitcode 99 ./build/tests/turboattn_gpu_tests --gtest_filter="$filter" --gtest_brief=1 \
    > "$OUT/sanitizer-$tool.log" 2>&1
  r=$?
  echo "$tool: exit $r; $(grep -E '^========= (ERROR SUMMARY|RACECHECK SUMMARY)' "$OUT/sanitizer-$tool.log" | tail -1); $(grep -E 'tests? ran|PASSED|FAILED' "$OUT/sanitizer-$tool.log" | tail -2 | tr '\n' ' ')"
  [ $r -ne 0 ] && tail -15 "$OUT/sanitizer-$tool.log"
  rc=$((rc | r))
done
exit $rc
