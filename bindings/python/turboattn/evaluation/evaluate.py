"""`turboattn eval`: what each part of the method costs in accuracy, on a real model and real text.

Protocol (docs/ACCURACY.md): held-out windows of `prefix + steps + 1` tokens, `batch` windows at a time.
Each configuration prefills the prefix (one forward: its logits measure the prefill attention), then
feeds the next `steps` tokens one at a time over its cache, exactly as generation does (teacher forcing:
the logits of each step measure decode over the cache). Both are compared with the FP16 model's logits
on the same tokens: perplexity, KL(FP16 || config) of the next-token distribution, top-1 agreement.
The passkey test prefills a haystack with a 5-digit key hidden at a depth, feeds the question over the
cache and decodes the answer greedily.
"""
import dataclasses
import math
import random
import time

import torch

from .. import assign_head_bits, dense_kv_bytes_per_token, hf
from . import corpus
from .kivi import KiviCache, kivi_bytes_per_token


@dataclasses.dataclass
class Config:
    name: str
    prefill: str = "flashq"      # "sdpa" (FP16) or "flashq" (FlashQ + SAS)
    cache: str = "turbo"         # "fp16", "turbo", "kivi", "hf_quantized" (transformers' QuantizedCache)
    bits: int = 4                # turbo: bits of every head (without head_bits); kivi: bits
    head_bits: list = None       # turbo: bits per (layer, KV head)
    use_sas: bool = True
    smooth_k: bool = True
    selection: str = None        # mixed heads: "priority" (gap x std), "random", "index" per layer;
                                 # "sensitivity", "random_model" over the whole model
    fraction_2bit: float = 0.0   # of KV heads at 2 bits, as assigned
    kivi_group: int = 32         # kivi and hf_quantized: values per (scale, minimum) group
    kivi_residual: int = 64      # kivi and hf_quantized: most recent tokens kept in fp16
    backend: str = None          # hf_quantized: "quanto" or "hqq"
    passkey: bool = False        # run the passkey test too


def _mixed_bits(priority, layers, kv_heads, fraction, selection, seed=0):
    """4/2 bits per head with round(fraction * kv_heads) heads of each layer at 2 bits (FORMATS.md 3.6),
    chosen by lowest priority, at random, or lowest index."""
    if selection == "priority":
        return assign_head_bits(priority, layers, kv_heads, fraction)
    k = int(round(fraction * kv_heads + 1e-9))
    rng = random.Random(seed)
    bits = []
    for _ in range(layers):
        low = set(rng.sample(range(kv_heads), k) if selection == "random" else range(k))
        bits += [2 if h in low else 4 for h in range(kv_heads)]
    return bits


def configurations(priority, layers, kv_heads, fractions=(0.25, 0.5, 0.75), sensitivity=None):
    """The issue's list: FP16; FlashQ + SAS prefill only; KV 8/4/2 bits; mixed 2/4 by three selections
    per layer; SAS and K smoothing off; KIVI-style at 4 and 2 bits. Fractions that round to the same
    head count in every layer (few KV heads) are run once. With `sensitivity` (hf.calibrate's measured
    priorities), mixes over the whole model at each fraction by it, and at 50% at random for contrast."""
    cfgs = [Config("fp16", prefill="sdpa", cache="fp16", passkey=True),
            Config("flashq_prefill", cache="fp16", passkey=True),
            Config("kv8", bits=8),
            Config("kv4", bits=4, passkey=True),
            Config("kv4_sdpa_prefill", prefill="sdpa", bits=4),
            Config("kv4_no_sas", bits=4, use_sas=False),
            Config("kv4_no_smooth_k", bits=4, smooth_k=False),
            Config("kv2", bits=2, passkey=True)]
    seen = set()
    for f in fractions:
        k = int(round(f * kv_heads + 1e-9))
        if k in seen or k in (0, kv_heads):
            continue
        seen.add(k)
        actual = k / kv_heads
        for sel in ("priority", "random", "index"):
            cfgs.append(Config(f"mix{round(100 * actual)}_{sel}", head_bits=_mixed_bits(priority, layers, kv_heads, f, sel),
                               selection=sel, fraction_2bit=actual, passkey=sel == "priority"))
    if sensitivity is not None:
        n = layers * kv_heads
        rng = random.Random(0)
        for f, selection, score in [(f, "sensitivity", sensitivity) for f in fractions] + \
                [(0.5, "random_model", [rng.random() for _ in range(n)])]:
            bits = assign_head_bits(score, layers, kv_heads, f, across_layers=True)
            actual = bits.count(2) / n  # the library rounds half away from zero
            cfgs.append(Config(f"mix{round(100 * actual)}_{selection}", selection=selection, fraction_2bit=actual,
                               head_bits=bits, passkey=selection == "sensitivity" and f == 0.5))
    # KIVI-style 4-bit with groups of 32 stores 16% more than our 4-bit cache; with groups of 64 it is
    # within 5% of it (the nearest KIVI-style 4-bit gets to matched memory at head dim 64).
    cfgs += [Config("kivi4", prefill="sdpa", cache="kivi", bits=4, passkey=True),
             Config("kivi4_g64", prefill="sdpa", cache="kivi", bits=4, kivi_group=64, passkey=True),
             Config("kivi2", prefill="sdpa", cache="kivi", bits=2, passkey=True)]
    backend = quantized_cache_backend()
    if backend:  # transformers' defaults: groups of 64, the last 128 tokens in fp16
        cfgs += [Config(f"hf_{backend}{b}", prefill="sdpa", cache="hf_quantized", bits=b, backend=backend,
                        kivi_group=64, kivi_residual=128) for b in (4, 2)]
    return cfgs


def quantized_cache_backend():
    """The first of transformers' QuantizedCache backends that imports here, or None: hqq (plain PyTorch
    operations, the same on CPU and GPU), then optimum-quanto (which compiles its kernels on first use)."""
    import importlib.util
    for backend, module in (("hqq", "hqq"), ("quanto", "optimum.quanto")):
        try:
            if importlib.util.find_spec(module) is not None:
                return backend
        except ModuleNotFoundError:
            continue
    return None


class Runner:
    """One model; builds each configuration's cache and attention and runs the protocol."""

    def __init__(self, model):
        self.model = model
        self.layers, self.kv_heads, self.head_dim = hf._shape(model)
        self.cache_kwarg = hf._cache_kwarg(model)

    def _attention(self, name, cfg=None):
        if name == "turboattn":
            hf.patch(self.model, cfg)
        else:
            self.model.set_attn_implementation(name)

    def _turbo_config(self, c):
        return hf.TurboConfig(bits=c.bits if c.head_bits is None else 4, head_bits=c.head_bits, use_sas=c.use_sas,
                              smooth_k=c.smooth_k, prefill=c.prefill)

    def new_cache(self, c, batch, length):
        if c.cache == "turbo":
            return hf.TurboCache(self.model, self._turbo_config(c), max_seqs=batch, max_seq_len=length)
        if c.cache == "kivi":
            return KiviCache(self.layers, c.bits, c.kivi_group, c.kivi_residual)
        if c.cache == "hf_quantized":
            from transformers.cache_utils import QuantizedCache
            return QuantizedCache(backend=c.backend, config=self.model.config, nbits=c.bits, q_group_size=c.kivi_group,
                                  residual_length=c.kivi_residual)
        from transformers import DynamicCache
        return DynamicCache()

    def _forward(self, ids, cache):
        return self.model(input_ids=ids, use_cache=True, **{self.cache_kwarg: cache}).logits.float()

    def prefill(self, c, ids, cache):
        """Logits of the prompt with the configuration's prefill; leaves the decode attention set."""
        turbo_cfg = self._turbo_config(c)
        if c.cache == "turbo":
            self._attention("turboattn", turbo_cfg)  # prefill by turbo_cfg.prefill, decode over the cache
            return self._forward(ids, cache)
        self._attention("turboattn" if c.prefill == "flashq" else "sdpa", turbo_cfg)
        logits = self._forward(ids, cache)
        self._attention("sdpa")  # FP16 decode over the fp16 or KIVI cache
        return logits

    def bytes_per_token(self, c, cache, tokens):
        """(asymptotic, at `tokens`) KV bytes per token, all layers, heads, K and V, metadata included."""
        if c.cache == "fp16":
            dense = float(dense_kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim))
            return dense, dense
        if c.cache in ("kivi", "hf_quantized"):  # hf_quantized: its codes and groups counted alike
            return kivi_bytes_per_token(c.bits, c.kivi_group, c.kivi_residual, tokens, self.layers, self.kv_heads,
                                        self.head_dim)
        m = cache.memory()
        # One sequence: its fixed parts, and the blocks after the first in pages.
        held = hf.cache_pages(1, tokens) * m["page_bytes_total"] + cache.kv.sequence_fixed_bytes()
        return m["bytes_per_token"], held / tokens


def _metrics(logits, ref_logp, targets):
    """Sums over positions: nll, KL(ref || this), top-1 agreement; and the count. Also each window's
    (batch row's) mean KL, for paired comparisons between configurations (report.paired_kl)."""
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, targets[..., None]).sum().item()
    kl_rows = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0).sum(-1)
    agree = (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
    return {"nll": nll, "kl": kl_rows.sum().item(), "agree": agree, "n": targets.numel(),
            "kl_windows": (kl_rows / targets.shape[-1]).tolist()}


def _add(acc, m):
    for k, v in m.items():
        acc[k] = acc.get(k, [] if isinstance(v, list) else 0) + v


@torch.no_grad()
def teacher_forced(runner, windows, start, stop, cache):
    """Logits [B, stop - start, V] of feeding windows[:, t], t = start .. stop - 1, one token at a time
    over `cache` (the true tokens, not the predicted ones), as generation reads its cache."""
    return torch.stack([runner._forward(windows[:, t:t + 1], cache)[:, -1] for t in range(start, stop)], 1)


@torch.no_grad()
def run_windows(runner, c, windows, prefix, steps, score_prefill):
    """Runs one configuration on a batch of windows [B, prefix + steps + 1]. Returns (prefill logits of
    the last `score_prefill` positions, decode logits [B, steps, V], cache)."""
    cache = runner.new_cache(c, windows.shape[0], prefix + steps + 1)
    pre = runner.prefill(c, windows[:, :prefix], cache)[:, prefix - score_prefill:]
    return pre, teacher_forced(runner, windows, prefix, prefix + steps, cache), cache


@torch.no_grad()
def passkey_accuracy(runner, c, tokenizer, haystack_ids, lengths, depths, keys):
    """Fraction of (length, depth, key) trials whose greedy answer contains the key; per length too."""
    device = runner.model.device
    per_length = {}
    for n in lengths:
        hits = 0
        for d in depths:
            for key in keys:
                ctx, question = corpus.passkey_prompt(tokenizer, haystack_ids, n, d, key)
                cache = runner.new_cache(c, 1, n + len(question) + 16)
                runner.prefill(c, torch.tensor([ctx], device=device), cache)
                logits = runner._forward(torch.tensor([question], device=device), cache)
                answer = []
                for _ in range(7):
                    tok = int(logits[0, -1].argmax())
                    answer.append(tok)
                    logits = runner._forward(torch.tensor([[tok]], device=device), cache)
                hits += str(key) in tokenizer.decode(answer)
        per_length[str(n)] = hits / (len(depths) * len(keys))
    return sum(per_length.values()) / len(per_length), per_length


def evaluate(model, tokenizer, *, windows=16, batch=8, prefix=1024, steps=256, score_prefill=256,
             passkey_lengths=(1024, 2048, 4096, 8192), passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_keys=3,
             calibration_tokens=8192, sensitivity_tokens=2048, only=None, progress=print, report=print):
    """Runs every configuration; returns the results dict (eval/results/*.json)."""
    device = model.device
    runner = Runner(model)
    novels = corpus.austen_novels()
    tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    calib_ids = tok(corpus.text_of(corpus.CALIBRATION, novels))[:calibration_tokens]
    held = tok(corpus.text_of(corpus.HELD_OUT, novels))
    hay = tok(corpus.text_of(corpus.HAYSTACK, novels))
    t0 = time.time()
    priority = hf.calibrate(model, torch.tensor([calib_ids]), 0.0, None, metric="gap_std")["priority"]
    # The sensitivity: one forward pass per KV head over the first `sensitivity_tokens` calibration tokens.
    sensitivity = None
    if not only or any(n.endswith(("_sensitivity", "_random_model")) for n in only):
        sensitivity = hf.calibrate(model, torch.tensor([calib_ids[:sensitivity_tokens]]), 0.0, None,
                                   progress=lambda d, n: d % 10 == 0 and progress(f"  sensitivity {d}/{n} heads"))["priority"]
    cfgs = configurations(priority, runner.layers, runner.kv_heads, sensitivity=sensitivity)
    if only:
        cfgs = [c for c in cfgs if c.name in only or c.name == "fp16"]
    length = prefix + steps + 1
    win = torch.tensor(corpus.token_windows(held, length, windows, skip=2000), device=device)
    acc = {c.name: {"prefill": {}, "decode": {}} for c in cfgs}
    memory = {}
    for b0 in range(0, windows, batch):
        w = win[b0:b0 + batch]
        ref = None
        for c in cfgs:
            pre, dec, cache = run_windows(runner, c, w, prefix, steps, score_prefill)
            if ref is None:  # fp16 runs first
                ref = (torch.log_softmax(pre, -1), torch.log_softmax(dec, -1))
            _add(acc[c.name]["prefill"], _metrics(pre, ref[0], w[:, prefix - score_prefill + 1:prefix + 1]))
            _add(acc[c.name]["decode"], _metrics(dec, ref[1], w[:, prefix + 1:prefix + steps + 1]))
            memory[c.name] = runner.bytes_per_token(c, cache, length - 1)  # the last token is never fed
            del cache
            progress(f"  windows {b0 + len(w)}/{windows}  {c.name:24s} {time.time() - t0:7.1f} s")
    rows = []
    for c in cfgs:
        row = {"config": c.name, "prefill": c.prefill, "cache": c.cache,
               "bits": None if c.cache == "fp16" else (c.bits if c.head_bits is None else "mixed"),
               "fraction_2bit": c.fraction_2bit if c.head_bits else (1.0 if c.bits == 2 and c.cache == "turbo" else 0.0),
               "selection": c.selection, "use_sas": c.use_sas, "smooth_k": c.smooth_k}
        for part in ("prefill", "decode"):
            a = acc[c.name][part]
            row[part] = {"ppl": math.exp(a["nll"] / a["n"]), "kl": a["kl"] / a["n"], "top1_agree": a["agree"] / a["n"],
                         "tokens": a["n"], "kl_by_window": a["kl_windows"]}
        asym, at = memory[c.name]
        row["kv_bytes_per_token"] = asym
        row[f"kv_bytes_per_token_at_{length - 1}"] = at
        rows.append(row)
        report(f"{c.name:24s} prefill ppl {row['prefill']['ppl']:.4f}  decode ppl {row['decode']['ppl']:.4f}  "
                 f"KL {row['decode']['kl']:.5f}  top1 {row['decode']['top1_agree']:.4f}  {asym:.0f} B/token")
    if passkey_lengths:
        max_len = int(getattr(hf._text_config(model), "max_position_embeddings", 8192) or 8192)
        # The answer's 7 tokens must fit in the model's positions too.
        lengths = [min(n, max_len - 8) for n in passkey_lengths if n <= max_len]
        keys = corpus.passkeys(passkey_keys)
        for c, row in zip(cfgs, rows):
            if c.passkey:
                row["passkey"], row["passkey_by_length"] = passkey_accuracy(runner, c, tokenizer, hay, lengths,
                                                                            passkey_depths, keys)
                report(f"{c.name:24s} passkey {row['passkey']:.3f} {row['passkey_by_length']}")
    hf.unpatch(model)
    return {"protocol": {"windows": windows, "prefix": prefix, "steps": steps, "score_prefill": score_prefill,
                         "held_out": list(corpus.HELD_OUT), "calibration": list(corpus.CALIBRATION),
                         "calibration_tokens": len(calib_ids), "sensitivity_tokens": min(len(calib_ids), sensitivity_tokens),
                         "haystack": list(corpus.HAYSTACK),
                         "passkey_lengths": list(passkey_lengths or []), "passkey_depths": list(passkey_depths),
                         "passkey_keys": passkey_keys},
            "model": {"layers": runner.layers, "kv_heads": runner.kv_heads, "head_dim": runner.head_dim,
                      "query_heads": int(hf._text_config(model).num_attention_heads)},
            "seconds": round(time.time() - t0, 1), "rows": rows}
