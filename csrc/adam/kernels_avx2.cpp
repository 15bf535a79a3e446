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
    const Streams s = streams_of(b);
    const bool scaled = c.scaled, l2 = c.l2, decoupled_decay = c.decoupled_decay, lerp_from_m = c.lerp_from_m;
    const __m256 grad_scale = _mm256_set1_ps(c.grad_scale), weight_decay = _mm256_set1_ps(c.weight_decay),
                 decay = _mm256_set1_ps(c.decay), lerp_coeff = _mm256_set1_ps(c.lerp_coeff),
                 beta2 = _mm256_set1_ps(c.beta2),
                 one_minus_beta2 = _mm256_set1_ps(c.one_minus_beta2), bc2_sqrt = _mm256_set1_ps(c.bc2_sqrt),
                 eps = _mm256_set1_ps(c.eps), neg_step_size = _mm256_set1_ps(c.neg_step_size);
    size_t i = aligned_start(s.param, begin, end);
    adam_elements<G, O, HasOut>(b, c, begin, i);
    const bool stream = HasOut && stream_out(b, i);
    const size_t vectors_end = end - (end - i) % kLanes;  // a local: the stores may alias this->end
    for (; i < vectors_end; i += kLanes) {
      if (i % 16 == 0) prefetch_ahead<G>(s, i);  // a 64-byte line of each fp32 array per 2 iterations
      __m256 g = load_grad<G>(s.grad, i);  // read before out[i..] is written (they may alias)
      __m256 p = _mm256_loadu_ps(s.param + i);
      __m256 m = _mm256_loadu_ps(s.exp_avg + i);
      __m256 v = _mm256_loadu_ps(s.exp_avg_sq + i);
      if (scaled) g = _mm256_div_ps(g, grad_scale);
      if (l2) g = _mm256_fmadd_ps(weight_decay, p, g);
      if (decoupled_decay) p = _mm256_mul_ps(p, decay);
      m = _mm256_fmadd_ps(lerp_coeff, _mm256_sub_ps(g, m), lerp_from_m ? m : g);
      v = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, g), g, _mm256_mul_ps(v, beta2));
      const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2_sqrt), eps);
      p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step_size, m), denom));
      _mm256_storeu_ps(s.param + i, p);
      _mm256_storeu_ps(s.exp_avg + i, m);
      _mm256_storeu_ps(s.exp_avg_sq + i, v);
      if (HasOut) store_out<O>(s.out, i, p, stream);
    }
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: done before we return
    adam_elements<G, O, HasOut>(b, c, i, end);
  }
};

// fp32 store of one vector; streaming (around the cache) when asked, to a 32-byte-aligned address.
template <bool Stream>
inline void store_fp32(float* at, __m256 x) {
  if (Stream) {
    _mm256_stream_ps(at, x);
  } else {
    _mm256_storeu_ps(at, x);
  }
}

struct ProbeAvx2 {
  const AdamBuffers& b;
  const ProbeOptions& options;
  size_t begin, end;

  template <ElemType G, ElemType O, bool HasOut>
  void run() const {
    const size_t i = aligned_start(b.param, begin, end);
    probe_elements<G, O, HasOut>(b, begin, i);
    // Streaming stores need every fp32 array 32-byte aligned where the vectors start.
    const bool fp32_aligned = (reinterpret_cast<uintptr_t>(b.param + i) | reinterpret_cast<uintptr_t>(b.exp_avg + i) |
                               reinterpret_cast<uintptr_t>(b.exp_avg_sq + i)) % 32 == 0;
    const bool stream_fp32 = options.streaming_stores && fp32_aligned;
    const size_t tail = stream_fp32 ? (options.prefetch ? loop<G, HasOut, true, true>(i) : loop<G, HasOut, false, true>(i))
                                    : (options.prefetch ? loop<G, HasOut, true, false>(i) : loop<G, HasOut, false, false>(i));
    probe_elements<G, O, HasOut>(b, tail, end);
  }

  // The vector part from i (param 32-byte aligned there); returns where the tail starts.
  template <ElemType G, bool HasOut, bool Prefetch, bool StreamFp32>
  size_t loop(size_t i) const {
    const Streams s = streams_of(b);
    const bool stream = HasOut && stream_out(b, i);
    const size_t vectors_end = end - (end - i) % kLanes;  // a local: the stores may alias this->end
    for (; i < vectors_end; i += kLanes) {
      if (Prefetch && i % 16 == 0) prefetch_ahead<G>(s, i);
      // every load before the first store, as in adam_step (see kernels_avx512.cpp)
      const __m256 g = load_grad<G>(s.grad, i);
      const __m256 p = _mm256_add_ps(_mm256_loadu_ps(s.param + i), g);
      const __m256 m = _mm256_add_ps(_mm256_loadu_ps(s.exp_avg + i), g);
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(s.exp_avg_sq + i), _mm256_mul_ps(g, g));
      store_fp32<StreamFp32>(s.param + i, p);
      store_fp32<StreamFp32>(s.exp_avg + i, m);
      store_fp32<StreamFp32>(s.exp_avg_sq + i, v);
      if (HasOut) store_16bit(s.out, i, _mm256_srli_epi32(_mm256_castps_si256(p), 16), stream);
    }
    if (stream || StreamFp32) _mm_sfence();
    return i;
  }
};

inline __m256d square_add(__m256d acc, __m128 x) {
  const __m256d d = _mm256_cvtps_pd(x);
  return _mm256_add_pd(acc, _mm256_mul_pd(d, d));
}

// Lanes 0-3, 4-7, 8-11 and 12-15 of element.h's sixteen, 16 elements per iteration.
struct SumSquaresAvx2 {
  const void* data;
  size_t n;
  template <ElemType T>
  double run() const {
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    const size_t full = n - n % kSumLanes;
    for (size_t i = 0; i < full; i += kSumLanes) {
      const __m256 lo = load_grad<T>(data, i), hi = load_grad<T>(data, i + kLanes);
      a0 = square_add(a0, _mm256_castps256_ps128(lo));
      a1 = square_add(a1, _mm256_extractf128_ps(lo, 1));
      a2 = square_add(a2, _mm256_castps256_ps128(hi));
      a3 = square_add(a3, _mm256_extractf128_ps(hi, 1));
    }
    alignas(32) double lanes[kSumLanes];
    _mm256_store_pd(lanes, a0);
    _mm256_store_pd(lanes + 4, a1);
    _mm256_store_pd(lanes + 8, a2);
    _mm256_store_pd(lanes + 12, a3);
    return sum_squares_finish<T>(data, full, n, lanes);
  }
};

}  // namespace

void adam_range_avx2(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end) {
  dispatch_types(b, AdamAvx2{b, c, begin, end});
}

void probe_range_avx2(const AdamBuffers& b, const ProbeOptions& options, size_t begin, size_t end) {
  dispatch_types(b, ProbeAvx2{b, options, begin, end});
}

double sum_squares_avx2(const void* data, ElemType type, size_t n) {
  return dispatch_sum_type(type, SumSquaresAvx2{data, n});
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
void probe_range_avx2(const AdamBuffers& b, const ProbeOptions& options, size_t begin, size_t end) {
  probe_range_scalar(b, options, begin, end);
}
double sum_squares_avx2(const void* data, ElemType type, size_t n) { return sum_squares_scalar(data, type, n); }
}  // namespace detail
}  // namespace adam
}  // namespace hetmem

#endif
