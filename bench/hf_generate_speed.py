"""generate() speed on the GPU through turboattn.hf against FP16 SDPA with transformers' own cache, on a
random fp16 Llama (8 layers, 16 query / 4 KV heads, D = 64): batch 8, 512-token prompts, 64 new tokens,
eager (no CUDA graphs), turboattn with its FlashQ prefill and with prefill="sdpa". At this size both
are bound by host work, so it measures the integration's per-step overhead, not attention. Optionally against an earlier turboattn/hf.py copied to
turboattn/_hf_old.py (how docs/BENCHMARKS.md's before/after row was taken).

    TURBOATTN_LIB=build/libturboattn.so PYTHONPATH=bindings/python python bench/hf_generate_speed.py
"""
import time

import torch
import transformers

import turboattn.hf as new

try:
    import turboattn._hf_old as old
except ImportError:
    old = None
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                               num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                               pad_token_id=0)
model = transformers.LlamaForCausalLM(cfg).half().cuda().eval()
B, N, NEW = 8, 512, 64
ids = torch.randint(1, 32000, (B, N), device="cuda")
padded = torch.ones(B, N, dtype=torch.long, device="cuda")
padded[1::2, :100] = 0
def run(mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          eos_token_id=None)
configs = (("fp16 sdpa", None, {}), ("turboattn before", old, {}), ("turboattn", new, {}),
           ("turboattn, sdpa prefill", new, {"prefill": "sdpa"}))
for label, mask in (("no padding", torch.ones_like(padded)), ("left-padded", padded)):
    for name, mod, extra in configs:
        if mod is None and name != "fp16 sdpa":
            continue
        for m in (old, new):
            if m is not None:
                m.unpatch(model)
        if mod is not None:
            mod._register()
            mod.patch(model, mod.TurboConfig(bits=4, **extra))
        run(mask)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run(mask)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{label:12s} {name:24s}: {dt * 1e3:7.1f} ms for {NEW} tokens x {B} rows ({B * NEW / dt:7.0f} tokens/s)", flush=True)
