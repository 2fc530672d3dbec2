"""Serving benchmark (issue 7). The code is in the package, turboattn/benchmarks/serve.py, which
`turboattn bench serve` also runs; this wrapper gives it the repository's results path:

    PYTHONPATH=bindings/python python bench/serve.py [--out bench/results/serve.json] [--quick]
"""
import os

from turboattn.benchmarks import serve  # bindings/python on PYTHONPATH, or pip install .

if __name__ == "__main__":
    serve.main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serve.json"))
