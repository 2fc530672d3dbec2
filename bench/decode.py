"""Decode attention benchmark (issue 4). The code is in the package, turboattn/benchmarks/decode.py, which
`turboattn bench decode` also runs; this wrapper keeps the command lines of docs/BENCHMARKS.md working:

    PYTHONPATH=bindings/python python bench/decode.py [--out bench/results/decode.json] [--quick] [--device cpu]
"""
import os

from turboattn.benchmarks import decode  # bindings/python on PYTHONPATH, or pip install .

if __name__ == "__main__":
    decode.main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode.json"))
