#!/usr/bin/env python3
"""What each choice of the cache format costs on a real model (docs/ACCURACY.md, "Where the 4-bit
loss comes from"): the stage-1/stage-2 quantization of docs/FORMATS.md 3.1-3.3, re-implemented here as
quantize-then-dequantize in PyTorch, with its grouping varied (stage 2 per channel over a 64-token
block, per channel over 32 tokens, or per token over the channels; K or V alone at 4 bits), run through
the evaluation's protocol (also: K's channels scaled by their range first, "scaled"; stage 2's zero of
least squared error, "lsq zero"; a sequence's first block kept at 8 bits, "first block")
beside the library's own cache ("kv4", "kv2") and KIVI-style. The simulation of the current format
("k:chan v:tok first block", since the first block stayed at 8 bits; "k:chan v:tok" from a31dfde;
"k:chan v:chan" before) must land on the library's numbers; that is its check (and
tests/python/test_evaluation.py holds its blocks to the library cache's, value for value).

    PYTHONPATH=bindings/python python3 bench/kv_format_variants.py [--device cuda] [--windows 16]
        [--prefix 1024] [--steps 256] [--only VARIANT ...] [--out eval/results/format_variants.json]
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from transformers.cache_utils import Cache, DynamicLayer

from turboattn.evaluation import corpus, evaluate, models


ZERO_BLOCK_AMAX = 7.888609052210118e-31  # TA_ZERO_BLOCK_AMAX: a block this small gets scale 0


def _token_int8(x):
    """FORMATS 1.2 / 3.1 per token on [..., T, D] in fp32 as the reference does it: (codes, scales)."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax < ZERO_BLOCK_AMAX, 0.0, amax / 127)
    # a tensor divided by a tensor: torch computes `127 / amax` as 127 * (1 / amax), not the reference's quotient
    inv = torch.where(scale > 0, torch.full_like(amax, 127.0) / amax, 0.0)
    return torch.round(x * inv).clamp(-127, 127), scale


def _block_int8(x):
    """FORMATS 3.1-3.2 on [..., T, D] (T a multiple of 64): per-token INT8 codes, then requantized to
    the block's largest token scale. Returns (codes, block scale [..., blocks, 1, 1]), bit-exact with
    the reference's fp32 operations."""
    *b, T, D = x.shape
    q, s = _token_int8(x.reshape(*b, T // 64, 64, D))
    block = s.amax(-2, keepdim=True)
    ratio = torch.where(block > 0, s / block, 0.0)
    return torch.round(q * ratio).clamp(-127, 127), block


def _grid(q, step, zero, levels):
    """INT8 values q on the grid zero + code * step, codes rounded half to even (torch.round)."""
    return zero + torch.clamp(torch.round((q - zero) / step), max=levels) * step


def _stage2(q, bits, dim, least_squares=False):
    """FORMATS 3.3 along `dim` of INT8 codes: the smallest integer step whose grid covers [min, max]
    inside INT8, centred on it and kept in INT8. least_squares: of the covering grids of that step, the
    zero with the least squared error instead (ties: the centred zero, then the higher one; measured,
    not adopted: docs/ACCURACY.md)."""
    levels = (1 << bits) - 1
    lo, hi = q.amin(dim, keepdim=True), q.amax(dim, keepdim=True)
    step = torch.clamp(torch.ceil((hi - lo) / levels), min=1)
    highest, lowest = torch.minimum(lo, 127 - levels * step), torch.clamp(hi - levels * step, min=-128)
    zero = torch.clamp(torch.minimum(lo - torch.floor((levels * step - (hi - lo)) / 2), highest), min=-128)
    best = _grid(q, step, zero, levels)
    if not least_squares:
        return best
    best_err = ((best - q) ** 2).sum(dim, keepdim=True)
    for d in range(levels):
        z = highest - d
        y = _grid(q, step, z, levels)
        err = ((y - q) ** 2).sum(dim, keepdim=True)
        better = (z >= lowest) & (err < best_err)
        best, best_err = torch.where(better, y, best), torch.where(better, err, best_err)
    return best


def quantize_blocks(x, bits, grouping, least_squares=False):
    """x [..., T, D] -> its dequantized values (fp32). grouping: "chan" (per channel over 64 tokens), "chan32"
    and "chan16" (per channel over 32 or 16 tokens), "tok" (per token over the channels) or "tok32" (per
    token over 32 channels); bits 8: stage 1 only."""
    q, block = _block_int8(x)
    if bits < 8:
        if grouping == "tok":
            q = _stage2(q, bits, -1, least_squares)
        elif grouping == "tok32":
            q = _stage2(q.unflatten(-1, (-1, 32)), bits, -1, least_squares).flatten(-2, -1)
        elif grouping in ("chan32", "chan16"):
            q = _stage2(q.unflatten(-2, (-1, int(grouping[4:]))), bits, -2, least_squares).flatten(-3, -2)
        else:
            q = _stage2(q, bits, -2, least_squares)
    *b, blocks, T, D = q.shape
    return (q * block).reshape(*b, blocks * T, D)


class VariantLayer(DynamicLayer):
    """The cache as decode reads it: full 64-token blocks quantized as above, the 0-63 newest tokens as
    the INT8 buffer (per-token codes and scales). The prefill's own forward attends over its inputs, as
    the library's prefill does; every later step over what the cache holds, the token just appended
    included. k_scaled: K's channels divided by their range over the first write before quantization
    and multiplied back after (scale migration: the query would take the factors, exactly). least_squares:
    stage 2's zero searched (_stage2). first_block: the sequence's first 64 tokens (where the
    attention sink is) kept at 8 bits (stage 1 alone, FORMATS 3.2)."""

    def __init__(self, k_bits, v_bits, k_grouping, v_grouping, k_scaled=False, least_squares=False, first_block=False):
        super().__init__()
        self.k_bits, self.v_bits, self.k_grouping, self.v_grouping = k_bits, v_bits, k_grouping, v_grouping
        self.k_scaled, self.mu, self.k_range = k_scaled, None, 1.0
        self.least_squares, self.first_block = least_squares, first_block
        self.blocks = self.pending = None  # quantized full blocks (K, V); raw newest tokens (K - mu, V)

    def update(self, key_states, value_states, *args, **kwargs):
        first = self.mu is None
        if first:
            self.lazy_initialization(key_states, value_states)
            self.mu = key_states.double().mean(-2, keepdim=True).float()  # K smoothing (FORMATS 1.4)
            if self.k_scaled:
                self.k_range = (key_states - self.mu).abs().amax(-2, keepdim=True).clamp_min(1e-6)
            empty = key_states.float()[..., :0, :]
            self.blocks, self.pending = (empty, empty), (empty, empty)
        k = torch.cat([self.pending[0], ((key_states - self.mu) / self.k_range).float()], -2)
        v = torch.cat([self.pending[1], value_states.float()], -2)
        full = k.shape[-2] // 64 * 64
        if full:
            kq = quantize_blocks(k[..., :full, :], self.k_bits, self.k_grouping, self.least_squares)
            vq = quantize_blocks(v[..., :full, :], self.v_bits, self.v_grouping, self.least_squares)
            if self.first_block and self.blocks[0].shape[-2] == 0:
                kq[..., :64, :] = quantize_blocks(k[..., :64, :], 8, self.k_grouping)
                vq[..., :64, :] = quantize_blocks(v[..., :64, :], 8, self.v_grouping)
            self.blocks = (torch.cat([self.blocks[0], kq], -2), torch.cat([self.blocks[1], vq], -2))
        self.pending = (k[..., full:, :], v[..., full:, :])
        buffered = [q * s for q, s in map(_token_int8, self.pending)]
        dtype = key_states.dtype
        self.keys = (torch.cat([self.blocks[0], buffered[0]], -2) * self.k_range + self.mu).to(dtype)
        self.values = torch.cat([self.blocks[1], buffered[1]], -2).to(dtype)
        return (key_states, value_states) if first else (self.keys, self.values)


VARIANTS = {  # name: (K bits, V bits, K grouping, V grouping[, K scaled, least-squares zero, first block at 8 bits])
    "k:chan v:chan (4)": (4, 4, "chan", "chan"),
    "k:chan v:8 bits": (4, 8, "chan", "chan"),
    "k:8 bits v:chan": (8, 4, "chan", "chan"),
    "k:chan32 v:chan32 (4)": (4, 4, "chan32", "chan32"),
    "k:chan v:tok (4)": (4, 4, "chan", "tok"),
    "k:chan32 v:tok (4)": (4, 4, "chan32", "tok"),
    "k:chan v:chan (2)": (2, 2, "chan", "chan"),
    "k:chan v:tok (2)": (2, 2, "chan", "tok"),
    "k:chan32 v:tok (2)": (2, 2, "chan32", "tok"),
    "k:chan scaled v:tok (4)": (4, 4, "chan", "tok", True),
    "k:chan scaled v:8 bits": (4, 8, "chan", "chan", True),
    "k:8 bits v:tok (4)": (8, 4, "chan", "tok"),
    "k:chan32 scaled v:tok (4)": (4, 4, "chan32", "tok", True),
    "k:chan v:tok lsq zero (4)": (4, 4, "chan", "tok", False, True),
    "k:chan v:tok lsq zero (2)": (2, 2, "chan", "tok", False, True),
    "k:chan v:tok first block (4)": (4, 4, "chan", "tok", False, False, True),
    "k:chan v:tok first block (2)": (2, 2, "chan", "tok", False, False, True),
    "k:chan32 v:tok first block (4)": (4, 4, "chan32", "tok", False, False, True),
    "k:chan32 v:tok first block (2)": (2, 2, "chan32", "tok", False, False, True),
    "k:chan32 v:tok32 first block (2)": (2, 2, "chan32", "tok32", False, False, True),
    "k:chan16 v:tok first block (2)": (2, 2, "chan16", "tok", False, False, True),
    "k:chan scaled v:tok first block (4)": (4, 4, "chan", "tok", True, False, True),
    "k:chan32 scaled v:tok first block (4)": (4, 4, "chan32", "tok", True, False, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(VARIANTS), help="only these variants")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, tokenizer = models.load(a.model, a.device)
    runner = evaluate.Runner(model)
    held = tokenizer(corpus.text_of(corpus.HELD_OUT), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(corpus.token_windows(held, a.prefix + a.steps + 1, a.windows, skip=2000), device=model.device)
    library = {c.name: c for c in evaluate.configurations([1.0] * runner.layers * runner.kv_heads, runner.layers,
                                                          runner.kv_heads)}
    runs = [("fp16", library["fp16"])] + [(n, library[n]) for n in ("kv4", "kv2", "kivi4", "kivi4_g64", "kivi2")]
    for c in (library["kv4"], library["kv2"]):
        c.prefill = "sdpa"  # the variants use FP16 prefill: compare caches alone
    runs += [(name, evaluate.Config(name, prefill="sdpa", cache="fp16")) for name in (a.only or VARIANTS)]
    new_cache = runner.new_cache
    runner.new_cache = lambda c, batch, length: (Cache(layers=[VariantLayer(*VARIANTS[c.name]) for _ in range(runner.layers)])
                                                 if c.name in VARIANTS else new_cache(c, batch, length))
    ref, rows, t0 = None, [], time.time()
    for name, c in runs:
        _, dec, _ = evaluate.run_windows(runner, c, windows, a.prefix, a.steps, 1)
        if ref is None:
            ref = torch.log_softmax(dec, -1)
        m = evaluate._metrics(dec, ref, windows[:, a.prefix + 1:])
        rows.append({"variant": name, "ppl": math.exp(m["nll"] / m["n"]), "kl": m["kl"] / m["n"],
                     "top1_agree": m["agree"] / m["n"]})
        print(f"{name:24s} ppl {rows[-1]['ppl']:8.3f}  KL {rows[-1]['kl']:.4f}  top-1 {rows[-1]['top1_agree']:.3f}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "device": str(model.device), "windows": a.windows, "prefix": a.prefix,
                       "steps": a.steps, "commit": os.environ.get("TURBOATTN_COMMIT", ""),
                       "card": models.device_name(model.device),
                       "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
