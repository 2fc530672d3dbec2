#!/usr/bin/env bash
# Copies this machine's GoogleTest (Debian's libgtest-dev) into .carry/gtest for the GPU machine,
# which has no GoogleTest and no network. .carry/ is git-ignored; name it in the device call's carry.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dst="$root/.carry/gtest"
rm -rf "$dst"
lib="$dst/lib/x86_64-linux-gnu"  # the layout GTestConfig.cmake expects relative to itself
mkdir -p "$dst/include" "$lib/cmake"
cp -r /usr/include/gtest /usr/include/gmock "$dst/include/"
cp /usr/lib/x86_64-linux-gnu/libgtest*.a /usr/lib/x86_64-linux-gnu/libgmock*.a "$lib/"
cp -r /usr/lib/x86_64-linux-gnu/cmake/GTest "$lib/cmake/"
du -sh "$dst"
