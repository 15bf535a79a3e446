// One element of the Adam step and the 16-bit conversions, in portable C++.
//
// The scalar path runs this for every element; the SIMD paths run it for their tails and
// do the same IEEE operations in the same order for the rest, so every path gives the
// same bits.  Everything here is `static inline` on purpose: each kernels_<level>.cpp is
// compiled for a different instruction set, and internal linkage keeps the linker from
// merging an AVX-512 copy of a helper into the scalar path.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

// No FMA contraction in any file that includes this one: fused multiply-adds are written
// out where torch fuses (see kernels.h), every other a*b+c rounds twice, identically on
// every SIMD level (AVX512F has FMA instructions, so GCC would otherwise fuse the AVX-512
// path and only that one).  Clang contracts only within one expression, which the
// intrinsic calls never are.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace hetmem {
namespace adam {
namespace detail {

static inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

static inline float bits_to_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 bits.
static inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// fp32 -> bf16, round to nearest even; NaN stays NaN (quieted), overflow rounds to inf.
// Integer rounding rather than AVX512-BF16's vcvtneps2bf16, which flushes fp32 subnormal
// inputs to zero and so differs from torch's `.to(torch.bfloat16)`.
static inline uint16_t float_to_bf16(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fp16 -> fp32, exact (what F16C's vcvtph2ps does, signalling NaNs quieted).
static inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) {  // inf or NaN
    return bits_to_float(sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x00400000u : 0u));
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    return bits_to_float(sign | float_bits(float(mantissa) * 5.9604644775390625e-08f));
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// fp32 -> fp16, round to nearest even, subnormals kept, overflow to inf, NaN quieted
// (what F16C's vcvtps2ph with _MM_FROUND_TO_NEAREST_INT does).
static inline uint16_t float_to_fp16(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 (a tie to even) and inf
  if (a >= 0x38800000u) {                                  // normal fp16: [2^-14, 65520)
    const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
    return uint16_t(sign | ((rounded - 0x38000000u) >> 13));  // rebias 127 -> 15
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25 (the tie) rounds to zero
  // fp16 subnormal: value / 2^-24 = mantissa_with_implicit_bit >> shift, shift in [14, 24]
  const uint32_t shift = 126u - (a >> 23);
  const uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u;
  uint32_t q = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (q & 1u))) ++q;  // may carry into the smallest normal
  return uint16_t(sign | q);
}

template <ElemType T>
static inline float load_elem(const void* base, size_t i);
template <>
inline float load_elem<ElemType::kFloat32>(const void* base, size_t i) {
  return static_cast<const float*>(base)[i];
}
template <>
inline float load_elem<ElemType::kFloat16>(const void* base, size_t i) {
  return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
}
template <>
inline float load_elem<ElemType::kBFloat16>(const void* base, size_t i) {
  return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
}

template <ElemType T>
static inline void store_elem(void* base, size_t i, float x);
template <>
inline void store_elem<ElemType::kFloat16>(void* base, size_t i, float x) {
  static_cast<uint16_t*>(base)[i] = float_to_fp16(x);
}
template <>
inline void store_elem<ElemType::kBFloat16>(void* base, size_t i, float x) {
  static_cast<uint16_t*>(base)[i] = float_to_bf16(x);
}
template <>
inline void store_elem<ElemType::kFloat32>(void* base, size_t i, float x) {
  static_cast<float*>(base)[i] = x;
}

// a * b + c, rounded once.  In the scalar build (no FMA instruction assumed) this is
// libm's fmaf: hardware where the CPU has it, exact software otherwise.
static inline float fused_multiply_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

// The Adam step for one element (see kernels.h for the formulas).
static inline void adam_element(float g, float& p, float& m, float& v, const AdamConstants& c) {
  if (c.scaled) g = g / c.grad_scale;
  if (c.l2) g = fused_multiply_add(c.weight_decay, p, g);
  if (c.decoupled_decay) p = p * c.decay;
  m = fused_multiply_add(c.lerp_coeff, g - m, c.lerp_from_m ? m : g);
  v = fused_multiply_add(c.one_minus_beta2 * g, g, v * c.beta2);
  const float denom = __builtin_sqrtf(v) / c.bc2_sqrt + c.eps;
  p = p + (c.neg_step_size * m) / denom;
}

// The arrays of one call as locals for the SIMD loops: their vector stores (may_alias
// types) could otherwise write the AdamBuffers the pointers came from, and the compiler
// would reload every pointer in every iteration.
struct Streams {
  float* param;
  float* exp_avg;
  float* exp_avg_sq;
  const void* grad;
  void* out;
};

static inline Streams streams_of(const AdamBuffers& b) { return {b.param, b.exp_avg, b.exp_avg_sq, b.grad, b.out}; }

// Software prefetch of the four read streams, kPrefetchBytes ahead, into L1 with the
// non-temporal hint (prefetchnta on x86: each line is used once).  The SIMD loops call it
// once per 16 elements, one line of each fp32 array (and of a 16-bit grad every other
// time), so that more misses are in flight than the hardware prefetchers, which stop at
// every 4 KiB page, keep alone.  On the benchmark machine the AVX-512 kernel was 2-5%
// faster with it than with no software prefetch or with the same prefetch into L2
// (_MM_HINT_T1, what it replaced), on a quiet machine and with a busy loop on one core;
// 512 bytes ahead was worse, 1536 and 2048 no better (csrc/adam/PERFORMANCE.md).
// Prefetches past the end are harmless.
constexpr size_t kPrefetchBytes = 1024;

// (address arithmetic in integers: the address may lie past the end of the array)
static inline void prefetch_once(const void* at, size_t bytes_ahead) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(at) + bytes_ahead), 0, 0);
}

template <ElemType G>
static inline void prefetch_ahead(const Streams& s, size_t i) {
  prefetch_once(s.param + i, kPrefetchBytes);
  prefetch_once(s.exp_avg + i, kPrefetchBytes);
  prefetch_once(s.exp_avg_sq + i, kPrefetchBytes);
  if (G == ElemType::kFloat32) {
    prefetch_once(static_cast<const float*>(s.grad) + i, kPrefetchBytes);
  } else if (i % 32 == 0) {  // a 16-bit grad line holds 32 elements: the same elements ahead
    prefetch_once(static_cast<const uint16_t*>(s.grad) + i, kPrefetchBytes / 2);
  }
}

// Elements [begin, end) one at a time: the scalar path, and the SIMD paths' tails.
template <ElemType G, ElemType O, bool HasOut>
static inline void adam_elements(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    const float g = load_elem<G>(b.grad, i);  // read before out[i] is written (they may alias)
    float p = b.param[i], m = b.exp_avg[i], v = b.exp_avg_sq[i];
    adam_element(g, p, m, v, c);
    b.param[i] = p;
    b.exp_avg[i] = m;
    b.exp_avg_sq[i] = v;
    if (HasOut) store_elem<O>(b.out, i, p);
  }
}

// The roofline probe's element: Adam's loads and stores, trivial math that keeps the
// arrays usable by Adam afterwards (exp_avg_sq stays >= 0).
template <ElemType G, ElemType O, bool HasOut>
static inline void probe_elements(const AdamBuffers& b, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    const float g = load_elem<G>(b.grad, i);
    const float p = b.param[i] + g;
    b.param[i] = p;
    b.exp_avg[i] = b.exp_avg[i] + g;
    b.exp_avg_sq[i] = b.exp_avg_sq[i] + g * g;
    if (HasOut) static_cast<uint16_t*>(b.out)[i] = uint16_t(float_bits(p) >> 16);
  }
}

// Calls kernel.template run<G, O, HasOut>() with the buffers' gradient and output types
// (HasOut false when there is no out; O is then unused).
template <ElemType G, typename Kernel>
static inline void dispatch_out(const AdamBuffers& b, const Kernel& kernel) {
  if (b.out == nullptr) {
    kernel.template run<G, ElemType::kBFloat16, false>();
  } else if (b.out_type == ElemType::kFloat16) {
    kernel.template run<G, ElemType::kFloat16, true>();
  } else {
    kernel.template run<G, ElemType::kBFloat16, true>();
  }
}

template <typename Kernel>
static inline void dispatch_types(const AdamBuffers& b, const Kernel& kernel) {
  switch (b.grad_type) {
    case ElemType::kFloat16: dispatch_out<ElemType::kFloat16>(b, kernel); break;
    case ElemType::kBFloat16: dispatch_out<ElemType::kBFloat16>(b, kernel); break;
    default: dispatch_out<ElemType::kFloat32>(b, kernel); break;
  }
}

// -- sum of squares (kernels.h: sum_squares) ----------------------------------------------
// Element i's square, exact in double (a 24-bit significand squared fits in 53 bits), goes
// into lane i % kSumLanes; the lanes are then added in order.  Exact products make a fused
// and an unfused multiply-add round alike, so every level returns the same bits, and the
// lanes follow the index, not the address, so every alignment does too.
constexpr size_t kSumLanes = 16;

// Elements [begin, n) into `lanes` one at a time (the vector paths' tail), then the lane sum.
template <ElemType T>
static inline double sum_squares_finish(const void* data, size_t begin, size_t n, double* lanes) {
  for (size_t i = begin; i < n; ++i) {
    const double x = load_elem<T>(data, i);
    lanes[i % kSumLanes] += x * x;
  }
  double total = 0.0;
  for (size_t k = 0; k < kSumLanes; ++k) total += lanes[k];
  return total;
}

// Calls kernel.template run<T>() for the element type.
template <typename Kernel>
static inline double dispatch_sum_type(ElemType type, const Kernel& kernel) {
  switch (type) {
    case ElemType::kFloat16: return kernel.template run<ElemType::kFloat16>();
    case ElemType::kBFloat16: return kernel.template run<ElemType::kBFloat16>();
    default: return kernel.template run<ElemType::kFloat32>();
  }
}

}  // namespace detail
}  // namespace adam
}  // namespace hetmem
