"""The GPU benchmarks (docs/BENCHMARKS.md): `turboattn bench prefill|decode`, or bench/prefill.py and
bench/decode.py in the source tree. Each module has main(argv) and needs PyTorch (prefill: Triton too)."""
import os
import subprocess


def commit():
    """The measured commit: $TURBOATTN_COMMIT, else the checkout's short hash (+dirty when tracked files
    outside bench/results differ from it)."""
    if os.environ.get("TURBOATTN_COMMIT"):
        return os.environ["TURBOATTN_COMMIT"]
    # The package's own checkout (PYTHONPATH=bindings/python); a pip-installed package is in none, so then
    # the directory the benchmark runs in.
    for here in (os.path.dirname(os.path.abspath(__file__)), os.getcwd()):
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                 text=True).stdout.strip()
            # Results a benchmark rewrote (bench/results) do not make the code dirty.
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                    ":(top,exclude)bench/results"], cwd=here, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "unknown"
        if sha:
            return sha + ("+dirty" if dirty else "")
    return "unknown"
