// wsum64x2: the content checksum recorded for every finished shard and rechecked on --resume.
//
// The file's bytes, zero-padded to a multiple of 8, are little-endian u64 words w_i (i counted
// from the start of the file). Over a set of words (all of them, or the sampled ranges that
// tli_kernels/checkpoint/checksum.py defines) the checksum is the pair of sums mod 2^64
//   A = sum_i w_i * (K1 * (2i + 1))          position-weighted (odd weights): catches moved words
//   B = sum_i g(w_i), g(w) = x ^ (x >> 32),  x = (w ^ (w >> 29)) * K2: nonlinear, catches what
//                                            A's linearity misses (e.g. bit 63 flipped in two words)
// A zero word adds nothing to either sum, so holes are skipped without reading them, and any
// word-aligned split of the words can be summed by different threads in any order. Two multiplies
// per word: hashing runs faster than the pread that feeds it. checksum.py has the numpy twin.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace tli {

struct Checksum {
  uint64_t a = 0, b = 0;
};

constexpr uint64_t kWeightMul = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMixMul = 0xBF58476D1CE4E5B9ull;

inline uint64_t checksum_mix(uint64_t w) {
  const uint64_t x = (w ^ (w >> 29)) * kMixMul;
  return x ^ (x >> 32);
}

// Add the words of `data` (n bytes, n % 8 == 0 unless this is the end of the file) that start at
// word index `first_word`.
inline void checksum_add(Checksum& c, const unsigned char* data, uint64_t n, uint64_t first_word) {
  uint64_t a = 0, b = 0;
  uint64_t weight = kWeightMul * (2 * first_word + 1);
  const uint64_t step = 2 * kWeightMul;
  const uint64_t words = n / 8;
  for (uint64_t k = 0; k < words; ++k, weight += step) {
    uint64_t w;
    std::memcpy(&w, data + 8 * k, 8);
    a += w * weight;
    b += checksum_mix(w);
  }
  if (n % 8) {  // the file's last, partial word, zero-padded
    uint64_t w = 0;
    std::memcpy(&w, data + 8 * words, n % 8);
    a += w * weight;
    b += checksum_mix(w);
  }
  c.a += a;
  c.b += b;
}

// The "sample" coverage (tli_kernels/checkpoint/checksum.py, sample_ranges): the header
// [0, header_len), a 4 KiB block at every MiB and the last 4 KiB, word-aligned, merged, sorted.
constexpr uint64_t kSampleStride = 1 << 20;
constexpr uint64_t kSampleBlock = 4096;

inline std::vector<std::pair<uint64_t, uint64_t>> sample_ranges(uint64_t size, uint64_t header_len) {
  std::vector<std::pair<uint64_t, uint64_t>> raw, out;
  auto add = [&](uint64_t b, uint64_t e) {
    e = std::min(e, size);
    if (e > b) raw.emplace_back(b & ~uint64_t(7), std::min(size, (e + 7) & ~uint64_t(7)));
  };
  add(0, header_len);
  add(size > kSampleBlock ? size - kSampleBlock : 0, size);
  for (uint64_t k = 0; k < size; k += kSampleStride) add(k, k + kSampleBlock);
  std::sort(raw.begin(), raw.end());
  for (const auto& r : raw) {
    if (!out.empty() && r.first <= out.back().second) {
      out.back().second = std::max(out.back().second, r.second);
    } else {
      out.push_back(r);
    }
  }
  return out;
}

}  // namespace tli
