"""PyTorch operators, with fake (meta) implementations so that torch.compile can trace through them:

    torch.ops.turboattn.attention(q, k, v, causal, softmax_scale, use_sas, smooth_k) -> out
    torch.ops.turboattn.cache_write(cache, layer, seqs, k, v, cu_seqlens)            (KVCache.write)
    torch.ops.turboattn.cache_append(cache, layer, seqs, k, v)                       (KVCache.append)
    torch.ops.turboattn.decode(cache, layer, seqs, q, softmax_scale, use_sas, split_tiles) -> out
    torch.ops.turboattn.cache_append_decode(cache, layer, seqs, k, v, q, softmax_scale, use_sas, split_tiles) -> out
                                                                                     (KVCache.append_decode)

`cache` is KVCache.handle (an int) and `seqs` a list of sequence ids.

The operators are defined with torch.library.Library and a schema, with the Python functions registered
as their CPU and CUDA kernels. torch.library.custom_op would do the same with less text, but its eager
wrapper costs about 8 us per call on top, and decode runs once per layer per generated token."""
import torch

from . import KVCache
from . import attention as _attention

_lib = torch.library.Library("turboattn", "DEF")  # kept alive for as long as the module: it owns the definitions


def _define(schema, kernel, fake):
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    for key in ("CPU", "CUDA"):
        _lib.impl(name, kernel, key)
    torch.library.register_fake(f"turboattn::{name}", fake, lib=_lib)
    return getattr(torch.ops.turboattn, name)


def _attention_kernel(q, k, v, causal=False, softmax_scale=0.0, use_sas=True, smooth_k=True):
    """q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D] (fp16 or bf16); returns out like q."""
    return _attention(q, k, v, causal=causal, softmax_scale=softmax_scale, use_sas=use_sas, smooth_k=smooth_k,
                      out=torch.empty(q.shape, dtype=q.dtype, device=q.device))


def _cache_write_kernel(cache, layer, seqs, k, v, cu_seqlens):
    """KVCache.write: k, v [T, Hkv, D] of len(seqs) sequences delimited by cu_seqlens (int32 [len(seqs) + 1])."""
    KVCache.from_handle(cache).write(layer, seqs, k, v, cu_seqlens)


def _cache_append_kernel(cache, layer, seqs, k, v):
    """KVCache.append: one token per sequence, k, v [len(seqs), Hkv, D]."""
    KVCache.from_handle(cache).append(layer, seqs, k, v)


def _decode_kernel(cache, layer, seqs, q, softmax_scale=0.0, use_sas=True, split_tiles=0):
    """KVCache.decode: q [len(seqs), q_len, Hq, D]; returns out like q."""
    return KVCache.from_handle(cache).decode(layer, seqs, q, softmax_scale=softmax_scale, use_sas=use_sas,
                                             split_tiles=split_tiles, out=torch.empty_like(q))


def _append_decode_kernel(cache, layer, seqs, k, v, q, softmax_scale=0.0, use_sas=True, split_tiles=0):
    """KVCache.append_decode: k, v [len(seqs), Hkv, D] appended, then q [len(seqs), q_len, Hq, D] decoded."""
    return KVCache.from_handle(cache).append_decode(layer, seqs, k, v, q, softmax_scale=softmax_scale, use_sas=use_sas,
                                                    split_tiles=split_tiles, out=torch.empty_like(q))


def _append_decode_fake(cache, layer, seqs, k, v, q, *args):
    return torch.empty_like(q)


def _attention_fake(q, *args):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _decode_fake(cache, layer, seqs, q, *args):
    return torch.empty_like(q)


def _nothing(*args, **kwargs):
    return None


attention = _define("attention(Tensor q, Tensor k, Tensor v, bool causal=False, float softmax_scale=0., "
                    "bool use_sas=True, bool smooth_k=True) -> Tensor", _attention_kernel, _attention_fake)
cache_write = _define("cache_write(int cache, int layer, int[] seqs, Tensor k, Tensor v, Tensor cu_seqlens) -> ()",
                      _cache_write_kernel, _nothing)
cache_append = _define("cache_append(int cache, int layer, int[] seqs, Tensor k, Tensor v) -> ()",
                       _cache_append_kernel, _nothing)
decode = _define("decode(int cache, int layer, int[] seqs, Tensor q, float softmax_scale=0., bool use_sas=True, "
                 "int split_tiles=0) -> Tensor", _decode_kernel, _decode_fake)
cache_append_decode = _define("cache_append_decode(int cache, int layer, int[] seqs, Tensor k, Tensor v, Tensor q, "
                              "float softmax_scale=0., bool use_sas=True, int split_tiles=0) -> Tensor",
                              _append_decode_kernel, _append_decode_fake)

# The cache ops change (write, append, append_decode) or read (decode) state that torch cannot see: the cache is not a
# tensor argument. Without more, torch.compile drops write and append (no outputs, no mutated inputs)
# and may move them past a decode. An ordered effect keeps every one of them, in program order.
try:  # a private torch API (present in 2.11 to 2.15); eager calls work without it
    for _op in (cache_write, cache_append, decode, cache_append_decode):
        torch.library._register_effectful_op(_op.default, torch.library.EffectType.ORDERED)
except AttributeError:
    import warnings
    warnings.warn("turboattn: this torch cannot mark the cache ops as ordered effects; under torch.compile "
                  "cache_write and cache_append may be dropped or reordered")
