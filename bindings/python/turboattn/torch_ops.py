"""`torch.ops.turboattn.attention`: FlashQ + SAS attention as a PyTorch custom operator, with a fake
(meta) implementation so that torch.compile can trace through it."""
import torch

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
