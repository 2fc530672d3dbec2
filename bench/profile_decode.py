"""One decode configuration, run a few times: the program to put under ncu or compute-sanitizer.

    PYTHONPATH=bindings/python TURBOATTN_LIB=build/libturboattn.so python bench/profile_decode.py BATCH CONTEXT BITS [SPLIT_TILES]
"""
import sys

import torch

import turboattn

batch, context, bits = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
split_tiles = int(sys.argv[4]) if len(sys.argv) > 4 else 0
HQ, HKV, D = 32, 8, 128
cache = turboattn.KVCache(1, HKV, D, num_pages=batch * (context // 64 + 1), max_seqs=batch, max_seq_len=context,
                          head_bits=[bits] * HKV, device="cuda")
seqs = [cache.add_sequence() for _ in range(batch)]
k = torch.randn(batch * context, HKV, D, dtype=torch.float16, device="cuda")
v = torch.randn_like(k)
cu = torch.arange(0, (batch + 1) * context, context, dtype=torch.int32)
cache.write(0, seqs, k, v, cu)
q = torch.randn(batch, 1, HQ, D, dtype=torch.float16, device="cuda")
for _ in range(3):
    out = cache.decode(0, seqs, q, split_tiles=split_tiles)
torch.cuda.synchronize()
print("ok", out.shape, float(out.float().abs().mean()))
