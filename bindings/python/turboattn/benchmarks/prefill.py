"""Prefill attention benchmark: turboattn against torch SDPA (FlashAttention-2 and cuDNN backends) and
SageAttention 1.0.6, one run on one card. Effective TFLOP/s = 4 B H N^2 D / time (halved for causal),
quantization included. Error: relative L2 against FP32 attention. On Hopper, each of turboattn's two
kernels (TURBOATTN_PREFILL_MMA=sm80, =sm90) is also timed on its own, same run.

    turboattn bench prefill [--out prefill.json] [--quick]
    PYTHONPATH=bindings/python python bench/prefill.py [--out bench/results/prefill.json] [--quick]
(TURBOATTN_LIB selects the library; default: the package's, else build/libturboattn.so).
"""
import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import turboattn  # bindings/python on PYTHONPATH, or pip install .
from turboattn.benchmarks import commit
from turboattn._progress import Progress

try:
    from sageattention import sageattn
except ImportError:  # reported as missing in the table, never silently replaced
    sageattn = None


def sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def rel_l2(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def fp32_reference(q, k, v, causal):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)


# On Hopper, each kernel TURBOATTN_PREFILL_MMA selects, timed beside the default (which picks by head dim).
HOPPER_PATHS = {"turboattn_mma_sync": "sm80", "turboattn_ws": "sm90"}


def with_path(path, fn):
    """fn() with TURBOATTN_PREFILL_MMA=path, the variable restored after; None where this library or
    device has no such kernel."""
    before = os.environ.get("TURBOATTN_PREFILL_MMA")
    os.environ["TURBOATTN_PREFILL_MMA"] = path
    try:
        return fn()
    except turboattn.Unsupported:
        return None
    finally:
        if before is None:
            del os.environ["TURBOATTN_PREFILL_MMA"]
        else:
            os.environ["TURBOATTN_PREFILL_MMA"] = before


def main(argv=None, *, prog=None, default_out="prefill.json"):
    """argv: the command line's arguments (None: sys.argv[1:]); default_out: --out's default (bench/prefill.py
    passes bench/results/prefill.json)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=default_out, help=f"JSON results, and the PNG plot next to it (default: {default_out})")
    ap.add_argument("--quick", action="store_true", help="one shape, for a smoke test")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    H = 32
    shapes = [(32, 1024), (8, 4096), (2, 16384)]  # B x N = 32k tokens
    if args.quick:
        shapes = [(8, 4096)]
    rows = []
    hopper = torch.cuda.get_device_capability()[0] == 9
    with Progress(2 * len(shapes) * 2, "prefill rows") as bar:  # head dims x shapes x causal
        for D in (64, 128):
            for B, N in shapes:
                for causal in (False, True):
                    # [B, H, N, D] memory: what SDPA wants; turboattn reads it through strides.
                    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16) for _ in range(3))
                    out = torch.empty(B, N, H, D, device="cuda", dtype=torch.float16).fill_(float("nan"))
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, N, H, D] views
                    ours = lambda: turboattn.attention(qt, kt, vt, causal=causal, out=out)
                    ms = {"turboattn": do_bench(ours, warmup=25, rep=100, return_mode="median")}
                    for name, path in (HOPPER_PATHS.items() if hopper else ()):
                        ms[name] = with_path(path, lambda: do_bench(ours, warmup=25, rep=100, return_mode="median"))
                    for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                        fn = sdpa(backend)
                        ms[name] = do_bench(lambda: fn(q, k, v, causal), warmup=25, rep=100, return_mode="median")
                    ms["sageattention"] = (do_bench(lambda: sageattn(q, k, v, is_causal=causal), warmup=25, rep=100,
                                                    return_mode="median") if sageattn else None)
                    ref = fp32_reference(q, k, v, causal)
                    ours()
                    torch.cuda.synchronize()
                    err = rel_l2(out.transpose(1, 2), ref)
                    sage_err = rel_l2(sageattn(q, k, v, is_causal=causal), ref) if sageattn else None
                    flops = 4 * B * H * N * N * D / (2 if causal else 1)
                    row = {"batch": B, "heads": H, "seqlen": N, "head_dim": D, "causal": causal, "ms": ms, "rel_l2": err,
                           "rel_l2_sageattention": sage_err,
                           "tflops": {k_: (flops / (t * 1e-3) / 1e12 if t else None) for k_, t in ms.items()}}
                    rows.append(row)
                    tf = row["tflops"]
                    per_kernel = "".join(f" ({n.removeprefix('turboattn_')} {tf[n]:.0f})" for n in HOPPER_PATHS if tf.get(n))
                    bar.write(f"D{D} B{B} N{N} causal={int(causal)}: turboattn {tf['turboattn']:.0f}{per_kernel} | fa2 {tf['fa2']:.0f} | "
                              f"cudnn {tf['cudnn']:.0f} | sage {tf['sageattention'] or 0:.0f} TFLOP/s; "
                              f"rel_l2 {err:.4f} (sage {sage_err or 0:.4f})")
                    bar.update(f"D{D} B{B} N{N} causal={int(causal)}")
                    del q, k, v, out, ref
    result = {"card": torch.cuda.get_device_name(), "commit": commit(),
              "date": datetime.date.today().isoformat(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # --out may name no folder
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    labels = [f"D{r['head_dim']} N{r['seqlen']//1024}k{' c' if r['causal'] else ''}" for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    names = ["turboattn", "cudnn", "fa2", "sageattention"]
    w = 0.2
    for i, n in enumerate(names):
        ax.bar([x + (i - 1.5) * w for x in range(len(rows))], [r["tflops"][n] or 0 for r in rows], w, label=n)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right")
    ax.set_ylabel("effective TFLOP/s")
    ax.set_title(f"prefill attention, H=32, B*N=32k, fp16 in ({result['card']}, {result['commit']}, {result['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
