"""ctypes access to libturboattn's C API (include/turboattn/turboattn.h).

The library is loaded through ctypes, not compiled against PyTorch, so one build serves every PyTorch
version. Tensors are passed as descriptors of their memory: torch tensors (CPU or CUDA) and numpy
arrays (CPU) both work.
"""
import contextlib
import ctypes
import functools
import os

MAX_DIMS = 4


class TurboattnError(RuntimeError):
    """A failed turboattn call: `status` is the ta_status code, the message names the argument at fault."""

    def __init__(self, status, message):
        super().__init__(f"{lib.ta_status_string(status).decode()}: {message}")
        self.status = status


class InvalidArgument(TurboattnError, ValueError):
    pass


class Unsupported(TurboattnError, NotImplementedError):
    pass


class OutOfCapacity(TurboattnError, MemoryError):
    pass


_ERRORS = {1: InvalidArgument, 2: Unsupported, 3: OutOfCapacity}


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("device", ctypes.c_int), ("ndim", ctypes.c_int32),
                ("shape", ctypes.c_int64 * MAX_DIMS), ("strides", ctypes.c_int64 * MAX_DIMS)]


class AttentionOptions(ctypes.Structure):
    _fields_ = [("softmax_scale", ctypes.c_float), ("causal", ctypes.c_int32), ("use_sas", ctypes.c_int32),
                ("smooth_k", ctypes.c_int32)]


class CacheConfig(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("num_pages", ctypes.c_int32), ("max_seqs", ctypes.c_int32), ("max_seq_len", ctypes.c_int64),
                ("head_bits", ctypes.POINTER(ctypes.c_int32)), ("smooth_k", ctypes.c_int32)]


class CacheMemory(ctypes.Structure):
    _fields_ = [("page_bytes_total", ctypes.c_int64), ("pool_bytes", ctypes.c_int64), ("buffer_bytes", ctypes.c_int64),
                ("first_block_bytes", ctypes.c_int64), ("bytes_per_token", ctypes.c_double), ("fp16_bytes_per_token", ctypes.c_double)]


class DecodeOptions(ctypes.Structure):
    _fields_ = [("softmax_scale", ctypes.c_float), ("use_sas", ctypes.c_int32), ("split_tiles", ctypes.c_int32)]


def _find_library():
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("TURBOATTN_LIB"), os.path.join(here, "libturboattn.so"),
                  os.path.join(here, "..", "..", "..", "build", "libturboattn.so")]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    raise OSError("libturboattn.so not found: install the package (pip install .) or set TURBOATTN_LIB")


lib = ctypes.CDLL(_find_library())
lib.ta_last_error.restype = ctypes.c_char_p
lib.ta_version.restype = ctypes.c_char_p
lib.ta_status_string.restype = ctypes.c_char_p
_T = ctypes.POINTER(Tensor)
lib.ta_attention.argtypes = [_T, _T, _T, _T, _T, ctypes.POINTER(AttentionOptions), _T, _T, ctypes.c_void_p]
lib.ta_attention_exact.argtypes = [_T, _T, _T, _T, _T, ctypes.c_float, ctypes.c_int32, _T, _T]
lib.ta_quantize_int8.argtypes = [_T, _T, _T, _T, ctypes.c_void_p]
lib.ta_cache_create.argtypes = [ctypes.POINTER(CacheConfig), ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
lib.ta_cache_destroy.argtypes = [ctypes.c_void_p]
lib.ta_cache_destroy.restype = None
lib.ta_cache_memory_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(CacheMemory)]
lib.ta_cache_add_sequence.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32)]
lib.ta_cache_release_sequence.argtypes = [ctypes.c_void_p, ctypes.c_int32]
lib.ta_cache_sequence_length.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64)]
lib.ta_cache_free_pages.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32)]
lib.ta_cache_read.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, _T, _T]
_SEQS = ctypes.POINTER(ctypes.c_int32)
lib.ta_cache_write.argtypes = [ctypes.c_void_p, ctypes.c_int32, _SEQS, ctypes.c_int32, _T, _T, _T, ctypes.c_void_p]
lib.ta_cache_append.argtypes = [ctypes.c_void_p, ctypes.c_int32, _SEQS, ctypes.c_int32, _T, _T, ctypes.c_void_p]
lib.ta_cache_reserve.argtypes = [ctypes.c_void_p, _SEQS, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p]
lib.ta_cache_sync.argtypes = [ctypes.c_void_p]
lib.ta_decode.argtypes = [ctypes.c_void_p, ctypes.c_int32, _SEQS, ctypes.c_int32, _T, ctypes.POINTER(DecodeOptions), _T,
                          ctypes.c_void_p]
lib.ta_cache_append_decode.argtypes = [ctypes.c_void_p, ctypes.c_int32, _SEQS, ctypes.c_int32, _T, _T, _T,
                                       ctypes.POINTER(DecodeOptions), _T, ctypes.c_void_p]
lib.ta_decode_plan_create.argtypes = [ctypes.c_void_p, _SEQS, ctypes.c_int32, _T, ctypes.POINTER(DecodeOptions), _T,
                                      ctypes.POINTER(ctypes.c_void_p)]
lib.ta_decode_plan_run.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
lib.ta_decode_plan_destroy.argtypes = [ctypes.c_void_p]
lib.ta_decode_plan_destroy.restype = None
lib.ta_head_priority.argtypes = [_T, _T, ctypes.POINTER(ctypes.c_float)]
lib.ta_assign_head_bits.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_int32, ctypes.c_float,
                                    ctypes.POINTER(ctypes.c_int32)]
lib.ta_assign_head_bits_across_layers.argtypes = lib.ta_assign_head_bits.argtypes


def check(status):
    if status != 0:
        raise _ERRORS.get(status, TurboattnError)(status, lib.ta_last_error().decode())


_NUMPY_DTYPES = {"float16": 1, "float32": 3, "int8": 4, "uint8": 5, "int32": 6}
_torch_dtypes = {}  # torch.dtype -> ta_dtype; filled on the first torch tensor (torch is then imported)


def _torch_dtype_codes():
    import torch
    _torch_dtypes.update({torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.int8: 4, torch.uint8: 5,
                          torch.int32: 6})
    return _torch_dtypes


def describe(x):
    """A ta_tensor descriptor of a torch tensor or numpy array (or None for None). On the decode path of
    every generated token: kept to attribute reads and slice stores."""
    if x is None:
        return None
    t = Tensor()
    if hasattr(x, "data_ptr"):  # torch
        t.data, t.dtype = x.data_ptr(), (_torch_dtypes or _torch_dtype_codes()).get(x.dtype, 0)
        t.device = 1 if x.is_cuda else 0
        shape, strides = x.shape, x.stride()
    else:  # numpy
        t.data, t.dtype, t.device = x.ctypes.data, _NUMPY_DTYPES.get(str(x.dtype), 0), 0
        shape, strides = x.shape, tuple(s // x.itemsize for s in x.strides)
    n = len(shape)
    if n > MAX_DIMS:
        raise InvalidArgument(1, f"tensor of rank {n}: at most {MAX_DIMS} dimensions")
    t.ndim = n
    t.shape[:n] = shape
    t.strides[:n] = strides
    return t


def ref(t):
    return ctypes.byref(t) if t is not None else None


def _raw_stream_getter():
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what torch's own generated code calls
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


_raw_stream = None


def stream_source(x):
    """A function of no arguments giving the current CUDA stream of x's device as an int (x a torch CUDA
    tensor), or None (otherwise): for calls that pass the stream of the same device many times."""
    global _raw_stream
    if hasattr(x, "is_cuda") and x.is_cuda:
        if _raw_stream is None:
            _raw_stream = _raw_stream_getter()
        return functools.partial(_raw_stream, x.device.index)
    return lambda: None


def stream_of(x):
    """The current CUDA stream of a torch CUDA tensor's device, else None."""
    global _raw_stream
    if hasattr(x, "is_cuda") and x.is_cuda:
        if _raw_stream is None:
            _raw_stream = _raw_stream_getter()
        return ctypes.c_void_p(_raw_stream(x.get_device()))
    return None


def on_device_of(x):
    """A context that makes x's CUDA device current (the library runs on the current device); a no-op
    when it already is."""
    if hasattr(x, "is_cuda") and x.is_cuda:
        import torch
        if x.get_device() != torch.cuda.current_device():
            return torch.cuda.device(x.device)
    return contextlib.nullcontext()
