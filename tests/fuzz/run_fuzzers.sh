#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (AddressSanitizer and UndefinedBehaviorSanitizer, CPU
# backend) and runs each for a bounded time: FUZZ_SECONDS (default 30) each. A crash, a sanitizer
# report or an abort fails. Exit 77 (reported SKIPPED by ctest) where clang's libFuzzer is missing.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${FUZZ_BUILD_DIR:-$root/build/fuzz}
seconds=${FUZZ_SECONDS:-30}
command -v clang++ >/dev/null || { echo "clang++ not found: fuzzers skipped"; exit 77; }
mkdir -p "$out"
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' > "$out/probe.cpp"
clang++ -fsanitize=fuzzer "$out/probe.cpp" -o "$out/probe" 2>/dev/null || { echo "libFuzzer runtime missing: fuzzers skipped"; exit 77; }
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -ffp-contract=off
       -I"$root/include" -I"$root/src" -I"$root/tests/fuzz")
sources=("$root"/src/reference/*.cpp "$root"/src/api/*.cpp)
# The library once, as objects, then each target.
objs=()
for s in "${sources[@]}"; do
  o="$out/$(basename "$s" .cpp).o"
  clang++ "${flags[@]/-fsanitize=fuzzer,address,undefined/-fsanitize=fuzzer-no-link,address,undefined}" -c "$s" -o "$o" || exit 1
  objs+=("$o")
done
rc=0
for target in fuzz_c_api fuzz_cache; do
  clang++ "${flags[@]}" "$root/tests/fuzz/$target.cpp" "${objs[@]}" -lpthread -o "$out/$target" || exit 1
  mkdir -p "$out/corpus-$target"
  echo "== $target: ${seconds}s"
  "$out/$target" -artifact_prefix="$out/$target-" -max_total_time="$seconds" -max_len=4096 -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
    "$out/corpus-$target" > "$out/$target.log" 2>&1
  r=$?
  grep -E "^(stat::number_of_executed_units|Done)" "$out/$target.log" | tail -2
  if [ $r -ne 0 ]; then tail -40 "$out/$target.log"; rc=1; fi
done
exit $rc
