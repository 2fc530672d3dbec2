"""KIVI-style KV cache quantization, the baseline users would otherwise pick (Liu et al., 2024), as a
transformers Cache for the evaluation.

Format (our reading of KIVI, decided here): asymmetric uniform codes of `bits` bits with an fp16 scale
and an fp16 minimum per group; K per channel in groups of `group` tokens, V per token in groups of
`group` channels. K's newest tokens, up to `residual` of them, stay in fp16 and are quantized `residual`
at a time when that window fills (a K group needs its tokens); V keeps exactly its `residual` newest
tokens in fp16 and quantizes each token as it leaves that sliding window. Values are quantized then
dequantized in place (what attention sees is exactly what the format stores); memory is counted from
the format.
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
        self.k_quantized = self.v_quantized = 0  # leading tokens already quantized

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # [B, H, T, D]
        n = keys.shape[-2]
        k_full = (n - self.k_quantized) // self.residual * self.residual
        v_end = max(self.v_quantized, n - self.residual)
        if not k_full and v_end == self.v_quantized:
            return keys, values
        # This call attends over what it was given; later calls see the stored (quantized) tokens.
        seen_k, seen_v = keys.clone(), values.clone()
        if k_full:
            s = slice(self.k_quantized, self.k_quantized + k_full)
            self.keys[..., s, :] = fake_quantize(keys[..., s, :], self.bits, self.group, dim=-2)
            self.k_quantized += k_full
        if v_end > self.v_quantized:
            s = slice(self.v_quantized, v_end)
            self.values[..., s, :] = fake_quantize(values[..., s, :], self.bits, min(self.group, values.shape[-1]), dim=-1)
            self.v_quantized = v_end
        return seen_k, seen_v

    def reset(self):
        super().reset()
        self.k_quantized = self.v_quantized = 0

    def crop(self, *args, **kwargs):
        """Drops the newest tokens (transformers' signature, whichever version); the counters follow, and
        tokens kept that were already quantized stay so (their fp16 values are gone)."""
        super().crop(*args, **kwargs)
        n = self.keys.shape[-2] if self.is_initialized else 0
        self.k_quantized, self.v_quantized = min(self.k_quantized, n), min(self.v_quantized, n)


class KiviCache(Cache):
    def __init__(self, num_layers, bits, group=32, residual=64):
        super().__init__(layers=[KiviLayer(bits, group, residual) for _ in range(num_layers)])
        self.bits, self.group, self.residual = bits, group, residual


def kivi_bytes_per_token(bits, group, residual, tokens, layers, kv_heads, head_dim):
    """(asymptotic, at `tokens`) bytes per token, all layers and heads, K and V."""
    per_token = layers * kv_heads * head_dim  # values of K (or of V) per token
    per_value = bits / 8 + 4 / group  # codes + fp16 scale and minimum per group
    k_window, v_window = tokens % residual, min(tokens, residual)
    at = ((tokens - k_window) * per_value + k_window * 2.0 + (tokens - v_window) * per_value + v_window * 2.0)
    return 2 * per_value * per_token, at * per_token / tokens
