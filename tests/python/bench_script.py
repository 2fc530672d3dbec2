"""A bench/ script loaded as a module, for the tests that hold its numbers to account."""
import importlib.util
import pathlib


def load(name):
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
