"""Minimal ctypes access to libturboattn's C API for the benchmarks (the Python package comes later)."""
import ctypes
import os

import torch

TA_DTYPE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.int8: 4, torch.uint8: 5, torch.int32: 6}
TA_DEVICE_CUDA = 1


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("device", ctypes.c_int), ("ndim", ctypes.c_int32),
                ("shape", ctypes.c_int64 * 4), ("strides", ctypes.c_int64 * 4)]


class AttentionOptions(ctypes.Structure):
    _fields_ = [("softmax_scale", ctypes.c_float), ("causal", ctypes.c_int32), ("use_sas", ctypes.c_int32),
                ("smooth_k", ctypes.c_int32)]


def describe(t: torch.Tensor) -> Tensor:
    d = Tensor()
    d.data = t.data_ptr()
    d.dtype = TA_DTYPE[t.dtype]
    d.device = TA_DEVICE_CUDA if t.is_cuda else 0
    d.ndim = t.dim()
    for i in range(t.dim()):
        d.shape[i] = t.shape[i]
        d.strides[i] = t.stride(i)
    return d


class Library:
    def __init__(self, path=None):
        path = path or os.environ.get("TURBOATTN_LIB", os.path.join(os.path.dirname(__file__), "..", "build", "libturboattn.so"))
        self.lib = ctypes.CDLL(path)
        self.lib.ta_last_error.restype = ctypes.c_char_p
        self.lib.ta_attention.argtypes = [ctypes.POINTER(Tensor)] * 5 + [ctypes.POINTER(AttentionOptions),
                                                                        ctypes.POINTER(Tensor), ctypes.POINTER(Tensor), ctypes.c_void_p]

    def attention(self, q, k, v, out, causal=False, use_sas=True, smooth_k=True, lse=None):
        """q [B, N, Hq, D], k, v [B, N, Hkv, D] (any strides with the last dim contiguous); out like q."""
        opt = AttentionOptions(0.0, int(causal), int(use_sas), int(smooth_k))
        tq, tk, tv, to = describe(q), describe(k), describe(v), describe(out)
        tl = describe(lse) if lse is not None else None
        st = self.lib.ta_attention(ctypes.byref(tq), ctypes.byref(tk), ctypes.byref(tv), None, None, ctypes.byref(opt),
                                   ctypes.byref(to), ctypes.byref(tl) if tl is not None else None,
                                   ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if st != 0:
            raise RuntimeError(f"ta_attention failed ({st}): {self.lib.ta_last_error().decode()}")
        return out
