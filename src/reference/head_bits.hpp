// Headwise mixed precision: the head priority metric ("gap x std") and the bit assignment rule.
#pragma once

#include <vector>

#include "attention.hpp"

namespace turboattn::ref {

// Priority of each KV head of one layer, from calibration K and V (tokens x kv_heads x dim):
// for X in {K minus its per-head mean, V}: gap = mean over 64-token blocks and channels of
// (max - min), std = standard deviation of all the head's values, raw = gap * std; the priority is
// raw_K / mean_heads(raw_K) + raw_V / mean_heads(raw_V). Higher means keep more bits.
std::vector<float> head_priority(const HeadsView& k, const HeadsView& v);

// Bits per (layer, head) from priorities (layers * kv_heads): in each layer the
// round(fraction_2bit * kv_heads) heads of lowest priority get 2 bits (ties: lower head index first),
// the others 4.
std::vector<int> assign_head_bits(const std::vector<float>& priority, int layers, int kv_heads, float fraction_2bit);

// The same over the whole model: the round(fraction_2bit * layers * kv_heads) (layer, head) pairs of
// lowest priority get 2 bits (ties: lower layer, then head, first). For priorities that compare
// across layers, such as a measured sensitivity; head_priority's are normalized per layer.
std::vector<int> assign_head_bits_across_layers(const std::vector<float>& priority, int layers, int kv_heads,
                                                float fraction_2bit);

}  // namespace turboattn::ref
