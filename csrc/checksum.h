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

#include <cstdint>
#include <cstring>

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

}  // namespace tli
