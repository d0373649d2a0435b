// wsum64x2: the content checksum recorded for every finished shard and rechecked on --resume.
//
// The file's bytes, zero-padded to a multiple of 8, are little-endian u64 words w_i (i counted
// from the start of the file). The checksum is the pair of sums mod 2^64
//   A = sum_i w_i * ((i * 0x9E3779B97F4A7C15) | 1)      position-weighted: catches swapped words
//   B = sum_i mix(w_i), mix = the splitmix64 finaliser   nonlinear: catches what A's linearity misses
// A zero word adds nothing to either sum, so holes are skipped without reading them, and any
// word-aligned split of a file can be summed by different threads in any order.
// tli_kernels/checkpoint/output.py computes the same sums with numpy.
#pragma once

#include <cstdint>
#include <cstring>

#include "numerics.h"

namespace tli {

struct Checksum {
  uint64_t a = 0, b = 0;
};

constexpr uint64_t kPositionMul = 0x9E3779B97F4A7C15ull;

// Add the words of `data` (n bytes, n % 8 == 0 unless this is the end of the file) that start at
// word index `first_word`.
inline void checksum_add(Checksum& c, const unsigned char* data, uint64_t n, uint64_t first_word) {
  uint64_t a = 0, b = 0;
  const uint64_t words = n / 8;
  for (uint64_t k = 0; k < words; ++k) {
    uint64_t w;
    std::memcpy(&w, data + 8 * k, 8);
    if (w == 0) continue;
    a += w * (((first_word + k) * kPositionMul) | 1ull);
    b += splitmix64_mix(w);
  }
  if (n % 8) {  // the file's last, partial word, zero-padded
    uint64_t w = 0;
    std::memcpy(&w, data + 8 * words, n % 8);
    if (w != 0) {
      a += w * (((first_word + words) * kPositionMul) | 1ull);
      b += splitmix64_mix(w);
    }
  }
  c.a += a;
  c.b += b;
}

}  // namespace tli
