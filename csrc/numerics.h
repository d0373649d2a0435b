// Element arithmetic of the streaming engine, bit for bit the rules of tli_kernels/checkpoint/plan.py.
//
// Everything is computed in f32 and narrowed with our own round-to-nearest-even, never with a
// library cast, so the bytes do not depend on which SIMD path a compiler or CPU picks:
//   - BF16/F16/F32 widen to f32 exactly (F16 subnormals, infinities and NaNs included);
//   - f32 -> BF16 and f32 -> F16 round to nearest even, overflow to infinity, and every NaN becomes
//     the canonical positive quiet NaN (0x7FC0 / 0x7E00; 0x7FC00000 for F32 output), because NaN
//     payloads after an add or multiply differ between SIMD and scalar code paths;
//   - uniform: splitmix64 on the element counter, then (2u - 1) * bound in f64, then f32.
// The build uses -ffp-contract=off and no fast-math: a fused multiply-add or reassociation would
// change the last bit of `average`.
#pragma once

#include <cstdint>
#include <cstring>

namespace tli {

// F8_*: only as the quantised weights of a dequant op (read through fp8_to_f32, never written).
enum class DType : uint8_t { BF16 = 0, F16 = 1, F32 = 2, OTHER = 3, F8_E4M3 = 4, F8_E5M2 = 5 };

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in f32
    const float v = float(mant) * 5.9604644775390625e-08f;
    return bits_float(float_bits(v) | sign);
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return 0x7E00;                 // NaN (sign dropped: canonical)
  if (u >= 0x47800000u) return uint16_t(sign | 0x7C00u);  // >= 2^16: infinity
  if (u < 0x38800000u) {
    // Below 2^-14 the result is an F16 subnormal (or zero), a multiple of 2^-24. Adding 0.5f puts
    // 2^-24 at the last f32 mantissa bit, so the hardware add does the round-to-nearest-even.
    const float t = bits_float(u) + 0.5f;
    return uint16_t(sign | (float_bits(t) - 0x3F000000u));
  }
  // Normal: rebias the exponent (127 -> 15), add half an F16 ulp minus one plus the lowest kept
  // bit (ties to even), truncate. A carry out of the mantissa bumps the exponent, up to infinity.
  const uint32_t odd = (u >> 13) & 1u;
  u += (uint32_t(15 - 127) << 23) + 0xFFFu + odd;
  return uint16_t(sign | (u >> 13));
}

inline uint32_t f32_canonical(float f) {
  const uint32_t u = float_bits(f);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : u;
}

inline int itemsize(DType d) {
  if (d == DType::F8_E4M3 || d == DType::F8_E5M2) return 1;
  return d == DType::F32 ? 4 : 2;
}

// An FP8 byte as f32, exactly. E4M3FN (bias 7): no infinities, S.1111.111 is NaN, exponent 0 holds
// subnormals m * 2^-9. E5M2 is the top byte of an F16.
inline float fp8_to_f32(uint8_t b, DType d) {
  if (d == DType::F8_E5M2) return f16_to_f32(uint16_t(uint16_t(b) << 8));
  const uint32_t sign = uint32_t(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 15u, man = b & 7u;
  if (exp == 15 && man == 7) return bits_float(sign | 0x7FC00000u);
  const float mag = exp == 0 ? float(man) * 0.001953125f : bits_float(((exp + 120u) << 23) | (man << 20));
  return bits_float(float_bits(mag) | sign);
}

// Widen n elements of `src` (dtype d, unaligned bytes) into f32.
inline void widen(const unsigned char* src, DType d, float* out, uint64_t n) {
  if (d == DType::F32) {
    std::memcpy(out, src, n * 4);
  } else if (d == DType::BF16) {
    for (uint64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      out[i] = bf16_to_f32(h);
    }
  } else {
    for (uint64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      out[i] = f16_to_f32(h);
    }
  }
}

// out[i] += widen(src[i]), the same f32 additions as the reference.
inline void widen_add(const unsigned char* src, DType d, float* acc, uint64_t n) {
  if (d == DType::F32) {
    for (uint64_t i = 0; i < n; ++i) {
      float v;
      std::memcpy(&v, src + 4 * i, 4);
      acc[i] = acc[i] + v;
    }
  } else {
    for (uint64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      acc[i] = acc[i] + (d == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h));
    }
  }
}

// Narrow n f32 values to dtype d in place: element i lands at byte i * itemsize <= 4 * i, so a
// forward pass never overwrites a value it has yet to read.
inline void narrow_in_place(float* x, DType d, uint64_t n) {
  unsigned char* out = reinterpret_cast<unsigned char*>(x);
  if (d == DType::F32) {
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t u = f32_canonical(x[i]);
      std::memcpy(out + 4 * i, &u, 4);
    }
  } else if (d == DType::BF16) {
    for (uint64_t i = 0; i < n; ++i) {
      const uint16_t h = f32_to_bf16(x[i]);
      std::memcpy(out + 2 * i, &h, 2);
    }
  } else {
    for (uint64_t i = 0; i < n; ++i) {
      const uint16_t h = f32_to_f16(x[i]);
      std::memcpy(out + 2 * i, &h, 2);
    }
  }
}

// Round n f32 values to BF16/F16 (RNE) and back to f32, in place (a cast the arithmetic then sees).
inline void round_through(float* x, DType d, uint64_t n) {
  if (d == DType::BF16) {
    for (uint64_t i = 0; i < n; ++i) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
  } else if (d == DType::F16) {
    for (uint64_t i = 0; i < n; ++i) x[i] = f16_to_f32(f32_to_f16(x[i]));
  }
}

// Element k of n BF16/F16/F32 values (unaligned bytes) is an infinity or a NaN.
inline bool is_nonfinite_at(const unsigned char* p, DType d, uint64_t k) {
  if (d == DType::F32) {
    uint32_t u;
    std::memcpy(&u, p + 4 * k, 4);
    return (u & 0x7F800000u) == 0x7F800000u;
  }
  uint16_t h;
  std::memcpy(&h, p + 2 * k, 2);
  const uint16_t e = d == DType::BF16 ? 0x7F80u : 0x7C00u;
  return (h & e) == e;
}

// Any of n values non-finite: one branch-free pass (the common answer is no).
inline bool any_nonfinite(const unsigned char* p, DType d, uint64_t n) {
  bool any = false;
  for (uint64_t k = 0; k < n; ++k) any |= is_nonfinite_at(p, d, k);
  return any;
}

inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Elements [start, start + n) of the `uniform` op.
inline void uniform_f32(uint64_t seed, double bound, uint64_t start, float* out, uint64_t n) {
  for (uint64_t k = 0; k < n; ++k) {
    const uint64_t z = splitmix64_mix(seed + (start + k + 1) * 0x9E3779B97F4A7C15ull);
    const double u = double(z >> 11) * 0x1.0p-53;
    const double v = (2.0 * u - 1.0) * bound;
    out[k] = float(v);
  }
}

}  // namespace tli
