#!/usr/bin/env bash
# bench/serve.py on a GPU machine that has no network, through the device tool (docs/BENCHMARKS.md,
# "Serving throughput"). The model's weights (94 MiB) and the text travel in two calls, as the tool
# carries at most 64 MiB per call; a machine stays warm about 30 s between them.
#
#   here:    TURBOATTN_LIB=<a build of the library> bash bench/serve_on_device.sh prepare
#            fetches the model and the text (as the evaluation does) and fills .carry/serve-a (the
#            weights' first part, the text, the gguf wheel) and .carry/serve-b (the other parts)
#   call 1:  carry .carry/serve-a and the library's build folder;
#            TURBOATTN_LIB=<build>/libturboattn.so bash bench/serve_on_device.sh stage
#   call 2:  carry .carry/serve-b; SERVE_ARGS="--quick" TURBOATTN_COMMIT=<commit> bash bench/serve_on_device.sh run
#            (bench/serve.py's arguments in SERVE_ARGS; the results go to $OUT/serve.json and .png)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
weights=SmolLM2-135M-Instruct.Q4_1.gguf
keep=build-serve  # ignored by git (/build*/), kept on the machine between calls
case "${1:-}" in
  prepare)
    data=$(mktemp -d)
    TURBOATTN_DATA=$data PYTHONPATH=bindings/python python3 -c \
      "from turboattn.evaluation import models, corpus; models.model_path('smollm2-135m'); corpus.ensure_austen()"
    rm -rf .carry/serve-a .carry/serve-b && mkdir -p .carry/serve-a .carry/serve-b
    python3 tools/chunks.py split "$data/models/$weights" "$data/parts" --mib 40
    mv "$data/parts/$weights.part00" .carry/serve-a/ && mv "$data"/parts/* .carry/serve-b/
    mv "$data/r-cran-janeaustenr" .carry/serve-a/
    python3 -m pip download --no-deps -q -d .carry/serve-a "gguf==0.19.0"
    rm -rf "$data"
    du -sh .carry/serve-a .carry/serve-b
    ;;
  stage)
    mkdir -p "$keep/parts" "$keep/data" "$keep/lib"
    cp .carry/serve-a/*.part* "$keep/parts/" && cp -r .carry/serve-a/r-cran-janeaustenr "$keep/data/"
    cp .carry/serve-a/*.whl "$keep/"
    cp "${TURBOATTN_LIB:?the library to benchmark}" "$keep/lib/"
    echo "staged in $keep"
    ;;
  run)
    cp .carry/serve-b/* "$keep/parts/"
    mkdir -p "$keep/data/models"
    python3 tools/chunks.py join "$keep/parts" "$weights" "$keep/data/models/$weights"
    python3 -c "import gguf" 2>/dev/null || python3 -m pip install --no-deps -q "$keep"/*.whl
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
    TURBOATTN_DATA=$keep/data TURBOATTN_LIB=$keep/lib/libturboattn.so PYTHONPATH=bindings/python \
      python3 bench/serve.py ${SERVE_ARGS:-} --out "${OUT:-/tmp/out}/serve.json"
    ;;
  *)
    echo "usage: bash bench/serve_on_device.sh prepare|stage|run" >&2
    exit 2
    ;;
esac
