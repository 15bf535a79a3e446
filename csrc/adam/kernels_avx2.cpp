// The AVX2 path (AVX2 + FMA + F16C): 8 elements per iteration, the same IEEE operations
// in the same order as adam_element() in element.h, tails done by that function.
#include "element.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace hetmem {
namespace adam {
namespace detail {
namespace {

constexpr size_t kLanes = 8;
constexpr size_t kStreamMinElements = size_t(1) << 20;  // 28 MiB of Adam arrays

template <ElemType G>
inline __m256 load_grad(const void* base, size_t i) {
  if (G == ElemType::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  if (G == ElemType::kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// `out` is written and never read here, so for a large call its stores go around the
// cache (no read-for-ownership of lines that are overwritten whole): 2 of Adam's 28 bytes
// per element.  Not when out is grad (its lines are in cache already), nor for calls
// whose arrays may still be in cache when the caller reads out.
inline bool stream_out(const AdamBuffers& b, size_t first_vector) {
  return b.out != nullptr && b.out != b.grad && b.n >= kStreamMinElements &&
         reinterpret_cast<uintptr_t>(static_cast<uint16_t*>(b.out) + first_vector) % 16 == 0;
}

inline void store_16bit_lanes(__m128i* dst, __m128i x, bool stream) {
  if (stream) {
    _mm_stream_si128(dst, x);
  } else {
    _mm_storeu_si128(dst, x);
  }
}

// Packs 8 values < 2^16 held in 32-bit lanes and stores them as 16-bit.
inline void store_16bit(void* base, size_t i, __m256i values32, bool stream) {
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(values32), _mm256_extracti128_si256(values32, 1));
  store_16bit_lanes(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), packed, stream);
}

// Round to nearest even, as float_to_bf16 / float_to_fp16 do.
template <ElemType O>
inline void store_out(void* base, size_t i, __m256 p, bool stream) {
  if (O == ElemType::kFloat16) {
    store_16bit_lanes(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                      _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), stream);
    return;
  }
  const __m256i u = _mm256_castps_si256(p);
  const __m256i high = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  const __m256 nan = _mm256_cmp_ps(p, p, _CMP_UNORD_Q);
  store_16bit(base, i, _mm256_blendv_epi8(rounded, quiet_nan, _mm256_castps_si256(nan)), stream);
}

// Software prefetch of the four read streams, kPrefetchBytes ahead, into L2: one line of
// each per 64 bytes of progress, so that more misses are in flight than the hardware
// prefetchers (which stop at every 4 KiB page) keep alone.  On the benchmark machine (AMD
// EPYC, 2 threads, 100M params) it was up to ~5% faster while other processes loaded the
// memory system and no different on a quiet one.  Prefetches past the end are harmless.
constexpr size_t kPrefetchBytes = 1024;

// (address arithmetic in integers: the address may lie past the end of the array)
inline void prefetch_l2(const void* at, size_t bytes_ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(at) + bytes_ahead), _MM_HINT_T1);
}

template <ElemType G>
inline void prefetch_ahead(const AdamBuffers& b, size_t i) {
  if (i % 16 != 0) return;  // AVX2 moves 32 bytes of each fp32 array per iteration
  prefetch_l2(b.param + i, kPrefetchBytes);
  prefetch_l2(b.exp_avg + i, kPrefetchBytes);
  prefetch_l2(b.exp_avg_sq + i, kPrefetchBytes);
  if (G == ElemType::kFloat32) {
    prefetch_l2(static_cast<const float*>(b.grad) + i, kPrefetchBytes);
  } else if (i % 32 == 0) {  // a 16-bit grad line holds 32 elements: the same elements ahead
    prefetch_l2(static_cast<const uint16_t*>(b.grad) + i, kPrefetchBytes / 2);
  }
}

// Elements before this index are done one at a time, so that vector accesses to param
// (and to the arrays that share its alignment) never split a cache line.
inline size_t aligned_start(const float* param, size_t begin, size_t end) {
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(param + begin) % 32;
  const size_t head = misalign % sizeof(float) ? 0 : (32 - misalign) % 32 / sizeof(float);
  return begin + head < end ? begin + head : end;
}

struct AdamAvx2 {
  const AdamBuffers& b;
  const AdamConstants& c;
  size_t begin, end;

  template <ElemType G, ElemType O, bool HasOut>
  void run() const {
    const __m256 grad_scale = _mm256_set1_ps(c.grad_scale), weight_decay = _mm256_set1_ps(c.weight_decay),
                 decay = _mm256_set1_ps(c.decay), lerp_coeff = _mm256_set1_ps(c.lerp_coeff),
                 beta2 = _mm256_set1_ps(c.beta2),
                 one_minus_beta2 = _mm256_set1_ps(c.one_minus_beta2), bc2_sqrt = _mm256_set1_ps(c.bc2_sqrt),
                 eps = _mm256_set1_ps(c.eps), neg_step_size = _mm256_set1_ps(c.neg_step_size);
    size_t i = aligned_start(b.param, begin, end);
    adam_elements<G, O, HasOut>(b, c, begin, i);
    const bool stream = HasOut && stream_out(b, i);
    for (; i + kLanes <= end; i += kLanes) {
      prefetch_ahead<G>(b, i);
      __m256 g = load_grad<G>(b.grad, i);  // read before out[i..] is written (they may alias)
      __m256 p = _mm256_loadu_ps(b.param + i);
      __m256 m = _mm256_loadu_ps(b.exp_avg + i);
      __m256 v = _mm256_loadu_ps(b.exp_avg_sq + i);
      if (c.scaled) g = _mm256_div_ps(g, grad_scale);
      if (c.l2) g = _mm256_fmadd_ps(weight_decay, p, g);
      if (c.decoupled_decay) p = _mm256_mul_ps(p, decay);
      m = _mm256_fmadd_ps(lerp_coeff, _mm256_sub_ps(g, m), c.lerp_from_m ? m : g);
      v = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, g), g, _mm256_mul_ps(v, beta2));
      const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2_sqrt), eps);
      p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step_size, m), denom));
      _mm256_storeu_ps(b.param + i, p);
      _mm256_storeu_ps(b.exp_avg + i, m);
      _mm256_storeu_ps(b.exp_avg_sq + i, v);
      if (HasOut) store_out<O>(b.out, i, p, stream);
    }
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: done before we return
    adam_elements<G, O, HasOut>(b, c, i, end);
  }
};

struct ProbeAvx2 {
  const AdamBuffers& b;
  size_t begin, end;

  template <ElemType G, ElemType O, bool HasOut>
  void run() const {
    size_t i = aligned_start(b.param, begin, end);
    probe_elements<G, O, HasOut>(b, begin, i);
    const bool stream = HasOut && stream_out(b, i);
    for (; i + kLanes <= end; i += kLanes) {
      prefetch_ahead<G>(b, i);
      const __m256 g = load_grad<G>(b.grad, i);
      const __m256 p = _mm256_add_ps(_mm256_loadu_ps(b.param + i), g);
      _mm256_storeu_ps(b.param + i, p);
      _mm256_storeu_ps(b.exp_avg + i, _mm256_add_ps(_mm256_loadu_ps(b.exp_avg + i), g));
      _mm256_storeu_ps(b.exp_avg_sq + i, _mm256_add_ps(_mm256_loadu_ps(b.exp_avg_sq + i), _mm256_mul_ps(g, g)));
      if (HasOut) store_16bit(b.out, i, _mm256_srli_epi32(_mm256_castps_si256(p), 16), stream);
    }
    if (stream) _mm_sfence();
    probe_elements<G, O, HasOut>(b, i, end);
  }
};

}  // namespace

void adam_range_avx2(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end) {
  dispatch_types(b, AdamAvx2{b, c, begin, end});
}

void probe_range_avx2(const AdamBuffers& b, size_t begin, size_t end) {
  dispatch_types(b, ProbeAvx2{b, begin, end});
}

}  // namespace detail
}  // namespace adam
}  // namespace hetmem

#pragma GCC pop_options

#else  // not x86: never selected (max_simd_level() is scalar), defined for the linker

namespace hetmem {
namespace adam {
namespace detail {
void adam_range_avx2(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end) {
  adam_range_scalar(b, c, begin, end);
}
void probe_range_avx2(const AdamBuffers& b, size_t begin, size_t end) { probe_range_scalar(b, begin, end); }
}  // namespace detail
}  // namespace adam
}  // namespace hetmem

#endif
