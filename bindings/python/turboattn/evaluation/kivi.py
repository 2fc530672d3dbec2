"""KIVI-style KV cache quantization, the baseline users would otherwise pick (Liu et al., 2024), as a
transformers Cache for the evaluation.

Format (our reading of KIVI, decided here): asymmetric uniform codes of `bits` bits with an fp16 scale
and an fp16 minimum per group; K per channel in groups of `group` tokens, V per token in groups of
`group` channels; the most recent tokens, up to `residual` of them, stay in fp16 and are quantized
`residual` at a time when the window fills. Values are quantized then dequantized in place (what
attention sees is exactly what the format stores); memory is counted from the format.
"""
import torch
from transformers.cache_utils import Cache, DynamicLayer


def fake_quantize(x, bits, group, dim):
    """x quantized to `bits` with one (scale, min) per `group` consecutive elements along `dim`, dequantized."""
    x = x.movedim(dim, -1)
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group).float()
    lo = g.amin(-1, keepdim=True).half().float()
    hi = g.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).half().float()
    q = torch.where(scale > 0, torch.round((g - lo) / torch.where(scale > 0, scale, 1.0)), 0.0).clamp_(0, levels)
    return (q * scale + lo).to(x.dtype).reshape(shape).movedim(-1, dim)


class KiviLayer(DynamicLayer):
    def __init__(self, bits, group, residual):
        super().__init__()
        if residual % group:
            raise ValueError(f"KIVI: residual {residual} must be a multiple of the group {group}")
        self.bits, self.group, self.residual = bits, group, residual
        self.quantized = 0  # leading tokens already quantized

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # [B, H, T, D]
        full = (keys.shape[-2] - self.quantized) // self.residual * self.residual
        if not full:
            return keys, values
        # This call attends over what it was given; later calls see the stored (quantized) tokens.
        seen_k, seen_v = keys.clone(), values.clone()
        s = slice(self.quantized, self.quantized + full)
        self.keys[..., s, :] = fake_quantize(keys[..., s, :], self.bits, self.group, dim=-2)
        group_v = min(self.group, values.shape[-1])
        self.values[..., s, :] = fake_quantize(values[..., s, :], self.bits, group_v, dim=-1)
        self.quantized += full
        return seen_k, seen_v


class KiviCache(Cache):
    def __init__(self, num_layers, bits, group=32, residual=64):
        super().__init__(layers=[KiviLayer(bits, group, residual) for _ in range(num_layers)])
        self.bits, self.group, self.residual = bits, group, residual


def kivi_bytes_per_token(bits, group, residual, tokens, layers, kv_heads, head_dim):
    """(asymptotic, at `tokens`) bytes per token, all layers and heads, K and V."""
    values = 2 * layers * kv_heads * head_dim
    per_value = bits / 8 + 4 / group  # codes + fp16 scale and minimum per group
    window = tokens % residual
    at = ((tokens - window) * per_value + window * 2.0) * values / tokens
    return per_value * values, at
