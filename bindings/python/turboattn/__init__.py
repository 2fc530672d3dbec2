"""turboattn: quantized attention (FlashQ + SAS) and a compressed KV cache, from Python.

    import turboattn
    out = turboattn.attention(q, k, v, causal=True)   # q [B, N, Hq, D], k, v [B, N, Hkv, D]

Works on torch tensors (CPU: the reference; CUDA: the kernels) and numpy arrays (CPU). With PyTorch
present, `torch.ops.turboattn.attention` and the cache ops `cache_write`, `cache_append` and `decode` are
registered too (usable under torch.compile; torch_ops.py).
docs/FORMATS.md in the repository defines every number computed.
"""
import contextlib
import ctypes
import sys
import weakref

from ._capi import (AttentionOptions, CacheConfig, CacheMemory, DecodeOptions, InvalidArgument, OutOfCapacity,
                    TurboattnError, Unsupported, check, describe, lib, on_device_of, ref, stream_of,
                    stream_source)

__all__ = ["attention", "attention_exact", "quantize_int8", "KVCache", "DecodePlan", "head_priority", "assign_head_bits",
           "dense_kv_bytes_per_token", "version", "cuda_available", "TurboattnError", "InvalidArgument", "Unsupported", "OutOfCapacity"]


def version():
    return lib.ta_version().decode()


def cuda_available():
    return bool(lib.ta_cuda_available())


def _empty_like(x, shape=None, dtype=None):
    if hasattr(x, "data_ptr"):
        import torch
        if shape is None and dtype is None:  # the per-token decode path: empty_like is the cheaper call
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        return torch.empty(shape if shape is not None else x.shape, dtype=dtype or x.dtype, device=x.device)
    import numpy as np
    return np.empty(shape if shape is not None else x.shape, dtype=dtype or x.dtype)


def _f32(x):
    if hasattr(x, "data_ptr"):
        import torch
        return torch.float32
    import numpy as np
    return np.float32


def attention(q, k, v, *, causal=False, softmax_scale=0.0, use_sas=True, smooth_k=True, out=None, return_lse=False,
              cu_seqlens_q=None, cu_seqlens_k=None):
    """FlashQ + SAS attention. q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D] (fp16/bf16, any strides with the
    last dim contiguous), or [T, H, D] with cu_seqlens_q / cu_seqlens_k (int32 [B + 1]) for variable
    length. Returns out (like q) and, with return_lse, the log-sum-exp [B, Hq, Nq] (or [Hq, Tq])."""
    out = _empty_like(q) if out is None else out
    lse = None
    if return_lse:
        lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
        lse = _empty_like(q, lse_shape, _f32(q))
    opt = AttentionOptions(float(softmax_scale), int(causal), int(use_sas), int(smooth_k))
    with on_device_of(q):
        check(lib.ta_attention(ref(describe(q)), ref(describe(k)), ref(describe(v)), ref(describe(cu_seqlens_q)),
                               ref(describe(cu_seqlens_k)), ctypes.byref(opt), ref(describe(out)), ref(describe(lse)),
                               stream_of(q)))
    return (out, lse) if return_lse else out


def attention_exact(q, k, v, *, causal=False, softmax_scale=0.0):
    """Exact attention in float64 on the CPU (the accuracy yardstick); CPU tensors only."""
    out = _empty_like(q)
    check(lib.ta_attention_exact(ref(describe(q)), ref(describe(k)), ref(describe(v)), None, None, float(softmax_scale),
                                 int(causal), ref(describe(out)), None))
    return out


def quantize_int8(x, shift=None):
    """Blockwise INT8 (docs/FORMATS.md 1.2) of x [B, N, H, D]: codes (int8, x's shape) and scales
    (float32 [B, H, ceil(N / 64)]); shift (float32 [B, H, D]) is subtracted first."""
    B, N, H, _ = x.shape
    if hasattr(x, "data_ptr"):
        import torch
        codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    else:
        import numpy as np
        codes = np.empty(x.shape, dtype=np.int8)
    scales = _empty_like(x, (B, H, (N + 63) // 64), _f32(x))
    with on_device_of(x):
        check(lib.ta_quantize_int8(ref(describe(x)), ref(describe(shift)), ref(describe(codes)), ref(describe(scales)),
                                   stream_of(x)))
    return codes, scales


def dense_kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes=2):
    """Bytes per token of an uncompressed K and V cache (FP16 by default), all layers and heads: the size the
    compressed cache is measured against (KVCache.memory()["fp16_bytes_per_token"] for a cache's own shape)."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def head_priority(k, v):
    """Priority of each KV head from calibration k, v [T, Hkv, D] (docs/FORMATS.md 3.6)."""
    out = (ctypes.c_float * k.shape[1])()
    check(lib.ta_head_priority(ref(describe(k)), ref(describe(v)), out))
    return list(out)


def assign_head_bits(priority, num_layers, num_kv_heads, fraction_2bit, *, across_layers=False):
    """Bits (4 or 2) per (layer, KV head) from priorities (num_layers * num_kv_heads values): the
    round(fraction_2bit * num_kv_heads) lowest of each layer at 2 bits, or with across_layers the
    round(fraction_2bit * num_layers * num_kv_heads) lowest of the model (priorities that compare across
    layers, such as hf.calibrate's measured sensitivity; docs/FORMATS.md 3.6)."""
    if len(priority) != num_layers * num_kv_heads:
        raise InvalidArgument(1, f"priority: {len(priority)} values, expected num_layers * num_kv_heads = "
                                 f"{num_layers * num_kv_heads}")
    p = (ctypes.c_float * len(priority))(*priority)
    out = (ctypes.c_int32 * len(priority))()
    rule = lib.ta_assign_head_bits_across_layers if across_layers else lib.ta_assign_head_bits
    check(rule(p, num_layers, num_kv_heads, float(fraction_2bit), out))
    return list(out)


def _where(x, name):
    """Where a tensor argument lives, as "cpu" or "cuda:N" (numpy arrays are "cpu")."""
    if x is None:
        raise InvalidArgument(1, f"{name}: is None, expected a tensor")
    if hasattr(x, "data_ptr"):
        return f"cuda:{x.device.index}" if x.is_cuda else str(x.device)
    if hasattr(x, "ctypes"):
        return "cpu"
    raise InvalidArgument(1, f"{name}: a {type(x).__name__}, expected a torch tensor or numpy array")


def _cache_device(device):
    """ "cpu" or "cuda:N", with "cuda" resolved to the current device now, so that checks compare exact devices."""
    d = str(device)
    if d == "cuda":
        import torch  # a CUDA cache is fed torch tensors
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    if d == "cpu" or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise InvalidArgument(1, f"device: {d!r}, expected 'cpu', 'cuda' or 'cuda:N'")


class KVCache:
    """The compressed paged KV cache (docs/FORMATS.md section 3), on the CPU or one CUDA device.

    device: "cpu", "cuda" (the current device) or "cuda:N". Tensors passed to write, append and decode
    must be on that device (CPU: torch tensors or numpy arrays), except write's cu_seqlens, which may
    also be on the CPU; sequence ids are Python ints. CUDA calls run on the current stream."""

    _live = weakref.WeakValueDictionary()  # handle value -> cache, for the torch ops (torch_ops.py)

    def __init__(self, num_layers, num_kv_heads, head_dim, num_pages, max_seqs, max_seq_len, head_bits=None, smooth_k=True,
                 device="cpu"):
        self.device = _cache_device(device)
        self._cuda_index = None if self.device == "cpu" else int(self.device[5:])
        self._decode_options = (None, None)  # the last decode's (softmax_scale, use_sas, split_tiles) and DecodeOptions
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_seqs = num_layers, num_kv_heads, head_dim, max_seqs
        bits = None
        if head_bits is not None:
            if len(head_bits) != num_layers * num_kv_heads:
                raise InvalidArgument(1, f"head_bits: {len(head_bits)} values, expected num_layers * num_kv_heads = "
                                         f"{num_layers * num_kv_heads}")
            self._bits = (ctypes.c_int32 * len(head_bits))(*head_bits)
            bits = ctypes.cast(self._bits, ctypes.POINTER(ctypes.c_int32))
        cfg = CacheConfig(num_layers, num_kv_heads, head_dim, num_pages, max_seqs, max_seq_len, bits, int(smooth_k))
        self._handle = ctypes.c_void_p()
        with self._on_device():  # the library allocates on the current device
            check(lib.ta_cache_create(ctypes.byref(cfg), 0 if self.device == "cpu" else 1, ctypes.byref(self._handle)))
        KVCache._live[self._handle.value] = self

    def _on_device(self):
        if self.device == "cpu":
            return contextlib.nullcontext()
        import torch
        if not torch.cuda.is_available():  # ta_cache_create then says why there is no CUDA cache
            return contextlib.nullcontext()
        return torch.cuda.device(self._cuda_index)

    # The module's names bound here: a cache still referenced at interpreter exit is destroyed in the
    # teardown, when module globals may be gone and imports fail ("sys.meta_path is None").
    def __del__(self, _finalizing=sys.is_finalizing, _plain=contextlib.nullcontext, _destroy=lib.ta_cache_destroy):
        if getattr(self, "_handle", None):
            # At exit, no switch to the cache's device (it imports torch): freeing needs no current device.
            with _plain() if _finalizing() else self._on_device():
                _destroy(self._handle)
            self._handle = None

    @property
    def handle(self):
        """The C handle's address as an int: the `cache` argument of the torch.ops.turboattn cache ops."""
        return self._handle.value

    @classmethod
    def from_handle(cls, handle):
        cache = cls._live.get(handle) if isinstance(handle, int) else None
        if cache is None:
            raise InvalidArgument(1, f"cache: {handle!r} is not the handle of a live KVCache (KVCache.handle)")
        return cache

    def add_sequence(self):
        s = ctypes.c_int32()
        check(lib.ta_cache_add_sequence(self._handle, ctypes.byref(s)))
        return s.value

    def release_sequence(self, seq):
        check(lib.ta_cache_release_sequence(self._handle, seq))

    def length(self, layer, seq):
        n = ctypes.c_int64()
        check(lib.ta_cache_sequence_length(self._handle, layer, seq, ctypes.byref(n)))
        return n.value

    def free_pages(self):
        n = ctypes.c_int32()
        check(lib.ta_cache_free_pages(self._handle, ctypes.byref(n)))
        return n.value

    def memory(self):
        m = CacheMemory()
        check(lib.ta_cache_memory_info(self._handle, ctypes.byref(m)))
        return {name: getattr(m, name) for name, _ in CacheMemory._fields_}

    def sequence_fixed_bytes(self):
        """Bytes each sequence slot holds outside the pages, all layers and KV heads: its INT8 buffers, its
        first blocks (8 bits) and its K means (fp32)."""
        m = self.memory()
        return (m["buffer_bytes"] + m["first_block_bytes"]) // self.max_seqs + 4 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def bytes_per_token(self):
        """Compressed page bytes per token, all layers and heads, K and V (FP16: memory()["fp16_bytes_per_token"])."""
        return self.memory()["bytes_per_token"]

    def read(self, layer, seq):
        """(k, v): every token sequence `seq` holds in `layer`, dequantized as decode reads it (K with
        its mean added back), float32 [length, Hkv, D] on the CPU (torch tensors if torch imports, else
        numpy), for a cache on either device (on CUDA: the device is synchronized and the sequence's
        pages copied to the host; for inspection and calibration, not for speed)."""
        n = self.length(layer, seq)
        shape = (n, self.num_kv_heads, self.head_dim)
        try:
            import torch
            k, v = torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.float32)
        except ImportError:
            import numpy as np
            k, v = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
        check(lib.ta_cache_read(self._handle, layer, seq, ref(describe(k)), ref(describe(v))))
        return k, v

    def _expect_here(self, name, x, cpu_ok=False):
        if self._cuda_index is not None and getattr(x, "is_cuda", False) and x.get_device() == self._cuda_index:
            return  # the per-token path's case, decided without building the device's name
        where = _where(x, name)
        if where != self.device and not (cpu_ok and where == "cpu"):
            raise InvalidArgument(1, f"{name}: on {where}, expected {self.device} (the cache's device)")

    @staticmethod
    def sequence_array(seqs):
        """Sequence ids converted once for write, append, decode and decode_plan, which take it in place of
        the list: a loop that passes the same sequences every step skips a per-call conversion (at a
        batch of a thousand sequences, tens of microseconds per call)."""
        return (ctypes.c_int32 * len(seqs))(*seqs)

    @staticmethod
    def _seqs(seqs):
        if isinstance(seqs, ctypes.Array):
            return seqs, len(seqs)
        return (ctypes.c_int32 * len(seqs))(*seqs), len(seqs)

    def write(self, layer, seqs, k, v, cu_seqlens):
        """Bulk write: k, v [T, Hkv, D] of len(seqs) sequences delimited by cu_seqlens (int32 [len(seqs) + 1],
        on the CPU or the cache's device; on CUDA the call reads it back, synchronizing the stream)."""
        self._expect_here("k", k)
        self._expect_here("v", v)
        self._expect_here("cu_seqlens", cu_seqlens, cpu_ok=True)
        arr, n = self._seqs(seqs)
        with on_device_of(k):
            check(lib.ta_cache_write(self._handle, layer, arr, n, ref(describe(k)), ref(describe(v)),
                                     ref(describe(cu_seqlens)), stream_of(k)))

    def append(self, layer, seqs, k, v):
        """One token per sequence: k, v [len(seqs), Hkv, D]."""
        self._expect_here("k", k)
        self._expect_here("v", v)
        arr, n = self._seqs(seqs)
        with on_device_of(k):
            check(lib.ta_cache_append(self._handle, layer, arr, n, ref(describe(k)), ref(describe(v)), stream_of(k)))

    def reserve(self, seqs, tokens):
        """Takes now the pages of each sequence's next `tokens` tokens (in every layer), so that appends
        to them can be captured in a CUDA graph (docs/INTEGRATION.md, "Decode steps in a CUDA graph").
        Raises OutOfCapacity, taking nothing, when they do not fit."""
        arr, n = self._seqs(seqs)
        stream = None
        if self._cuda_index is not None:
            import torch
            stream = ctypes.c_void_p(torch.cuda.current_stream(self._cuda_index).cuda_stream)
        with self._on_device():
            check(lib.ta_cache_reserve(self._handle, arr, n, int(tokens), stream))

    def sync(self):
        """After replaying a graph with captured appends: waits for the device and takes the lengths the
        appends reached into the host's bookkeeping (which writes, appends, length() and read() need).
        Raises OutOfCapacity when a replay found a sequence at the end of its reservation (that replay's
        token was not written)."""
        with self._on_device():
            check(lib.ta_cache_sync(self._handle))

    def _decode_args(self, seqs, q, out, softmax_scale, use_sas, split_tiles):
        """(out, the sequence array, its length, options) of a decode of q, out allocated unless given."""
        self._expect_here("q", q)
        out = _empty_like(q) if out is None else out
        self._expect_here("out", out)
        arr, n = self._seqs(seqs)
        key, memo = (softmax_scale, use_sas, split_tiles), self._decode_options  # read once: threads may share the cache
        if memo[0] != key:  # a model's layers pass the same options: built once
            memo = self._decode_options = (key, DecodeOptions(float(softmax_scale), int(use_sas), int(split_tiles)))
        return out, arr, n, memo[1]

    def decode(self, layer, seqs, q, *, softmax_scale=0.0, use_sas=True, split_tiles=0, out=None):
        """Attention of q [len(seqs), q_len, Hq, D] (the sequences' last q_len tokens) over the cache;
        returns out (like q; allocated unless given)."""
        out, arr, n, opt = self._decode_args(seqs, q, out, softmax_scale, use_sas, split_tiles)
        with on_device_of(q):
            check(lib.ta_decode(self._handle, layer, arr, n, ref(describe(q)), ctypes.byref(opt), ref(describe(out)),
                                stream_of(q)))
        return out

    def append_decode(self, layer, seqs, k, v, q, *, softmax_scale=0.0, use_sas=True, split_tiles=0, out=None):
        """append(layer, seqs, k, v) then decode(layer, seqs, q, ...) in one call (one decode step of one
        layer): everything both check is checked before anything is written. Returns out."""
        self._expect_here("k", k)
        self._expect_here("v", v)
        out, arr, n, opt = self._decode_args(seqs, q, out, softmax_scale, use_sas, split_tiles)
        with on_device_of(q):
            check(lib.ta_cache_append_decode(self._handle, layer, arr, n, ref(describe(k)), ref(describe(v)), ref(describe(q)),
                                             ctypes.byref(opt), ref(describe(out)), stream_of(q)))
        return out

    def decode_plan(self, seqs, q, out, *, softmax_scale=0.0, use_sas=True, split_tiles=0):
        """A decode of q [len(seqs), q_len, Hq, D] into out prepared once, for model loops that keep q and
        out in fixed buffers: plan(layer) runs it for one layer with the buffers' current contents on
        the current stream. q, out, the sequence list and the options are checked here, once
        (ta_decode_plan_create); each run checks only what can change between calls: the layer, that the
        sequences are still active and long enough, and that the cache's device is current (plan(layer)
        does not switch devices, unlike decode). q and out must keep their storage while the plan lives."""
        return DecodePlan(self, seqs, q, out, softmax_scale, use_sas, split_tiles)


class DecodePlan:
    """KVCache.decode_plan: one step's decode arguments, checked once in C (ta_decode_plan_create); call it
    with a layer."""

    def __init__(self, cache, seqs, q, out, softmax_scale, use_sas, split_tiles):
        cache._expect_here("q", q)
        cache._expect_here("out", out)
        self._cache, self._q, self._out = cache, q, out  # held: the plan points into them and its cache
        c_seqs, n = cache._seqs(seqs)
        options = DecodeOptions(float(softmax_scale), int(use_sas), int(split_tiles))
        plan = ctypes.c_void_p()
        with on_device_of(q):
            check(lib.ta_decode_plan_create(cache._handle, c_seqs, n, ctypes.byref(describe(q)), ctypes.byref(options),
                                            ctypes.byref(describe(out)), ctypes.byref(plan)))
        self._plan, self._stream = plan, stream_source(q)

    def __call__(self, layer):
        """Decode layer `layer` (on the current stream); returns out."""
        status = lib.ta_decode_plan_run(self._plan, layer, self._stream())
        if status:
            check(status)
        return self._out

    def __del__(self):
        if getattr(self, "_plan", None):
            lib.ta_decode_plan_destroy(self._plan)
            self._plan = None


try:  # the PyTorch operators, when PyTorch is installed
    from . import torch_ops  # noqa: F401
except ImportError:
    pass
