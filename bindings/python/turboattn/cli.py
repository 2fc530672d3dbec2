"""The `turboattn` command line: `python3 -m turboattn`, or the `turboattn` script that pip install . puts
on the PATH.

    turboattn version
    turboattn reference [--seqlen N] [--head-dim D] [--seed S]
    turboattn bench prefill|decode|serve|tp [benchmark options]  (--help after the name lists them)
    turboattn calibrate MODEL_DIR --text FILE [--tokens N] --fraction F --out PATH [--metric M]
    turboattn demo [--model M] [--device D] [--prompt TEXT] [--tokens N] [--bits B]
    turboattn eval [--model M] [--device D] [--quick] [--only NAME ...] [--no-passkey] [--out FILE]

The C++ program of the same name (tools/cli) runs `reference` and `version` itself and hands `bench` and
`calibrate` to this module. Exit status: 0 on success, 2 for bad arguments or inputs.
"""
import argparse
import math
import os
import re
import sys
import time

import turboattn

from ._progress import Progress

PROG = "turboattn"


def _fail(message):
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


# ---- argument types (argparse turns their errors into a usage message and exit status 2) ----

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{value}: expected a fraction in [0, 1]")
    return value


def _directory(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def _file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


# ---- version ----

def _package_location():
    """Where the running package comes from: pip-installed (with its version) or a source tree."""
    here = os.path.dirname(os.path.abspath(turboattn.__file__))
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        dist = distribution("turboattn")
        installed = os.path.dirname(os.path.abspath(str(dist.locate_file(os.path.join("turboattn", "__init__.py")))))
        if os.path.realpath(installed) == os.path.realpath(here):
            return f"Python package {dist.version}, installed at {here}"
    except (ImportError, PackageNotFoundError):
        pass
    # An installed copy elsewhere is not the one running, so its version would mislead.
    return f"Python package from {here} (not pip-installed)"


def cmd_version(args):
    # The first line is the C++ program's.
    print(f"turboattn {turboattn.version()}, CUDA kernels {'available' if turboattn.cuda_available() else 'not available'}")
    print(f"  {_package_location()}")
    print(f"  library {turboattn._capi.lib._name}")
    return 0


# ---- reference: tools/cli/sample.cpp through the Python API ----

def _sample(np, rng, tokens, heads, dim, role):
    """LLM-like activations [1, tokens, heads, dim] in fp16: N(0, 1) with four channels per head 10-50x
    larger; K's carry an offset (the C++ sample's recipe, with numpy's generators)."""
    x = rng.standard_normal((tokens, heads, dim))
    channels = np.random.default_rng(heads * 7919 + dim)  # the same outlier channels for q, k and v
    for h in range(heads):
        for _ in range(4):
            c = int(channels.integers(dim))
            sign = 1.0 if channels.integers(2) else -1.0
            m = rng.uniform(10.0, 50.0)
            col = x[:, h, c]
            x[:, h, c] = sign * m + 0.1 * m * col if role == "k" else (0.1 if role == "q" else 0.3) * m * col
    return x.astype(np.float16)[None]


def _exact_attention(np, q, k, v):
    """Causal softmax attention in float64 of q [N, Hq, D] over k, v [N, Hkv, D] (unrounded, unlike
    attention_exact's fp16 output), in blocks of query rows to bound the memory of the scores."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    out = np.empty((n, hq, d))
    rows = 256
    for h in range(hq):
        kh, vh = k[:, h // group], v[:, h // group]
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            s = q[r0:r1, h] @ kh[:r1].T / math.sqrt(d)
            s[np.arange(r0, r1)[:, None] < np.arange(r1)[None, :]] = -np.inf  # key after the query
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[r0:r1, h] = (p @ vh[:r1]) / p.sum(axis=1, keepdims=True)
    return out


def _errors(np, got, want):
    g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    den = float(w @ w)
    return math.sqrt(float((g - w) @ (g - w)) / den), float(g @ w) / math.sqrt(den * float(g @ g))


def cmd_reference(args):
    try:
        import numpy as np
    except ImportError:
        return _fail("reference needs numpy: pip install numpy")
    n, d, hq, hkv = args.seqlen, args.head_dim, 8, 2
    rng = np.random.default_rng(args.seed)
    q, k, v = (_sample(np, rng, n, h, d, role) for h, role in ((hq, "q"), (hkv, "k"), (hkv, "v")))
    print(f"turboattn {turboattn.version()}: CPU reference on a sample problem (Python package)")
    print(f"  causal self-attention, {n} tokens, {hq} query heads over {hkv} KV heads, head dim {d}, fp16 inputs")
    print("  inputs: N(0,1) with 4 outlier channels per head (10-50x, K with a per-channel offset)\n")

    exact = _exact_attention(np, q[0], k[0], v[0])
    exact16 = turboattn.attention_exact(q, k, v, causal=True)  # float64 rounded to fp16: the best fp16 can do

    print("Prefill attention against float64 (rel. L2 error, cosine similarity):")
    print(f"  {'configuration':<34} {'rel_l2':>10} {'cosine':>10} {'time':>8}")
    for name, sas, smooth in (("FlashQ INT8 + SAS (default)", True, True), ("FlashQ INT8, exact exponential", False, True),
                              ("FlashQ INT8 + SAS, no K smoothing", True, False)):
        out = np.full(q.shape, np.nan, dtype=np.float16)
        t0 = time.perf_counter()
        turboattn.attention(q, k, v, causal=True, use_sas=sas, smooth_k=smooth, out=out)
        rel, cos = _errors(np, out[0], exact)
        print(f"  {name:<34} {rel:10.5f} {cos:10.6f} {time.perf_counter() - t0:7.2f}s")
    rel, cos = _errors(np, exact16[0], exact)
    print(f"  {'float64 rounded to fp16 (floor)':<34} {rel:10.5f} {cos:10.6f}")

    print(f"\nDecode over the compressed cache (last token's query, all {n} tokens cached):")
    print(f"  {'KV heads stored at':<22} {'rel_l2':>10} {'cosine':>10} {'bytes/token':>14} {'vs fp16':>10}")
    cu = np.array([0, n], dtype=np.int32)
    q_last = np.ascontiguousarray(q[:, n - 1:])  # [1, 1, Hq, D]
    for name, bits in (("8 bits", [8, 8]), ("4 bits", [4, 4]), ("2/4 bits, 50/50", [4, 2]), ("2 bits", [2, 2])):
        cache = turboattn.KVCache(1, hkv, d, num_pages=(n + 63) // 64, max_seqs=1, max_seq_len=n, head_bits=bits)
        s = cache.add_sequence()
        cache.write(0, [s], k[0], v[0], cu)
        out = cache.decode(0, [s], q_last, out=np.full(q_last.shape, np.nan, dtype=np.float16))
        rel, cos = _errors(np, out[0, 0], exact[n - 1])
        m = cache.memory()
        print(f"  {name:<22} {rel:10.5f} {cos:10.6f} {m['bytes_per_token']:14.1f} "
              f"{m['fp16_bytes_per_token'] / m['bytes_per_token']:9.2f}x")
    print("\n(bytes/token: compressed pages of K and V over all KV heads, metadata included; the INT8 buffer of\n"
          f" up to 63 recent tokens per sequence adds a fixed {2 * 64 * d + 2 * 4 * 64} bytes per KV head.)")
    return 0


# ---- bench ----

def cmd_bench(args):
    if args.which is None:
        args.parser.error("name a benchmark: prefill, decode, serve or tp")
    prog = f"{PROG} bench {args.which}"
    try:
        if args.which == "decode":
            from .benchmarks import decode as bench
        elif args.which == "serve":
            from .benchmarks import serve as bench
        elif args.which == "tp":
            from .benchmarks import tensor_parallel as bench
        else:
            from .benchmarks import prefill as bench
    except ImportError as e:  # torch, Triton for prefill, transformers for serve
        return _fail(f"bench {args.which} needs {e.name or e}: pip install torch (Triton comes with PyTorch's CUDA "
                     f"wheels on Linux){'; serve, tp: pip install .[demo]' if args.which in ('serve', 'tp') else ''}")
    bench.main(args.args, prog=prog)
    return 0


# ---- calibrate ----

def _decoder_layers(model):
    """The decoder's layer list (model.get_decoder().layers in transformers' causal LMs), for progress;
    empty where the model has another layout."""
    import torch
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def cmd_calibrate(args):
    try:
        import torch
        import transformers
        from . import hf
    except ImportError as e:
        return _fail(f"calibrate needs torch and transformers >= 4.56 (pip install 'turboattn[hf]'): {e}")
    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    print(f"loading the model and its tokenizer from {args.model_dir} (local files only)", file=sys.stderr)
    try:
        # The model first: a directory without one gets transformers' plainest message (no config.json).
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # what transformers raises for a directory it cannot load
        return _fail(f"calibrate: cannot load a causal LM and its tokenizer from {args.model_dir}: {e}")
    try:
        model = model.to(args.device).eval()
    except (RuntimeError, ValueError) as e:  # an unknown device, or CUDA absent
        return _fail(f"calibrate: --device {args.device}: {e}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :args.tokens]
    if ids.shape[1] == 0:
        return _fail(f"calibrate: {args.text} gives no tokens")
    if ids.shape[1] < args.tokens:
        print(f"{args.text} has {ids.shape[1]} tokens (fewer than --tokens {args.tokens}): using them all",
              file=sys.stderr)
    layers = _decoder_layers(model)
    print(f"running {type(model).__name__} over {ids.shape[1]} tokens on {args.device}, recording each layer's "
          f"K and V", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    bar = Progress(len(layers), "calibrate: layers", unit="layer") if layers else None
    # hf.calibrate records K and V in one forward pass: hooks on the decoder layers show where it is
    # (the sensitivity's later passes, one per KV head, have their own bar).
    def on_layer(i):
        if bar.done < bar.total:
            bar.update(f"layer {i}")
    hooks = [layer.register_forward_hook(lambda *_, i=i: on_layer(i)) for i, layer in enumerate(layers)]
    heads_bar = []

    def per_head(done, total):
        if not heads_bar:
            heads_bar.append(Progress(total, "calibrate: KV heads at 2 bits", unit="head"))
        heads_bar[0].update()
    try:
        data = hf.calibrate(model, ids, args.fraction, args.out, metric=args.metric, progress=per_head)
    except (turboattn.Unsupported, ValueError) as e:  # a model turboattn cannot run, a bad fraction
        return _fail(f"calibrate: {e}")
    finally:
        for h in hooks:
            h.remove()
        for b in ([bar] if bar is not None else []) + heads_bar:
            b.close()
    total = data["num_layers"] * data["num_kv_heads"]
    print(f"wrote {args.out}: {data['num_layers']} layers x {data['num_kv_heads']} KV heads, "
          f"{sum(b == 2 for b in data['head_bits'])} of {total} heads at 2 bits (fraction {data['fraction_2bit']}), "
          f"from {data['tokens']} tokens of {args.text}")
    print(f"use it with turboattn.hf.TurboConfig(head_bits={args.out!r}, fraction_2bit={data['fraction_2bit']})")
    return 0


# ---- demo and eval (real models, docs/ACCURACY.md) ----

def _load_model(args):
    """(model, tokenizer, None) or (None, None, exit status) with the reason printed."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from .evaluation import corpus, models
    except ImportError as e:
        return None, None, _fail(f"{args.command} needs torch and transformers (pip install 'turboattn[demo]'): {e}")
    device = args.device or ("cuda" if torch.cuda.is_available() and turboattn.cuda_available() else "cpu")
    if device.startswith("cuda") and not (torch.cuda.is_available() and turboattn.cuda_available()):
        return None, None, _fail(f"{args.command} --device {device}: " + (
            "PyTorch sees no CUDA device" if not torch.cuda.is_available() else
            "this build of libturboattn has no CUDA kernels (build with nvcc on the path)"))
    if device != "cpu" and not device.startswith("cuda"):
        return None, None, _fail(f"{args.command} --device {device}: expected cpu, cuda or cuda:N")
    try:
        models.model_path(args.model)  # a bad name fails before anything is fetched
        corpus.ensure_austen()
        print(f"loading {args.model} on {device}", file=sys.stderr)
        model, tokenizer = models.load(args.model, device)
    except (FileNotFoundError, ImportError, OSError, ValueError) as e:
        return None, None, _fail(f"{args.command}: {e}")
    return model, tokenizer, 0


def cmd_demo(args):
    model, tokenizer, status = _load_model(args)
    if model is None:
        return status
    from . import hf
    from .evaluation import demo
    demo.run(model, tokenizer, prompt=args.prompt or demo.DEFAULT_PROMPT, new_tokens=args.tokens, config=hf.TurboConfig(bits=args.bits),
             ppl_prefix=args.ppl_prefix, ppl_tokens=args.ppl_tokens)
    return 0


def cmd_eval(args):
    import json
    try:
        from .evaluation import evaluate, models
    except ImportError as e:
        return _fail(f"eval needs torch and transformers (pip install 'turboattn[demo]'): {e}")
    known = [c.name for c in evaluate.configurations([1.0] * 4, 1, 4) if not c.name.startswith("mix")]
    mix = re.compile(r"mix\d+_(priority|random|index|sensitivity|random_model)$")
    unknown = [n for n in args.only or [] if n not in known and not mix.match(n)]
    if unknown:
        return _fail(f"eval --only: unknown configuration(s) {unknown}; known: {known} and mixes named by the "
                     "model's fraction of 2-bit heads and the selection, e.g. mix33_priority or mix50_sensitivity")
    model, tokenizer, status = _load_model(args)
    if model is None:
        return status
    sizes = dict(windows=2, batch=2, prefix=256, steps=16, score_prefill=64, passkey_lengths=(512,),
                 passkey_depths=(0.5,), passkey_keys=1, calibration_tokens=1024,
                 sensitivity_tokens=256) if args.quick else {}
    if not args.quick and model.device.type == "cpu":
        print("eval: the full evaluation on the CPU takes hours (about 6 minutes on an H200); --quick is a "
              "small check", file=sys.stderr)
    if args.no_passkey:
        sizes["passkey_lengths"] = ()
    if args.windows:
        sizes.update(windows=args.windows, batch=min(args.windows, args.batch or 8))
    elif args.batch:
        sizes["batch"] = args.batch
    result = evaluate.evaluate(model, tokenizer, only=args.only, report=lambda line: print(line, flush=True),
                               progress=lambda line: print(line, file=sys.stderr, flush=True), **sizes)
    import datetime
    result.update({"model": dict(result["model"], name=args.model), "device": str(model.device),
                   "card": models.device_name(model.device), "commit": os.environ.get("TURBOATTN_COMMIT", ""),
                   "date": datetime.date.today().isoformat(), "quick": bool(args.quick)})
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


# ---- the parser ----

def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="turboattn: quantized attention (FlashQ + SAS) and a "
                                     "compressed KV cache; the command line of the Python package.")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("version", help="the library version and whether CUDA kernels are available")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("reference", help="the CPU reference on a sample problem: error against float64 attention "
                       "and the cache memory per token")
    p.add_argument("--seqlen", type=_positive_int, default=1024, help="tokens (default 1024)")
    p.add_argument("--head-dim", type=int, choices=(64, 96, 128, 256), default=128, help="head dim (default 128)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sample (default: a fresh one)")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("bench", help="a GPU benchmark (docs/BENCHMARKS.md): JSON results and a PNG plot",
                       usage=f"{PROG} bench {{prefill,decode,serve,tp}} [options]",
                       description="Runs a benchmark of docs/BENCHMARKS.md; the arguments after its name go to it "
                       "(`turboattn bench decode --help` lists them).")
    # Optional only so that its absence gets a plain message (cmd_bench); a required positional before
    # the pass-through arguments would be reported as "required: which, args".
    p.add_argument("which", nargs="?", choices=("prefill", "decode", "serve", "tp"), help="prefill (FlashQ + SAS "
                   "against SDPA), decode (the compressed cache against SDPA over FP16), serve (batched generation of "
                   "a real model at a fixed KV memory budget) or tp (the same on one GPU and split over several)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options, e.g. --out, --quick")
    p.set_defaults(func=cmd_bench, parser=p)

    p = sub.add_parser("calibrate", help="per-head 4/2-bit assignment for a local transformers model (a JSON file "
                       "for turboattn.hf.TurboConfig(head_bits=...))")
    p.add_argument("model_dir", metavar="MODEL_DIR", type=_directory,
                   help="a Hugging Face model directory (config, weights, tokenizer); read locally, never downloaded")
    p.add_argument("--text", required=True, type=_file, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("--tokens", type=_positive_int, default=2048, metavar="N",
                   help="use the first N tokens of the text (default 2048)")
    p.add_argument("--fraction", required=True, type=_fraction, metavar="F", help="fraction of KV heads at 2 bits")
    p.add_argument("--out", required=True, metavar="PATH", help="the JSON file to write")
    p.add_argument("--metric", default="sensitivity", choices=("sensitivity", "gap_std"),
                   help="how heads are ranked (docs/FORMATS.md 3.6): sensitivity, the KL divergence each head at 2 "
                   "bits causes, over the whole model (default; one forward pass per KV head), or gap_std, the "
                   "paper's statistic, per layer (one pass)")
    p.add_argument("--device", default="cpu", help="where the model runs (default cpu; e.g. cuda)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="the model's dtype while it runs (default float32)")
    p.set_defaults(func=cmd_calibrate)

    from .evaluation.models import DEFAULT_MODEL, MODELS
    model_help = (f"a bundled model ({', '.join(MODELS)}; default {DEFAULT_MODEL}), a transformers model directory or "
                  "a .gguf file")
    p = sub.add_parser("demo", help="generate with the FP16 cache and with turboattn on a real model: both texts, KV "
                       "memory, held-out perplexity and speed")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when usable)")
    p.add_argument("--prompt", default=None, help="the user message (default: a short question)")
    p.add_argument("--tokens", type=_positive_int, default=64, metavar="N", help="new tokens to generate (default 64)")
    p.add_argument("--bits", type=int, choices=(8, 4, 2), default=4, help="bits per cached value (default 4)")
    p.add_argument("--ppl-prefix", type=_positive_int, default=512, metavar="N",
                   help="tokens of held-out text prefilled before the perplexity tokens (default 512)")
    p.add_argument("--ppl-tokens", type=_positive_int, default=128, metavar="N",
                   help="held-out tokens decoded over the cache for perplexity (default 128)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="accuracy of each part of the method on a real model and text "
                       "(docs/ACCURACY.md): perplexity, KL, top-1 agreement, passkey, KV bytes per token")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when usable)")
    p.add_argument("--quick", action="store_true", help="a small run (2 windows, short contexts) for a CPU check")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these configurations (and fp16, the reference)")
    p.add_argument("--no-passkey", action="store_true", help="skip the passkey test")
    p.add_argument("--windows", type=_positive_int, metavar="N", help="held-out windows (default 16)")
    p.add_argument("--batch", type=_positive_int, metavar="N", help="windows run together (default 8)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None):
    """Runs the command line on argv (None: sys.argv[1:]); returns the exit status. Bad arguments raise
    SystemExit(2) with argparse's usage message."""
    args = build_parser().parse_args(argv)
    return args.func(args)
