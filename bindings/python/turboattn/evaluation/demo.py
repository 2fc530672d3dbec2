"""`turboattn demo`: the README's main job. On the model a package bundles (SmolLM2-135M-Instruct by
default), it generates from a prompt with the FP16 cache and with turboattn (FlashQ + SAS prefill, the
compressed cache), and prints both texts, the KV memory of each, the perplexity of each on a held-out
passage, and the speed; on the GPU when there is one, on the CPU otherwise.
"""
import math
import time

import torch

from .. import dense_kv_bytes_per_token, hf
from . import corpus, evaluate
from .models import device_name

DEFAULT_PROMPT = "Write three sentences about why the sea is salty."


def _chat_ids(tokenizer, prompt, device):
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids.to(device)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _generate(model, ids, new_tokens, cache):
    _sync(model.device)  # callers warm up first: the first call of a process pays CUDA's start-up
    t = time.perf_counter()
    given = {hf._cache_kwarg(model): cache} if cache is not None else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **given)
    _sync(model.device)
    return out[0, ids.shape[1]:], time.perf_counter() - t


@torch.no_grad()
def _perplexity(model, window, prefix, cache):
    """Perplexity of window[prefix + 1:], the prefix prefilled into `cache`, then the evaluation's
    teacher-forced decode over it."""
    runner = evaluate.Runner(model)
    runner._forward(window[:, :prefix], cache)
    logits = evaluate.teacher_forced(runner, window, prefix, window.shape[1] - 1, cache)
    nll = -torch.log_softmax(logits, -1).gather(-1, window[:, prefix + 1:, None])
    return math.exp(nll.mean().item())


def run(model, tokenizer, *, prompt=DEFAULT_PROMPT, new_tokens=64, config=None, ppl_prefix=512, ppl_tokens=128,
        out=print):
    """Prints the comparison; returns its numbers."""
    from transformers import DynamicCache
    device = model.device
    config = config or hf.TurboConfig(bits=4)
    ids = _chat_ids(tokenizer, prompt, device)
    layers, kv_heads, head_dim = hf._shape(model)
    plain_bytes = dense_kv_bytes_per_token(layers, kv_heads, head_dim, torch.finfo(model.dtype).bits // 8)  # the model's dtype
    novels = corpus.austen_novels()
    held = tokenizer(corpus.text_of(corpus.HELD_OUT[:1], novels), add_special_tokens=False)["input_ids"]
    window = torch.tensor([held[2000:2000 + ppl_prefix + ppl_tokens + 1]], device=device)
    res = {}

    model.set_attn_implementation("sdpa")
    _generate(model, ids, 2, None)  # warm-up
    text, secs = _generate(model, ids, new_tokens, None)
    res["fp16"] = {"text": tokenizer.decode(text, skip_special_tokens=True), "seconds": secs,
                   "kv_bytes_per_token": plain_bytes,
                   "ppl": _perplexity(model, window, ppl_prefix, DynamicCache())}

    hf.patch(model, config)
    _generate(model, ids, 2, hf.TurboCache(model, config, max_seqs=1, max_seq_len=ids.shape[1] + 3))  # warm-up
    cache = hf.TurboCache(model, config, max_seqs=1, max_seq_len=ids.shape[1] + new_tokens + 1)
    text, secs = _generate(model, ids, new_tokens, cache)
    ppl_cache = hf.TurboCache(model, config, max_seqs=1, max_seq_len=window.shape[1])
    res["turboattn"] = {"text": tokenizer.decode(text, skip_special_tokens=True), "seconds": secs,
                        "kv_bytes_per_token": cache.memory()["bytes_per_token"],
                        "ppl": _perplexity(model, window, ppl_prefix, ppl_cache)}
    hf.unpatch(model)

    where = device_name(device)
    out(f"model: {type(model).__name__}, {layers} layers x {kv_heads} KV heads x head dim {head_dim}, on {where}")
    out(f"prompt: {prompt!r}; {new_tokens} new tokens, greedy\n")
    plain = str(model.dtype).replace("torch.", "").replace("float", "FP").replace("bFP", "BF")  # FP16, FP32, BF16
    label = {"fp16": f"{plain} cache (transformers, SDPA)", "turboattn": f"turboattn ({config.bits}-bit cache, "
             f"FlashQ + SAS prefill{'' if config.use_sas else ', SAS off'})"}
    for name in ("fp16", "turboattn"):
        r = res[name]
        out(f"--- {label[name]}\n{r['text'].strip()}\n")
    out(f"{'':34s}{plain:>12s}{'turboattn':>12s}")
    f, t = res["fp16"], res["turboattn"]
    out(f"{'KV cache bytes per token':34s}{f['kv_bytes_per_token']:12.0f}{t['kv_bytes_per_token']:12.0f}"
        f"   ({f['kv_bytes_per_token'] / t['kv_bytes_per_token']:.2f}x smaller)")
    out(f"{'perplexity, held-out Austen':34s}{f['ppl']:12.3f}{t['ppl']:12.3f}   ({100 * (t['ppl'] / f['ppl'] - 1):+.2f}%; "
        f"{ppl_tokens} tokens after {ppl_prefix}, {corpus.HELD_OUT[0]})")
    out(f"{'tokens per second (generate)':34s}{new_tokens / f['seconds']:12.1f}{new_tokens / t['seconds']:12.1f}"
        f"   (batch 1: host-bound at this model size)")
    return res
