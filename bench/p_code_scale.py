#!/usr/bin/env python3
"""What the scale of the P codes costs (docs/BENCHMARKS.md, prefill, "What would move it";
docs/HOPPER_PLAN.md, "Next"): P quantized to 8-bit codes relative to each tile's maximum (docs/FORMATS.md
1.5: 64-key tiles, which forces a per-tile fp32 update of O, since every tile's codes have their own
scale), relative to 128-key tiles' maxima (one O update per two K/V blocks), and relative to the
running maximum (one scale per row across tiles, which an int32 P V accumulated across tiles on the
tensor cores would need). Everything else exact (float64), random normal q, k, v at D = 128, as the
prefill benchmark's inputs; prints the relative L2 error of each against exact attention.

With --int8-v, V is also quantized to INT8 per 64-token block (as FORMATS.md 1.3 does) and the
128-key tiles fold each block's V scale into its codes' exponent (`2^(s - max + log2(sv_b / sv_max))`),
so that one integer P V covers both blocks; the row sum divides each block's code sum by its ratio.

    python3 bench/p_code_scale.py [--lengths 1024 4096 16384] [--queries 128] [--int8-v]
"""
import argparse

import numpy as np

BLOCK, DIM, CODE_MAX = 64, 128, 255


def int8_blocks(v):
    """V quantized per 64-token block: (codes as float64, per-token scale)."""
    codes, scale = np.empty_like(v), np.empty((len(v), 1))
    for t in range(0, len(v), BLOCK):
        amax = np.abs(v[t:t + BLOCK]).max()
        sc = amax / 127 if amax > 0 else 1.0
        codes[t:t + BLOCK], scale[t:t + BLOCK] = np.round(v[t:t + BLOCK] / sc), sc
    return codes, scale


def per_tile(s, v_codes, v_scale, tile):
    """Codes relative to each `tile`-key tile's maximum, every V block's scale folded into the exponent
    relative to the tile's largest V scale; each tile weighted by 2^(tile max - row max)."""
    queries, m = len(s), s.max(1, keepdims=True)
    o, l = np.zeros((queries, v_codes.shape[1])), np.zeros((queries, 1))
    for t in range(0, s.shape[1], tile):
        st, sv = s[:, t:t + tile], v_scale[t:t + tile, 0]
        tm, sv_max = st.max(1, keepdims=True), sv.max()
        ratio = sv / sv_max  # per key, constant over each 64-token block
        c = np.round(CODE_MAX * 2.0 ** (st - tm + np.log2(ratio)))
        assert c.max() <= CODE_MAX  # the folding only lowers codes: they stay 8-bit
        w = 2.0 ** (tm - m)
        o = o + w * sv_max * (c @ v_codes[t:t + tile])
        l = l + w * (c / ratio).sum(1, keepdims=True)
    return o / l


def running_max(s, v):
    """Codes round(255 * 2^(s - running max)); earlier tiles rescaled exactly."""
    queries = len(s)
    o, l, run = np.zeros((queries, v.shape[1])), np.zeros((queries, 1)), np.full((queries, 1), -np.inf)
    for t in range(0, s.shape[1], BLOCK):
        st = s[:, t:t + BLOCK]
        new = np.maximum(run, st.max(1, keepdims=True))
        a, c = 2.0 ** (run - new), np.round(CODE_MAX * 2.0 ** (st - new))
        o, l, run = o * a + c @ v[t:t + BLOCK], l * a + c.sum(1, keepdims=True), new
    return o / l


def attention_errors(n, queries, rng, int8_v):
    q, k, v = rng.standard_normal((queries, DIM)), rng.standard_normal((n, DIM)), rng.standard_normal((n, DIM))
    s = (q @ k.T) / np.sqrt(DIM) * np.log2(np.e)  # base-2 scores
    p = 2.0 ** (s - s.max(1, keepdims=True))
    exact = (p @ v) / p.sum(1, keepdims=True)
    v_codes, v_scale = int8_blocks(v) if int8_v else (v, np.ones((n, 1)))
    err = lambda x: float(np.linalg.norm(x - exact) / np.linalg.norm(exact))
    return err(per_tile(s, v_codes, v_scale, 64)), err(per_tile(s, v_codes, v_scale, 128)), err(running_max(s, v))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--int8-v", action="store_true", help="V as INT8 per 64-token block (the running maximum's column keeps V exact)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("keys | 64-key tile maximum | 128-key tile maximum | running maximum" + (" (exact V)" if args.int8_v else ""))
    for n in args.lengths:
        a, b, c = attention_errors(n, args.queries, rng, args.int8_v)
        print(f"{n} | {a:.4f} | {b:.4f} | {c:.4f}")


if __name__ == "__main__":
    main()
