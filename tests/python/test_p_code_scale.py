"""bench/p_code_scale.py, whose P-code errors docs/HOPPER_PLAN.md quotes: with P's rounding taken away
(codes of 2^40 levels) every variant must be exact attention over the V it uses, so what it reports is
P's rounding alone, the V-scale folding of 128-key tiles included."""
import random

import numpy as np

import bench_script


def _module():
    return bench_script.load("p_code_scale")


def test_variants_are_exact_without_p_rounding():
    mod = _module()
    mod.CODE_MAX = 2.0 ** 40
    rng = np.random.default_rng(random.randrange(1 << 30))
    n, queries, dim = 64 * 5 + 37, 9, mod.DIM
    q, k, v = rng.standard_normal((queries, dim)), rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    v[70:90] *= 20  # blocks whose V scales differ by far
    s = q @ k.T / np.sqrt(dim) * 3
    p = 2.0 ** (s - s.max(1, keepdims=True))
    codes, scale = mod.int8_blocks(v)
    assert len(np.unique(scale[:-1:64])) > 1
    dequantized = codes * scale
    for tile in (64, 128):
        out = mod.per_tile(s, codes, scale, tile)
        np.testing.assert_allclose(out, (p @ dequantized) / p.sum(1, keepdims=True), rtol=0, atol=1e-9)
    np.testing.assert_allclose(mod.running_max(s, v), (p @ v) / p.sum(1, keepdims=True), rtol=0, atol=1e-9)


def test_rounding_costs_in_the_documented_order():
    # 8-bit codes: the 128-key maximum costs a little more than the 64-key one, the running maximum more.
    a, b, c = _module().attention_errors(2048, 32, np.random.default_rng(random.randrange(1 << 30)), int8_v=False)
    assert a < b < c < 0.05
