"""Tensor-parallel generation benchmark (issue 9). The code is in the package,
turboattn/benchmarks/tensor_parallel.py, which `turboattn bench tp` also runs; this wrapper gives it the
repository's results path:

    PYTHONPATH=bindings/python python bench/tensor_parallel.py [--out bench/results/tensor_parallel.json]
"""
import os

from turboattn.benchmarks import tensor_parallel  # bindings/python on PYTHONPATH, or pip install .

if __name__ == "__main__":
    tensor_parallel.main(default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "tensor_parallel.json"))
