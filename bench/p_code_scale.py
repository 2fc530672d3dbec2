#!/usr/bin/env python3
"""What the scale of the P codes costs (docs/BENCHMARKS.md, prefill, "What would move it"): P quantized
to 8-bit codes relative to each 64-key tile's maximum (docs/FORMATS.md 1.5, which forces a per-tile
fp32 update of O, since every tile's codes have their own scale) against codes relative to the running
maximum (one scale per row across tiles, which an int32 P V accumulated across tiles on the tensor cores
would need). Everything else exact (float64), random normal q, k, v at D = 128, as the prefill
benchmark's inputs; prints the relative L2 error of each against exact attention.

    python3 bench/p_code_scale.py [--lengths 1024 4096 16384] [--queries 128]
"""
import argparse

import numpy as np

TILE, DIM, CODE_MAX = 64, 128, 255


def attention_errors(n, queries, rng):
    q, k, v = rng.standard_normal((queries, DIM)), rng.standard_normal((n, DIM)), rng.standard_normal((n, DIM))
    s = (q @ k.T) / np.sqrt(DIM) * np.log2(np.e)  # base-2 scores
    p = 2.0 ** (s - s.max(1, keepdims=True))
    exact = (p @ v) / p.sum(1, keepdims=True)
    # Per-tile maximum: codes round(255 * 2^(s - tile max)), each tile weighted by 2^(tile max - row max).
    m = s.max(1, keepdims=True)
    o, l = np.zeros((queries, DIM)), np.zeros((queries, 1))
    for t in range(0, n, TILE):
        st = s[:, t:t + TILE]
        tm = st.max(1, keepdims=True)
        c, w = np.round(CODE_MAX * 2.0 ** (st - tm)), 2.0 ** (tm - m)
        o, l = o + w * (c @ v[t:t + TILE]), l + w * c.sum(1, keepdims=True)
    per_tile = o / l
    # Running maximum: codes round(255 * 2^(s - running max)); earlier tiles rescaled exactly.
    o, l, run = np.zeros((queries, DIM)), np.zeros((queries, 1)), np.full((queries, 1), -np.inf)
    for t in range(0, n, TILE):
        st = s[:, t:t + TILE]
        new = np.maximum(run, st.max(1, keepdims=True))
        a, c = 2.0 ** (run - new), np.round(CODE_MAX * 2.0 ** (st - new))
        o, l, run = o * a + c @ v[t:t + TILE], l * a + c.sum(1, keepdims=True), new
    running = o / l
    err = lambda x: float(np.linalg.norm(x - exact) / np.linalg.norm(exact))
    return err(per_tile), err(running)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--queries", type=int, default=128)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("keys | per-tile maximum | running maximum")
    for n in args.lengths:
        a, b = attention_errors(n, args.queries, rng)
        print(f"{n} | {a:.4f} | {b:.4f}")


if __name__ == "__main__":
    main()
