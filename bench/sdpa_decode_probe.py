"""What SDPA's automatic backend choice costs a decode step (docs/BENCHMARKS.md, "Serving throughput"):
host time per call of a decode-shaped scaled_dot_product_attention (q_len 1, 9 over 3 heads, D = 64,
batch 64) when the KV length stays the same and when it grows by one each call (as in generation), with
PyTorch's own choice and with the FlashAttention-2 backend, and the kernels each runs. Needs a CUDA GPU.

    python bench/sdpa_decode_probe.py
"""
import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
B, HQ, HKV, D = 64, 9, 3, 64
q = torch.randn(B, HQ, 1, D, dtype=torch.float16, device="cuda")
kv = torch.randn(B, HKV, 1400, D, dtype=torch.float16, device="cuda")
def run(ctx, lengths):
    host = []
    with ctx:
        for L in lengths:
            k = kv[:, :, :L]
            t = time.perf_counter(); F.scaled_dot_product_attention(q, k, k, enable_gqa=True); host.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return sorted(host)[len(host) // 2] * 1e6
for name, ctx in (("default", contextlib.nullcontext), ("flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]))):
    run(ctx(), [1280])
    print(f"{name}: host us per call, same length {run(ctx(), [1280] * 20):.0f}, new length each call {run(ctx(), range(1281, 1301)):.0f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with ctx():
            F.scaled_dot_product_attention(q, kv[:, :, :1350], kv[:, :, :1350], enable_gqa=True)
        torch.cuda.synchronize()
    print("  kernels:", sorted({e.name[:70] for e in prof.events() if e.device_type != torch.autograd.DeviceType.CPU}))
