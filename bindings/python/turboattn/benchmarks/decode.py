"""Decode attention benchmark (issue 4): turboattn's compressed paged KV cache against torch SDPA over FP16
K and V, one run on one card. One layer, 32 query heads over 8 KV heads, D = 128, q_len 1, fp16 in and out.

For each batch x context and each cache configuration (all heads at 8, 4 or 2 bits; "4/2": half the KV
heads at 2 bits), the cache is filled by one bulk write of N(0, 1) tokens, then one decode step is timed
with CUDA events (median; each run after an L2 flush, so K and V come from HBM as in a model's layer loop;
replayed from a CUDA graph when capture works) next to SDPA's FLASH_ATTENTION, CUDNN_ATTENTION and
EFFICIENT_ATTENTION backends over the same K and V in [B, 8, N, 128]. Also: appends (one token for every
sequence) with and without a block flush, cache bytes per token, the card's copy bandwidth (timed the
same way), and the host time per decode call.

    turboattn bench decode [--out decode.json] [--quick]
    PYTHONPATH=bindings/python python bench/decode.py [--out bench/results/decode.json] [--quick]
(TURBOATTN_LIB selects the library; TURBOATTN_COMMIT names the commit where there is no git checkout.
--device cpu runs the whole script on tiny shapes as a smoke test of the script itself: its times mean nothing.)
"""
import argparse
import datetime
import functools
import gc
import json
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import turboattn  # bindings/python on PYTHONPATH, or pip install .
from turboattn.benchmarks import commit
from turboattn._progress import Progress

HQ, HKV, D, BLOCK = 32, 8, 128, 64
FULL_SHAPES = [(1, 32768), (8, 32768), (32, 8192), (64, 4096), (128, 2048)]  # batch x context
SHAPES = FULL_SHAPES
CONFIGS = {8: [8] * HKV, 4: [4] * HKV, 2: [2] * HKV, "4/2": [4, 2] * (HKV // 2)}  # bits per KV head
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
DEV = "cuda"


def error_string(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


L2_FLUSHES = ("read", "write")


class Timer:
    """Median time of fn in ms. CUDA: events around each run, each run after an L2 flush (which also keeps
    the GPU busy while the host queues the run, so launch overhead is not counted: see host_overhead);
    the run is a CUDA graph replay when fn can be captured. CPU (smoke test): perf_counter.

    l2_flush "read" reads a 256 MiB buffer, so the run finds L2 full of clean lines, as a layer's attention
    does after the weight reads of its projections; "write" (the method before 2026-11-28) zeroes it, which
    leaves up to an L2 of dirty lines whose write-back to HBM the timed run pays for (docs/BENCHMARKS.md)."""

    def __init__(self, iters, l2_flush="read"):
        assert l2_flush in L2_FLUSHES, l2_flush
        self.iters, self.l2_flush = iters, l2_flush
        self.flush = torch.zeros(64 << 20, dtype=torch.int32, device=DEV) if DEV == "cuda" else None

    def flush_l2(self):
        if self.l2_flush == "read":
            self.flush.amax()  # a one-element result: nothing of it stays dirty worth counting
        else:
            self.flush.zero_()

    def capture(self, fn):
        """(callable, "graph" or "plain", capture error or None). One uncaptured call first: it grows
        workspaces (turboattn's decode allocates only on its first call at a shape) and picks kernels."""
        if DEV != "cuda":
            fn()
            return fn, "plain", None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graph wants
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            return graph.replay, "graph", None
        except Exception as e:  # not capturable: time plain calls
            torch.cuda.synchronize()
            return fn, "plain", error_string(e)

    def times(self, runs):
        """The time in ms of each callable of runs, run in order."""
        if DEV != "cuda":
            out = []
            for run in runs:
                t0 = time.perf_counter()
                run()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in runs]
        ends = [torch.cuda.Event(enable_timing=True) for _ in runs]
        for run, start, end in zip(runs, starts, ends):
            self.flush_l2()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def median(self, fn):
        run, mode, err = self.capture(fn)
        run()
        return statistics.median(self.times([run] * self.iters)), mode, err


def bytes_read(batch, context, bits):
    """Bytes turboattn's decode reads (docs/FORMATS.md 3.5): per page and KV head, the K and V regions
    (codes, and for 2 and 4 bits the stage-2 u8 scale and s8 zero of each K channel per token group,
    one group at 4 bits and four at 2, and of each V token) and 8 bytes of fp32 block scales; the first
    block's (8-bit codes and block scales); the partial block's INT8 buffer rows (K and V codes, an fp32
    scale each per token); q and out. Page tables and lengths (4 and 8 bytes) are left out."""
    full, part = divmod(context, BLOCK)
    page = sum(2 * BLOCK * D * b // 8 + ({4: 2 * D, 2: 8 * D}[b] + 2 * BLOCK if b < 8 else 0) + 8 for b in bits)
    first = len(bits) * (2 * BLOCK * D + 8) if full else 0
    buffer = len(bits) * (2 * part * D + 8 * part)
    return batch * (max(full - 1, 0) * page + first + buffer + 2 * 2 * HQ * D)


def rel_l2(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def fp32_reference(q, k, v):
    """Softmax attention in fp32 of q [B, HQ, 1, D] over k, v [B, HKV, N, D], one sequence at a time."""
    g = HQ // HKV
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        qb = q[b, :, 0].float().view(HKV, g, D)
        s = torch.einsum("hgd,hnd->hgn", qb, k[b].float()) / math.sqrt(D)
        out[b, :, 0] = torch.einsum("hgn,hnd->hgd", s.softmax(-1), v[b].float()).reshape(HQ, D)
    return out


def make_cache(batch, max_len, bits):
    cache = turboattn.KVCache(1, HKV, D, num_pages=batch * (max_len // BLOCK + 1), max_seqs=batch, max_seq_len=max_len,
                              head_bits=bits, device=DEV)
    return cache, [cache.add_sequence() for _ in range(batch)]


def write_all(cache, seqs, kp, vp, context, timer=None):
    """One bulk write of every sequence's context tokens (kp, vp [B * context, HKV, D]); with a timer, the
    time of that one call in ms (a single run: the first write of a sequence also computes its K mean)."""
    cu = torch.arange(0, (len(seqs) + 1) * context, context, dtype=torch.int32)
    if timer is None:
        cache.write(0, seqs, kp, vp, cu)
        return None
    return timer.times([lambda: cache.write(0, seqs, kp, vp, cu)])[0]


def sdpa_baselines(timer, q, k, v):
    """{backend: {"ms", "how" (GQA through enable_gqa, or K and V expanded outside the timed region when the
    backend does not take it; graph or plain timing), "error", "out"}}; a backend that fails has ms None."""
    res, expanded = {}, None
    for name, backend in BACKENDS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a backend that cannot run warns why, then raises
                try:
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    kk, vv, gqa = k, v, True
                except (RuntimeError, TypeError):
                    if expanded is None:
                        expanded = (k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1))
                    (kk, vv), gqa = expanded, False

                def run():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)

                out = run()
                ms, mode, _ = timer.median(run)
            how = "enable_gqa" if gqa else "repeat_interleave outside the timed region"
            res[name] = {"ms": ms, "how": f"{how}; {mode}", "error": None, "out": out}
        except Exception as e:
            res[name] = {"ms": None, "how": None, "error": error_string(e), "out": None}
    return res


def decode_row(timer, batch, context, label, bits, kp, vp, q, ref, fp16):
    row = {"batch": batch, "context": context, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "bits": label,
           "ms": {"turboattn": None, "fp16_best": fp16["best_ms"]}, "bytes_read": bytes_read(batch, context, bits),
           "fp16_bytes": turboattn.dense_kv_bytes_per_token(1, HKV, D) * context * batch, "fp16_backend": fp16["best"],
           **fp16["detail"]}
    try:
        cache, seqs = make_cache(batch, context, bits)
        row["write_ms"] = write_all(cache, seqs, kp, vp, context, timer)
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
        ms, mode, capture_error = timer.median(lambda: cache.decode(0, seqs, q, out=out))
        sync()
        row["ms"]["turboattn"] = ms
        row["timing"] = mode
        if capture_error:
            row["capture_error"] = capture_error
        row["gbps"] = row["bytes_read"] / (ms * 1e-3) / 1e9
        row["speedup"] = fp16["best_ms"] / ms if fp16["best_ms"] else None
        row["rel_l2"] = rel_l2(out.transpose(1, 2), ref)
    except Exception as e:
        row["error"] = error_string(e)
    return row


def run_shape(timer, batch, context):
    torch.manual_seed(batch * 100003 + context)
    # SDPA's preferred memory, [B, H, N, D]; the cache is written from a packed [B * N, HKV, D] copy.
    k, v = (torch.randn(batch, HKV, context, D, dtype=torch.float16, device=DEV) for _ in range(2))
    q = torch.randn(batch, 1, HQ, D, dtype=torch.float16, device=DEV)  # turboattn's [B, q_len, Hq, D]
    qs = q.transpose(1, 2).contiguous()  # SDPA's [B, Hq, 1, D], the same values
    ref = fp32_reference(qs, k, v)
    base = sdpa_baselines(timer, qs, k, v)
    ok = {n: r["ms"] for n, r in base.items() if r["ms"] is not None}
    best = min(ok, key=ok.get) if ok else None
    detail = {"fp16_ms": {n: r["ms"] for n, r in base.items()}, "fp16_how": {n: r["how"] for n, r in base.items()},
              "fp16_errors": {n: r["error"] for n, r in base.items() if r["error"]},
              "rel_l2_fp16": rel_l2(base[best]["out"], ref) if best else None}
    fp16 = {"best": best, "best_ms": ok.get(best), "detail": detail}
    del base
    kp, vp = (x.transpose(1, 2).reshape(batch * context, HKV, D) for x in (k, v))
    del k, v
    rows = [decode_row(timer, batch, context, label, bits, kp, vp, q, ref, fp16) for label, bits in CONFIGS.items()]
    del kp, vp, q, qs, ref
    free_memory()
    return rows


def free_memory():
    gc.collect()  # drops caches held by reference cycles before their GPU memory is counted free
    if DEV == "cuda":
        torch.cuda.empty_cache()


def append_and_flush(timer, batch, context, rounds):
    """Appends of one token to every sequence, after a bulk write of context tokens (a multiple of 64):
    every 64th step completes a block for every sequence, which flushes it to a page."""
    out = {"batch": batch, "context": context, "appends": rounds * BLOCK, "configs": {}}
    kn, vn = (torch.randn(rounds * BLOCK, batch, HKV, D, dtype=torch.float16, device=DEV) for _ in range(2))
    k0 = torch.randn(batch * context, HKV, D, dtype=torch.float16, device=DEV)
    for label, bits in CONFIGS.items():
        try:
            cache, seqs = make_cache(batch, context + rounds * BLOCK, bits)
            write_all(cache, seqs, k0, k0, context)
            t = timer.times([functools.partial(cache.append, 0, seqs, kn[i], vn[i]) for i in range(rounds * BLOCK)])
            plain = [x for i, x in enumerate(t) if (context + i + 1) % BLOCK]
            flush = [x for i, x in enumerate(t) if (context + i + 1) % BLOCK == 0]
            assert cache.length(0, seqs[0]) == context + rounds * BLOCK
            ms, ms_flush, ms_mean = statistics.median(plain), statistics.median(flush), sum(t) / len(t)
            out["configs"][str(label)] = {
                "append_ms": ms, "append_flush_ms": ms_flush, "append_mean_ms": ms_mean,
                "tokens_per_s": batch / (ms * 1e-3), "tokens_per_s_mean": batch / (ms_mean * 1e-3),
                "gbps_fp16_in": batch * HKV * D * 2 * 2 / (ms * 1e-3) / 1e9}
            del cache
        except Exception as e:
            out["configs"][str(label)] = {"error": error_string(e)}
        free_memory()
    return out


def bytes_per_token():
    res = {}
    for label, bits in CONFIGS.items():
        m = turboattn.KVCache(1, HKV, D, num_pages=1, max_seqs=1, max_seq_len=BLOCK, head_bits=bits).memory()
        res[str(label)] = {"bytes_per_token": m["bytes_per_token"], "fp16_bytes_per_token": m["fp16_bytes_per_token"],
                           "vs_fp16": m["fp16_bytes_per_token"] / m["bytes_per_token"]}
    return res


def copy_bandwidth(timer, mib):
    """Streaming rates of the card in GB/s, timed like every other run: "gbps", bytes read plus bytes
    written per second of a device-to-device copy of mib MiB (torch's copy_), and "read_gbps", bytes read
    per second of a reduction over them (torch's amax), which is decode's traffic. docs/BENCHMARKS.md
    judges the bandwidth target against the FP16 backend's own read rate in the same run."""
    try:
        src = torch.ones(mib << 18, dtype=torch.int32, device=DEV)
        dst = torch.empty_like(src)
        ms = timer.median(lambda: dst.copy_(src))[0]
        read_ms = timer.median(lambda: src.amax())[0]
        nbytes = src.numel() * 4
        return {"mib": mib, "ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9, "read_ms": read_ms,
                "read_gbps": nbytes / (read_ms * 1e-3) / 1e9}
    except Exception as e:
        return {"mib": mib, "error": error_string(e)}
    finally:
        free_memory()


def host_overhead(timer, n):
    """Host time per decode call (batch 1, 1k context, 4 bits): rounds of 100 back-to-back calls timed on
    the host with no synchronization inside a round (100 calls queue at most 200 launches, short of the
    driver's launch queue, so the host never waits for the GPU: the time is the host's own). Median over
    the rounds, through the C API alone (ctypes, descriptors built once), KVCache.decode_plan, KVCache.decode
    with and without `out`, and torch.ops.turboattn.decode; and the GPU time of one call."""
    import ctypes
    from turboattn._capi import DecodeOptions, describe, lib, ref, stream_of
    per_round = 100
    res = {"batch": 1, "context": 1024, "bits": 4, "calls": max(n, per_round)}
    try:
        cache, seqs = make_cache(1, 1024, CONFIGS[4])
        kv = torch.randn(1024, HKV, D, dtype=torch.float16, device=DEV)
        write_all(cache, seqs, kv, kv, 1024)
        q = torch.randn(1, 1, HQ, D, dtype=torch.float16, device=DEV)
        out = torch.empty_like(q)
        c_seqs, c_q, c_out = (ctypes.c_int32 * 1)(*seqs), describe(q), describe(out)
        c_opt, stream = DecodeOptions(0.0, 1, 0), stream_of(q)
        calls = {"c_api": lambda: lib.ta_decode(cache._handle, 0, c_seqs, 1, ref(c_q), ctypes.byref(c_opt), ref(c_out),
                                                stream),
                 "decode_plan": functools.partial(cache.decode_plan(seqs, q, out), 0),
                 "kvcache_decode_out": lambda: cache.decode(0, seqs, q, out=out),
                 "kvcache_decode": lambda: cache.decode(0, seqs, q),
                 "torch_op": lambda: torch.ops.turboattn.decode(cache.handle, 0, seqs, q)}
        for name, fn in calls.items():
            times = []
            for _ in range(max(1, n // per_round)):
                sync()
                t0 = time.perf_counter()
                for _ in range(per_round):
                    fn()
                times.append((time.perf_counter() - t0) / per_round * 1e6)
            sync()
            res[name] = statistics.median(times)
        res["gpu_us"] = timer.median(calls["kvcache_decode_out"])[0] * 1e3
    except Exception as e:
        res["error"] = error_string(e)
    return res


def main(argv=None, *, prog=None, default_out="decode.json"):
    """argv: the command line's arguments (None: sys.argv[1:]); default_out: --out's default (bench/decode.py
    passes bench/results/decode.json)."""
    global DEV, SHAPES
    SHAPES = FULL_SHAPES  # main may run more than once in a process (tests): --quick and --device cpu set it
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=default_out, help=f"JSON results, and the PNG plot next to it (default: {default_out})")
    ap.add_argument("--quick", action="store_true", help="one shape, fewer runs: a smoke test")
    ap.add_argument("--iters", type=int, default=50, help="timed runs per measurement (median)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: tiny shapes, to test the script")
    ap.add_argument("--l2-flush", default="read", choices=L2_FLUSHES,
                    help="what runs before each timed run: read a 256 MiB buffer (default; L2 left clean) or zero it "
                         "(the method before 2026-11-28; L2 left dirty)")
    args = ap.parse_args(argv)
    DEV = args.device
    rounds, calls = 4, 2000
    if args.quick:
        SHAPES, args.iters, rounds, calls = [(8, 4096)], 20, 1, 200
    if DEV == "cpu":
        SHAPES, args.iters, rounds, calls = [(1, 130), (2, 64)], 3, 1, 20
    timer = Timer(args.iters, args.l2_flush)
    t0 = time.time()
    rows = []
    # The rows of a shape come together (run_shape measures its baselines once for all configurations).
    with Progress(len(SHAPES) * len(CONFIGS), "decode rows") as bar:
        for batch, context in SHAPES:
            for row in run_shape(timer, batch, context):
                rows.append(row)
                t, b = row["ms"]["turboattn"], row["ms"]["fp16_best"]
                bar.write(f"B{batch} N{context} bits {row['bits']}: turboattn {t and f'{t:.4f}'} ms "
                          f"({row.get('gbps', 0):.0f} GB/s, rel_l2 {row.get('rel_l2', float('nan')):.4f}) | fp16 "
                          f"{row['fp16_backend']} {b and f'{b:.4f}'} ms | speedup "
                          f"{row.get('speedup') and round(row['speedup'], 2)}{' | ' + row['error'] if 'error' in row else ''}")
                bar.update(f"B{batch} N{context} bits {row['bits']}")
    cache = append_and_flush(timer, *SHAPES[-1], rounds)
    cache["bytes_per_token"] = bytes_per_token()
    print("cache:", json.dumps(cache), flush=True)
    copy = copy_bandwidth(timer, 1 if DEV == "cpu" else 1024)
    print("copy_bandwidth:", json.dumps(copy), flush=True)
    host = host_overhead(timer, calls)
    print("host_overhead_us:", json.dumps(host), flush=True)
    result = {"card": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke test)", "commit": commit(),
              "date": datetime.date.today().isoformat(), "l2_flush": args.l2_flush, "rows": rows, "cache": cache, "copy_bandwidth": copy,
              "host_overhead_us": host}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s", flush=True)
    try:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    except ImportError as e:
        print(f"no plot: {e}")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys((r["batch"], r["context"]) for r in result["rows"]))
    labels = [str(c) for c in CONFIGS]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.8 / len(labels)
    for i, label in enumerate(labels):
        sp = {(r["batch"], r["context"]): r.get("speedup") or 0 for r in result["rows"] if str(r["bits"]) == label}
        bars = ax.bar([x + (i - (len(labels) - 1) / 2) * w for x in range(len(shapes))], [sp.get(s, 0) for s in shapes], w,
                      label=f"{label} bits")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(shapes)), [f"{b} x {n // 1024 if n >= 1024 else n}{'k' if n >= 1024 else ''}"
                                       for b, n in shapes])
    ax.set_xlabel("batch x context")
    ax.set_ylabel("speedup vs fastest FP16 SDPA")
    ax.set_title(f"decode, 32 q heads / 8 KV heads, D=128 ({result['card']}, {result['commit']}, {result['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
