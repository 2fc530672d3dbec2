#!/usr/bin/env bash
# All tests: the C++ build and its suites (ctest), then the Python package installed with pip and its
# suites (pytest). GPU tests report SKIPPED where no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja ${TURBOATTN_CMAKE_ARGS:-}
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)"
# The package's own build (scikit-build-core) of the same CMake project.
python3 -m pip install -q ${TURBOATTN_PIP_ARGS:-} .
(cd tests/python && python3 -m pytest -q .)
