#!/usr/bin/env python3
"""What each choice of the cache format costs on a real model (docs/ACCURACY.md, "Where the 4-bit
loss comes from"): the stage-1/stage-2 quantization of docs/FORMATS.md 3.1-3.3, re-implemented here as
quantize-then-dequantize in PyTorch, with its grouping varied (stage 2 per channel over a 64-token
block, per channel over 32 tokens, or per token over the channels; K or V alone at 4 bits), run through
the evaluation's protocol (also K's channels scaled by their range first, "scaled") beside the library's own cache ("kv4", "kv2") and KIVI-style. The simulation
of the current format ("k:chan v:tok", since a31dfde; "k:chan v:chan" before) must land on the library's
numbers; that is its check.

    PYTHONPATH=bindings/python python3 bench/kv_format_variants.py [--device cuda] [--windows 16]
        [--prefix 1024] [--steps 256] [--out eval/results/format_variants.json]
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


def _block_int8(x):
    """FORMATS 3.1-3.2 on [..., T, D] (T a multiple of 64): per-token INT8 codes, then requantized to
    the block's largest token scale. Returns (codes as float64, block scale [..., blocks, 1, 1])."""
    *b, T, D = x.shape
    xb = x.reshape(*b, T // 64, 64, D).double()
    s = (xb.abs().amax(-1, keepdim=True) / 127).float().double()
    q = torch.where(s > 0, torch.round(xb / torch.where(s > 0, s, 1)), 0).clamp(-127, 127)
    block = s.amax(-2, keepdim=True)
    ratio = (s / torch.where(block > 0, block, 1)).float().double()
    return torch.round(q * ratio), block


def _stage2(q, bits, dim):
    """FORMATS 3.3 along `dim` of INT8 codes: an integer grid centred on [min, max], kept in INT8."""
    levels = (1 << bits) - 1
    lo, hi = q.amin(dim, keepdim=True), q.amax(dim, keepdim=True)
    step = torch.clamp(torch.ceil((hi - lo) / levels), min=1)
    slack = levels * step - (hi - lo)
    zero = torch.clamp(torch.minimum(lo - torch.floor(slack / 2), 127 - levels * step), min=-128)
    return zero + torch.clamp(torch.round((q - zero) / step), max=levels) * step


def quantize_blocks(x, bits, grouping):
    """x [..., T, D] -> its dequantized values. grouping: "chan" (per channel over 64 tokens), "chan32"
    (per channel over 32 tokens) or "tok" (per token over the channels); bits 8: stage 1 only."""
    q, block = _block_int8(x)
    if bits < 8:
        if grouping == "tok":
            q = _stage2(q, bits, -1)
        elif grouping == "chan32":
            q = _stage2(q.unflatten(-2, (2, 32)), bits, -2).flatten(-3, -2)
        else:
            q = _stage2(q, bits, -2)
    *b, blocks, T, D = q.shape
    return (q * block).reshape(*b, blocks * T, D).to(x.dtype)


class VariantLayer(DynamicLayer):
    """Full 64-token blocks quantized as above; the partial block as the INT8 buffer (per-token codes).
    k_scaled: K's channels divided by their range over the first write before quantization and
    multiplied back after (scale migration: Q would take the factors, exactly)."""

    def __init__(self, k_bits, v_bits, k_grouping, v_grouping, k_scaled=False):
        super().__init__()
        self.k_bits, self.v_bits, self.k_grouping, self.v_grouping = k_bits, v_bits, k_grouping, v_grouping
        self.k_scaled, self.done, self.mu, self.k_range = k_scaled, 0, None, 1.0

    def update(self, key_states, value_states, *args, **kwargs):
        if self.mu is None:  # K smoothing: the first write's mean (FORMATS 1.4)
            self.mu = key_states.double().mean(-2, keepdim=True).float()
            if self.k_scaled:
                self.k_range = (key_states - self.mu).abs().amax(-2, keepdim=True).clamp_min(1e-6)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        full = (keys.shape[-2] - self.done) // 64 * 64
        seen = (keys.clone(), values.clone()) if full else (keys, values)
        if full:
            s = slice(self.done, self.done + full)
            k = (keys[..., s, :] - self.mu) / self.k_range
            self.keys[..., s, :] = quantize_blocks(k, self.k_bits, self.k_grouping) * self.k_range + self.mu
            self.values[..., s, :] = quantize_blocks(values[..., s, :], self.v_bits, self.v_grouping)
            self.done += full
        return seen


VARIANTS = {  # name: (K bits, V bits, K grouping, V grouping)
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
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, tokenizer = models.load(a.model, a.device)
    runner = evaluate.Runner(model)
    held = tokenizer(corpus.text_of(corpus.HELD_OUT), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(corpus.token_windows(held, a.prefix + a.steps + 1, a.windows, skip=2000), device=model.device)
    library = {c.name: c for c in evaluate.configurations([1.0] * runner.layers * runner.kv_heads, runner.layers,
                                                          runner.kv_heads)}
    runs = [("fp16", library["fp16"])] + [(n, library[n]) for n in ("kv4", "kv2", "kivi4", "kivi2")]
    for c in (library["kv4"], library["kv2"]):
        c.prefill = "sdpa"  # the variants use FP16 prefill: compare caches alone
    runs += [(name, evaluate.Config(name, prefill="sdpa", cache="fp16")) for name in VARIANTS]
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
                       "card": torch.cuda.get_device_name() if model.device.type == "cuda" else "CPU",
                       "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
