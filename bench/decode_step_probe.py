"""Where a decode step's time goes in turboattn.hf (docs/BENCHMARKS.md, "Serving throughput"), on a
random-weight model of SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads, head dim 64; the weights do
not change the times). Needs a CUDA GPU and the library (TURBOATTN_LIB).

    python bench/decode_step_probe.py calls BATCH CONTEXT [STEPS] [REPEATS]
        kv4: the host time of each library call in STEPS decode steps (percentiles, the longest), to
        tell steady cost from waits.
    python bench/decode_step_probe.py gpu BATCH CONTEXT
        fp16 (DynamicCache, SDPA's FlashAttention-2) and kv4 at the same batch: the host-bound step, then
        a 0.3 s GPU sleep with two steps queued behind it and CUDA events around each, five times. What
        the host queued while the GPU slept runs back to back, so the first pair times the GPU alone when
        the host queued that step whole.
"""
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from turboattn import hf
from turboattn.benchmarks import serve


def model_of_smollm2_shape():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1 << 16,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()


def stepper(model, cache):
    kw = {"past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
    return lambda x: model(input_ids=x, **kw).logits[:, -1].argmax(-1, keepdim=True)


def library_calls(batch, context, steps=64, repeats=2):
    model = hf.patch(model_of_smollm2_shape(), hf.TurboConfig())
    ids = torch.randint(0, 49152, (batch, context), device="cuda")
    for rep in range(repeats):
        cache = hf.TurboCache(model, max_seqs=batch, max_seq_len=context + steps + 8)
        step = stepper(model, cache)
        with torch.no_grad():
            tok = step(ids)
            torch.cuda.synchronize()
            clock = serve.HostClock()
            t0 = time.perf_counter()
            with serve.library_timed(clock):
                for _ in range(steps):
                    tok = step(tok)
                torch.cuda.synchronize()
            t = time.perf_counter() - t0
        us = sorted(1e6 * d for d in clock.calls)
        n = len(us)
        print(f"repeat {rep}, {batch} x {context}: step {1e3 * t / steps:.2f} ms, library {1e-3 * sum(us) / steps:.2f} "
              f"ms per step in {n} calls; us per call p50 {us[n // 2]:.0f} p90 {us[int(n * .9)]:.0f} "
              f"p99 {us[int(n * .99)]:.0f} max {us[-1]:.0f}; over 1 ms: {sum(u > 1e3 for u in us)}", flush=True)
        del cache, step


def gpu_time(batch, context, sleep_cycles=int(6e8)):
    model = model_of_smollm2_shape()
    ids = torch.randint(0, 49152, (batch, context), device="cuda")
    for config in ("fp16", "kv4"):
        if config == "kv4":
            hf.patch(model, hf.TurboConfig())
            cache, backend = hf.TurboCache(model, max_seqs=batch, max_seq_len=context + 64), None
        else:
            model.config._attn_implementation = "sdpa"
            cache, backend = DynamicCache(), SDPBackend.FLASH_ATTENTION
        step = stepper(model, cache)
        with torch.no_grad(), (sdpa_kernel(backend) if backend else torch.no_grad()):
            tok = step(ids)
            for _ in range(3):
                tok = step(tok)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(8):
                tok = step(tok)
            torch.cuda.synchronize()
            host_bound = (time.perf_counter() - t0) / 8
            behind = []
            for _ in range(5):
                events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                torch.cuda._sleep(sleep_cycles)
                h0 = time.perf_counter()
                events[0].record()
                tok = step(tok)
                events[1].record()
                tok = step(tok)
                events[2].record()
                queued = time.perf_counter() - h0
                torch.cuda.synchronize()
                behind.append((events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]), 1e3 * queued))
        print(f"{config} {batch} x {context}: host-bound step {1e3 * host_bound:.1f} ms; behind the sleep (first step ms, "
              "second, host ms to queue both): " + "  ".join(f"{a:.1f}/{b:.1f}/{q:.0f}" for a, b, q in behind), flush=True)
        del cache, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    mode, numbers = sys.argv[1], [int(a) for a in sys.argv[2:]]
    {"calls": library_calls, "gpu": gpu_time}[mode](*numbers)
