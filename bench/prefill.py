"""Prefill attention benchmark (issue 3). The code is in the package, turboattn/benchmarks/prefill.py, which
`turboattn bench prefill` also runs; this wrapper keeps the command lines of docs/BENCHMARKS.md working:

    PYTHONPATH=bindings/python python bench/prefill.py [--out bench/results/prefill.json] [--quick]
"""
import os

from turboattn.benchmarks import prefill  # bindings/python on PYTHONPATH, or pip install .

if __name__ == "__main__":
    prefill.main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prefill.json"))
