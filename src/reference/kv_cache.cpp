#include "kv_cache.hpp"

#include <algorithm>
#include <cstring>
#include <limits>

#include "format/skip_rule.h"
#include "quant.hpp"
#include "turboattn/format.h"

namespace turboattn::ref {

namespace {
constexpr int kBlock = TA_BLOCK_TOKENS;

void store_f32(uint8_t* p, float v) { std::memcpy(p, &v, 4); }
float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
}  // namespace

KvCache::KvCache(const CacheConfig& config) : cfg_(config), book_(config.layers, config.max_seqs, config.num_pages) {
  for (int l = 0; l < cfg_.layers; ++l) {
    layouts_.push_back(make_page_layout(cfg_.bits.data() + size_t(l) * cfg_.kv_heads, cfg_.kv_heads, cfg_.head_dim));
    pools_.emplace_back(size_t(cfg_.num_pages) * layouts_.back().page_bytes, uint8_t(0));
    buffers_.emplace_back(size_t(cfg_.max_seqs) * cfg_.kv_heads * buffer_head_bytes(cfg_.head_dim), uint8_t(0));
    first_blocks_.emplace_back(size_t(cfg_.max_seqs) * cfg_.kv_heads * first_block_bytes(cfg_.head_dim), uint8_t(0));
    means_.emplace_back(size_t(cfg_.max_seqs) * cfg_.kv_heads * cfg_.head_dim, 0.0f);
  }
}

int KvCache::add_sequence() { return book_.add_sequence(); }

const uint8_t* KvCache::page(int layer, int page_id) const {
  return pools_[size_t(layer)].data() + size_t(page_id) * layouts_[size_t(layer)].page_bytes;
}
uint8_t* KvCache::buffer_mut(int layer, int seq, int head) {
  return buffers_[size_t(layer)].data() + (size_t(seq) * cfg_.kv_heads + head) * buffer_head_bytes(cfg_.head_dim);
}
const uint8_t* KvCache::buffer(int layer, int seq, int head) const {
  return const_cast<KvCache*>(this)->buffer_mut(layer, seq, head);
}
uint8_t* KvCache::first_block_mut(int layer, int seq, int head) {
  return first_blocks_[size_t(layer)].data() + (size_t(seq) * cfg_.kv_heads + head) * first_block_bytes(cfg_.head_dim);
}
const uint8_t* KvCache::first_block(int layer, int seq, int head) const {
  return const_cast<KvCache*>(this)->first_block_mut(layer, seq, head);
}
const float* KvCache::k_mean(int layer, int seq) const {
  return means_[size_t(layer)].data() + size_t(seq) * cfg_.kv_heads * cfg_.head_dim;
}
void KvCache::write(int layer, int seq, const HeadsView& k, const HeadsView& v, const float* k_mean_in) {
  const int d = cfg_.head_dim, hkv = cfg_.kv_heads;
  float* mean = means_[size_t(layer)].data() + size_t(seq) * hkv * d;
  if (length(layer, seq) == 0) {
    for (int h = 0; h < hkv; ++h) {
      float* m = mean + size_t(h) * d;
      if (!cfg_.smooth_k) std::fill(m, m + d, 0.0f);
      else if (k_mean_in) std::copy(k_mean_in + size_t(h) * d, k_mean_in + size_t(h + 1) * d, m);
      else head_mean(k, h, m);
    }
  }
  std::vector<const float*> k_rows(static_cast<size_t>(hkv)), v_rows(static_cast<size_t>(hkv));
  for (int t = 0; t < k.tokens; ++t) {
    for (int h = 0; h < hkv; ++h) k_rows[size_t(h)] = k.row(t, h), v_rows[size_t(h)] = v.row(t, h);
    append_token(layer, seq, k_rows.data(), v_rows.data());
  }
}

void KvCache::append_token(int layer, int seq, const float* const* k_rows, const float* const* v_rows) {
  const int d = cfg_.head_dim;
  const int slot = int(length(layer, seq) % kBlock);
  const float* mean = k_mean(layer, seq);
  std::vector<float> shifted(static_cast<size_t>(d));
  for (int h = 0; h < cfg_.kv_heads; ++h) {
    uint8_t* buf = buffer_mut(layer, seq, h);
    auto* kq = reinterpret_cast<int8_t*>(buf + buffer_k_offset(d)) + size_t(slot) * d;
    auto* vq = reinterpret_cast<int8_t*>(buf + buffer_v_offset(d)) + size_t(slot) * d;
    for (int c = 0; c < d; ++c) shifted[size_t(c)] = k_rows[h][c] - mean[size_t(h) * d + c];
    store_f32(buf + buffer_k_scale_offset(d) + 4 * slot, quantize_block_int8(shifted.data(), 1, d, d, kq, d));
    store_f32(buf + buffer_v_scale_offset(d) + 4 * slot, quantize_block_int8(v_rows[h], 1, d, d, vq, d));
  }
  book_.add_tokens(layer, seq, 1);
  if (length(layer, seq) % kBlock == 0) flush(layer, seq);
}

void KvCache::flush(int layer, int seq) {
  const int d = cfg_.head_dim;
  const PageLayout& lay = layouts_[size_t(layer)];
  const int64_t block = length(layer, seq) / kBlock - 1;
  // The first block goes to its own region at 8 bits, every later one to its page at the head's width.
  uint8_t* page = block == 0 ? nullptr : pools_[size_t(layer)].data() + size_t(book_.page_for_block(seq, block)) * lay.page_bytes;
  std::vector<int8_t> q(size_t(kBlock) * d);
  std::vector<uint8_t> codes(size_t(kBlock) * d);
  for (int h = 0; h < cfg_.kv_heads; ++h) {
    const uint8_t* buf = buffer(layer, seq, h);
    uint8_t* first = first_block_mut(layer, seq, h);
    for (int which = 0; which < 2; ++which) {  // 0: K (token-major codes), 1: V (channel-major codes)
      const int bits = page ? lay.bits[h] : TA_BITS_8;
      std::memcpy(q.data(), buf + (which ? buffer_v_offset(d) : buffer_k_offset(d)), q.size());
      std::vector<float> token_scale(static_cast<size_t>(kBlock));
      std::memcpy(token_scale.data(), buf + (which ? buffer_v_scale_offset(d) : buffer_k_scale_offset(d)), 4 * kBlock);
      const float scale = requantize_tokens_to_block(q.data(), token_scale.data(), kBlock, d);
      store_f32(page ? page + (which ? page_v_scale_offset(cfg_.kv_heads, h) : page_k_scale_offset(h))
                     : first + first_block_scale_offset(d) + 4 * which,
                scale);
      uint8_t* region = page ? page + (which ? lay.v_offset[h] : lay.k_offset[h])
                             : first + (which ? first_block_v_offset(d) : first_block_k_offset(d));
      // codes[i] in storage order: K row t is token t's channels, V row c is channel c's tokens.
      if (bits == 8) {
        for (int t = 0; t < kBlock; ++t)
          for (int c = 0; c < d; ++c)
            codes[which ? size_t(c) * kBlock + t : size_t(t) * d + c] = uint8_t(q[size_t(t) * d + c]);
      } else if (which == 0) {  // K: a grid per channel over each group of the block's tokens
        const int group_tokens = k_group_tokens(bits), groups = k_groups(bits);
        uint8_t* s2_scale = region + block_code_bytes(bits, d);
        auto* s2_zero = reinterpret_cast<int8_t*>(s2_scale + groups * d);
        std::vector<uint8_t> channel(static_cast<size_t>(group_tokens));
        for (int grp = 0; grp < groups; ++grp)
          for (int c = 0; c < d; ++c) {
            const int t0 = grp * group_tokens;
            const Stage2Params p = stage2_encode(q.data() + size_t(t0) * d + c, group_tokens, d, bits, channel.data());
            s2_scale[grp * d + c] = p.scale;
            s2_zero[grp * d + c] = p.zero;
            for (int t = 0; t < group_tokens; ++t) codes[size_t(t0 + t) * d + c] = channel[size_t(t)];
          }
      } else {  // V: a grid per token over its channels
        uint8_t* s2_scale = region + block_code_bytes(bits, d);
        auto* s2_zero = reinterpret_cast<int8_t*>(s2_scale + kBlock);
        std::vector<uint8_t> token(static_cast<size_t>(d));
        for (int t = 0; t < kBlock; ++t) {
          const Stage2Params p = stage2_encode(q.data() + size_t(t) * d, d, 1, bits, token.data());
          s2_scale[t] = p.scale;
          s2_zero[t] = p.zero;
          for (int c = 0; c < d; ++c) codes[size_t(c) * kBlock + t] = token[size_t(c)];
        }
      }
      pack_codes(codes.data(), kBlock * d, bits, region);
    }
  }
}

namespace {
// A block of one head in the compute format: INT8 K and V rows [64][dim] from its K and V regions (codes,
// then stage-2 metadata below 8 bits) at `bits`.
void block_rows(const uint8_t* k_region, const uint8_t* v_region, int bits, int d, int8_t* k, int8_t* v) {
  std::vector<uint8_t> codes(size_t(kBlock) * d);
  for (int which = 0; which < 2; ++which) {
    const uint8_t* region = which ? v_region : k_region;
    int8_t* out = which ? v : k;
    unpack_codes(region, kBlock * d, bits, codes.data());
    // K: per channel and token group; V: per token.
    const uint8_t* s2_scale = region + block_code_bytes(bits, d);
    const auto* s2_zero = reinterpret_cast<const int8_t*>(s2_scale + (which ? kBlock : k_groups(bits) * d));
    for (int t = 0; t < kBlock; ++t)
      for (int c = 0; c < d; ++c) {
        const uint8_t code = codes[which ? size_t(c) * kBlock + t : size_t(t) * d + c];
        const int g = which ? t : t / k_group_tokens(bits) * d + c;
        out[size_t(t) * d + c] = bits == 8 ? int8_t(code) : stage2_decode(code, {s2_scale[g], s2_zero[g]});
      }
  }
}

// One head's tiles of a sequence in the compute format, in order: its first block, its blocks in pages
// (block scales), then the buffer's partial block (per-token scales). codes and scales hold what the
// tiles point to.
std::vector<Int8Tile> tiles(const SequenceBytes& s, int head, std::vector<std::vector<int8_t>>& codes,
                            std::vector<std::vector<float>>& scales) {
  const PageLayout& lay = *s.layout;
  const int d = lay.head_dim;
  const int64_t len = s.length;
  const int64_t blocks = len / kBlock;
  const int buffered = int(len % kBlock);
  std::vector<Int8Tile> out;
  codes.assign(size_t(blocks), std::vector<int8_t>(size_t(2) * kBlock * d));
  scales.assign(size_t(blocks) + 1, std::vector<float>(size_t(2) * kBlock));
  for (int64_t b = 0; b < blocks; ++b) {
    int8_t* kc = codes[size_t(b)].data();
    float* sc = scales[size_t(b)].data();
    float ks, vs;
    if (b == 0) {
      const uint8_t* first = s.first_blocks[size_t(head)];
      block_rows(first + first_block_k_offset(d), first + first_block_v_offset(d), TA_BITS_8, d, kc, kc + kBlock * d);
      ks = load_f32(first + first_block_scale_offset(d)), vs = load_f32(first + first_block_scale_offset(d) + 4);
    } else {
      const uint8_t* pg = s.pages[size_t(PageBook::table_index(b))];
      block_rows(pg + lay.k_offset[head], pg + lay.v_offset[head], lay.bits[head], d, kc, kc + kBlock * d);
      ks = load_f32(pg + page_k_scale_offset(head)), vs = load_f32(pg + page_v_scale_offset(lay.kv_heads, head));
    }
    std::fill(sc, sc + kBlock, ks);
    sc[kBlock] = vs;
    Int8Tile t;
    t.tokens = kBlock;
    t.first_pos = b * kBlock;
    t.k = kc, t.v = kc + kBlock * d, t.k_scale = sc, t.v_scale = sc + kBlock, t.shared_v_scale = true;
    out.push_back(t);
  }
  if (buffered) {
    const uint8_t* buf = s.buffers[size_t(head)];
    float* sc = scales[size_t(blocks)].data();
    std::memcpy(sc, buf + buffer_k_scale_offset(d), 4 * kBlock);
    std::memcpy(sc + kBlock, buf + buffer_v_scale_offset(d), 4 * kBlock);
    Int8Tile t;
    t.tokens = buffered;
    t.first_pos = blocks * kBlock;
    t.k = reinterpret_cast<const int8_t*>(buf + buffer_k_offset(d));
    t.v = reinterpret_cast<const int8_t*>(buf + buffer_v_offset(d));
    t.k_scale = sc, t.v_scale = sc + kBlock, t.shared_v_scale = false;
    out.push_back(t);
  }
  return out;
}
}  // namespace

void KvCache::decode(int layer, int seq, const HeadsView& q, float softmax_scale, bool sas, int split_tiles,
                     float* out, float* lse) const {
  const int d = cfg_.head_dim, hq = q.heads, group = q.heads / cfg_.kv_heads, q_len = q.tokens;
  const int64_t len = length(layer, seq);
  const float scale = resolve_softmax_scale(softmax_scale, d), sl2 = scale_log2(scale);
  const float skip_x = skip_threshold(len);
  const SequenceBytes bytes = sequence_bytes(layer, seq);
  for (int hk = 0; hk < cfg_.kv_heads; ++hk) {
    std::vector<std::vector<int8_t>> codes;
    std::vector<std::vector<float>> scales;
    const std::vector<Int8Tile> all = tiles(bytes, hk, codes, scales);
    const int per_split = split_tiles > 0 ? split_tiles : int(std::max<size_t>(1, all.size()));
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      for (int t0 = 0; t0 < q_len; t0 += TA_DECODE_Q_TOKENS) {  // Q blocks of up to 8 query tokens
        const int rows = std::min(TA_DECODE_Q_TOKENS, q_len - t0);
        std::vector<int8_t> q8(size_t(rows) * d);
        const float q_scale = quantize_head_block(q, h, t0, rows, nullptr, q8.data()) * sl2;
        for (int r = 0; r < rows; ++r) {
          const int i = t0 + r;
          const int64_t max_pos = len - q_len + i;
          std::vector<RowState> parts;
          for (size_t s0 = 0; s0 < all.size() || parts.empty(); s0 += size_t(per_split)) {
            RowState st(d);
            for (size_t t = s0; t < std::min(all.size(), s0 + size_t(per_split)); ++t)
              accumulate_tile(q8.data() + size_t(r) * d, q_scale, all[t], max_pos, sas, skip_x, d, st);
            parts.push_back(std::move(st));
          }
          const RowState row = parts.size() == 1 ? parts[0] : merge_states(parts, d);
          float* row_lse = lse ? lse + size_t(h) * q_len + i : nullptr;
          finish_row(row, d, out + (size_t(i) * hq + h) * d, row_lse);
          if (row_lse && row.m != -std::numeric_limits<float>::infinity())
            *row_lse += smoothing_lse_offset(q.row(i, h), k_mean(layer, seq) + size_t(hk) * d, d, scale);
        }
      }
    }
  }
}

SequenceBytes KvCache::sequence_bytes(int layer, int seq) const {
  SequenceBytes s;
  s.layout = &layout(layer);
  s.length = length(layer, seq);
  for (int64_t b = 1; b < s.length / kBlock; ++b) s.pages.push_back(page(layer, book_.table(seq)[size_t(PageBook::table_index(b))]));
  for (int h = 0; h < cfg_.kv_heads; ++h) {
    s.first_blocks.push_back(first_block(layer, seq, h));
    s.buffers.push_back(buffer(layer, seq, h));
  }
  s.k_mean = k_mean(layer, seq);
  return s;
}

void KvCache::read_tokens(int layer, int seq, float* k, float* v) const { ref::read_tokens(sequence_bytes(layer, seq), k, v); }

void read_tokens(const SequenceBytes& s, float* k, float* v) {
  const int d = s.layout->head_dim, hkv = s.layout->kv_heads;
  for (int h = 0; h < hkv; ++h) {
    std::vector<std::vector<int8_t>> codes;
    std::vector<std::vector<float>> scales;
    for (const Int8Tile& t : tiles(s, h, codes, scales))
      for (int j = 0; j < t.tokens; ++j) {
        const size_t row = (size_t(t.first_pos + j) * hkv + h) * d;
        const float vs = t.shared_v_scale ? t.v_scale[0] : t.v_scale[j];
        for (int c = 0; c < d; ++c) {
          k[row + c] = float(t.k[size_t(j) * d + c]) * t.k_scale[j] + s.k_mean[size_t(h) * d + c];
          v[row + c] = float(t.v[size_t(j) * d + c]) * vs;
        }
      }
  }
}

}  // namespace turboattn::ref
