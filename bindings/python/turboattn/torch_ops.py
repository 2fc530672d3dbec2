"""PyTorch custom operators with fake (meta) implementations, so that torch.compile can trace through them:

    torch.ops.turboattn.attention(q, k, v, causal, softmax_scale, use_sas, smooth_k) -> out
    torch.ops.turboattn.cache_write(cache, layer, seqs, k, v, cu_seqlens)            (KVCache.write)
    torch.ops.turboattn.cache_append(cache, layer, seqs, k, v)                       (KVCache.append)
    torch.ops.turboattn.decode(cache, layer, seqs, q, softmax_scale, use_sas, split_tiles) -> out

`cache` is KVCache.handle (an int) and `seqs` a list of sequence ids."""
import torch

from . import KVCache
from . import attention as _attention


@torch.library.custom_op("turboattn::attention", mutates_args=(), device_types=("cpu", "cuda"))
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, softmax_scale: float = 0.0,
              use_sas: bool = True, smooth_k: bool = True) -> torch.Tensor:
    """q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D] (fp16 or bf16); returns out like q."""
    return _attention(q, k, v, causal=causal, softmax_scale=softmax_scale, use_sas=use_sas, smooth_k=smooth_k,
                      out=torch.empty(q.shape, dtype=q.dtype, device=q.device))


@attention.register_fake
def _(q, k, v, causal=False, softmax_scale=0.0, use_sas=True, smooth_k=True):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# The cache ops change (write, append) or read (decode) state that torch cannot see: the cache is not a
# tensor argument. Without more, torch.compile drops write and append (no outputs, no mutated inputs)
# and may move them past a decode. An ordered effect keeps every one of them, in program order.
@torch.library.custom_op("turboattn::cache_write", mutates_args=(), device_types=("cpu", "cuda"))
def cache_write(cache: int, layer: int, seqs: list[int], k: torch.Tensor, v: torch.Tensor,
                cu_seqlens: torch.Tensor) -> None:
    """KVCache.write: k, v [T, Hkv, D] of len(seqs) sequences delimited by cu_seqlens (int32 [len(seqs) + 1])."""
    KVCache.from_handle(cache).write(layer, seqs, k, v, cu_seqlens)


@cache_write.register_fake
def _(cache, layer, seqs, k, v, cu_seqlens):
    return None


@torch.library.custom_op("turboattn::cache_append", mutates_args=(), device_types=("cpu", "cuda"))
def cache_append(cache: int, layer: int, seqs: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """KVCache.append: one token per sequence, k, v [len(seqs), Hkv, D]."""
    KVCache.from_handle(cache).append(layer, seqs, k, v)


@cache_append.register_fake
def _(cache, layer, seqs, k, v):
    return None


@torch.library.custom_op("turboattn::decode", mutates_args=(), device_types=("cpu", "cuda"))
def decode(cache: int, layer: int, seqs: list[int], q: torch.Tensor, softmax_scale: float = 0.0, use_sas: bool = True,
           split_tiles: int = 0) -> torch.Tensor:
    """KVCache.decode: q [len(seqs), q_len, Hq, D]; returns out like q."""
    return KVCache.from_handle(cache).decode(layer, seqs, q, softmax_scale=softmax_scale, use_sas=use_sas,
                                             split_tiles=split_tiles,
                                             out=torch.empty(q.shape, dtype=q.dtype, device=q.device))


@decode.register_fake
def _(cache, layer, seqs, q, softmax_scale=0.0, use_sas=True, split_tiles=0):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


try:  # a private torch API (present in 2.11 to 2.15); eager calls work without it
    for _op in (torch.ops.turboattn.cache_write, torch.ops.turboattn.cache_append, torch.ops.turboattn.decode):
        torch.library._register_effectful_op(_op.default, torch.library.EffectType.ORDERED)
except AttributeError:
    import warnings
    warnings.warn("turboattn: this torch cannot mark the cache ops as ordered effects; under torch.compile "
                  "cache_write and cache_append may be dropped or reordered")
