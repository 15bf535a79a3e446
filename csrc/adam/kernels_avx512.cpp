// The AVX-512 path (AVX512F only): 16 elements per iteration, the same IEEE operations in
// the same order as adam_element() in element.h, tails done by that function.
#include "element.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves
// (`__m512 __Y = __Y;`), which -Wmaybe-uninitialized reports at every use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace hetmem {
namespace adam {
namespace detail {
namespace {

constexpr size_t kLanes = 16;
constexpr size_t kStreamMinElements = size_t(1) << 20;  // 28 MiB of Adam arrays

template <ElemType G>
inline __m512 load_grad(const void* base, size_t i) {
  if (G == ElemType::kFloat32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  if (G == ElemType::kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// `out` is written and never read here, so for a large call its stores go around the
// cache (no read-for-ownership of lines that are overwritten whole): 2 of Adam's 28 bytes
// per element.  Not when out is grad (its lines are in cache already), nor for calls
// whose arrays may still be in cache when the caller reads out.
inline bool stream_out(const AdamBuffers& b, size_t first_vector) {
  return b.out != nullptr && b.out != b.grad && b.n >= kStreamMinElements &&
         reinterpret_cast<uintptr_t>(static_cast<uint16_t*>(b.out) + first_vector) % 32 == 0;
}

inline void store_16bit_lanes(__m256i* dst, __m256i x, bool stream) {
  if (stream) {
    _mm256_stream_si256(dst, x);
  } else {
    _mm256_storeu_si256(dst, x);
  }
}

// Round to nearest even, as float_to_bf16 / float_to_fp16 do.
template <ElemType O>
inline void store_out(void* base, size_t i, __m512 p, bool stream) {
  __m256i* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i);
  if (O == ElemType::kFloat16) {
    store_16bit_lanes(dst, _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), stream);
    return;
  }
  const __m512i u = _mm512_castps_si512(p);
  const __m512i high = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
  store_16bit_lanes(dst, _mm512_cvtepi32_epi16(rounded), stream);
}

// Elements before this index are done one at a time, so that the vector loads and stores
// of param (and of the other arrays when they share its alignment) never split a cache line.
inline size_t aligned_start(const float* param, size_t begin, size_t end) {
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(param + begin) % 64;
  const size_t head = misalign % sizeof(float) ? 0 : (64 - misalign) % 64 / sizeof(float);
  return begin + head < end ? begin + head : end;
}

struct AdamAvx512 {
  const AdamBuffers& b;
  const AdamConstants& c;
  size_t begin, end;

  template <ElemType G, ElemType O, bool HasOut>
  void run() const {
    const Streams s = streams_of(b);
    const bool scaled = c.scaled, l2 = c.l2, decoupled_decay = c.decoupled_decay, lerp_from_m = c.lerp_from_m;
    const __m512 grad_scale = _mm512_set1_ps(c.grad_scale), weight_decay = _mm512_set1_ps(c.weight_decay),
                 decay = _mm512_set1_ps(c.decay), lerp_coeff = _mm512_set1_ps(c.lerp_coeff),
                 beta2 = _mm512_set1_ps(c.beta2),
                 one_minus_beta2 = _mm512_set1_ps(c.one_minus_beta2), bc2_sqrt = _mm512_set1_ps(c.bc2_sqrt),
                 eps = _mm512_set1_ps(c.eps), neg_step_size = _mm512_set1_ps(c.neg_step_size);
    size_t i = aligned_start(s.param, begin, end);
    adam_elements<G, O, HasOut>(b, c, begin, i);
    const bool stream = HasOut && stream_out(b, i);
    const size_t vectors_end = end - (end - i) % kLanes;  // a local: the stores may alias this->end
    for (; i < vectors_end; i += kLanes) {
      prefetch_ahead<G>(s, i);  // one line of each array per iteration
      __m512 g = load_grad<G>(s.grad, i);  // read before out[i..] is written (they may alias)
      __m512 p = _mm512_loadu_ps(s.param + i);
      __m512 m = _mm512_loadu_ps(s.exp_avg + i);
      __m512 v = _mm512_loadu_ps(s.exp_avg_sq + i);
      if (scaled) g = _mm512_div_ps(g, grad_scale);
      if (l2) g = _mm512_fmadd_ps(weight_decay, p, g);
      if (decoupled_decay) p = _mm512_mul_ps(p, decay);
      m = _mm512_fmadd_ps(lerp_coeff, _mm512_sub_ps(g, m), lerp_from_m ? m : g);
      v = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, g), g, _mm512_mul_ps(v, beta2));
      const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2_sqrt), eps);
      p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step_size, m), denom));
      _mm512_storeu_ps(s.param + i, p);
      _mm512_storeu_ps(s.exp_avg + i, m);
      _mm512_storeu_ps(s.exp_avg_sq + i, v);
      if (HasOut) store_out<O>(s.out, i, p, stream);
    }
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: done before we return
    adam_elements<G, O, HasOut>(b, c, i, end);
  }
};

// fp32 store of one vector; streaming (around the cache) when asked, to a 64-byte-aligned address.
template <bool Stream>
inline void store_fp32(float* at, __m512 x) {
  if (Stream) {
    _mm512_stream_ps(at, x);
  } else {
    _mm512_storeu_ps(at, x);
  }
}

struct ProbeAvx512 {
  const AdamBuffers& b;
  const ProbeOptions& options;
  size_t begin, end;

  template <ElemType G, ElemType O, bool HasOut>
  void run() const {
    const size_t i = aligned_start(b.param, begin, end);
    probe_elements<G, O, HasOut>(b, begin, i);
    // Streaming stores need every fp32 array 64-byte aligned where the vectors start.
    const bool fp32_aligned = (reinterpret_cast<uintptr_t>(b.param + i) | reinterpret_cast<uintptr_t>(b.exp_avg + i) |
                               reinterpret_cast<uintptr_t>(b.exp_avg_sq + i)) % 64 == 0;
    const bool stream_fp32 = options.streaming_stores && fp32_aligned;
    const size_t tail = stream_fp32 ? (options.prefetch ? loop<G, HasOut, true, true>(i) : loop<G, HasOut, false, true>(i))
                                    : (options.prefetch ? loop<G, HasOut, true, false>(i) : loop<G, HasOut, false, false>(i));
    probe_elements<G, O, HasOut>(b, tail, end);
  }

  // The vector part from i (param 64-byte aligned there); returns where the tail starts.
  template <ElemType G, bool HasOut, bool Prefetch, bool StreamFp32>
  size_t loop(size_t i) const {
    const Streams s = streams_of(b);
    const bool stream = HasOut && stream_out(b, i);
    const size_t vectors_end = end - (end - i) % kLanes;  // a local: the stores may alias this->end
    for (; i < vectors_end; i += kLanes) {
      if (Prefetch) prefetch_ahead<G>(s, i);  // one line of each array per iteration
      // every load before the first store, as in adam_step: with each array's load and store
      // together the probe was ~2% slower than adam_step itself (the arrays are often 4 KiB
      // aliased: a store to param[i] ahead of the load of exp_avg[i] can hold that load up)
      const __m512 g = load_grad<G>(s.grad, i);
      const __m512 p = _mm512_add_ps(_mm512_loadu_ps(s.param + i), g);
      const __m512 m = _mm512_add_ps(_mm512_loadu_ps(s.exp_avg + i), g);
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(s.exp_avg_sq + i), _mm512_mul_ps(g, g));
      store_fp32<StreamFp32>(s.param + i, p);
      store_fp32<StreamFp32>(s.exp_avg + i, m);
      store_fp32<StreamFp32>(s.exp_avg_sq + i, v);
      if (HasOut) {
        const __m256i bits = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(p), 16));
        store_16bit_lanes(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(s.out) + i), bits, stream);
      }
    }
    if (stream || StreamFp32) _mm_sfence();
    return i;
  }
};

// Lanes 0-7 and 8-15 of element.h's sixteen, 16 elements per iteration.
struct SumSquaresAvx512 {
  const void* data;
  size_t n;
  template <ElemType T>
  double run() const {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0;
    const size_t full = n - n % kSumLanes;
    for (size_t i = 0; i < full; i += kSumLanes) {
      const __m512 x = load_grad<T>(data, i);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
      a0 = _mm512_add_pd(a0, _mm512_mul_pd(lo, lo));
      a1 = _mm512_add_pd(a1, _mm512_mul_pd(hi, hi));
    }
    alignas(64) double lanes[kSumLanes];
    _mm512_store_pd(lanes, a0);
    _mm512_store_pd(lanes + 8, a1);
    return sum_squares_finish<T>(data, full, n, lanes);
  }
};

}  // namespace

void adam_range_avx512(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end) {
  dispatch_types(b, AdamAvx512{b, c, begin, end});
}

void probe_range_avx512(const AdamBuffers& b, const ProbeOptions& options, size_t begin, size_t end) {
  dispatch_types(b, ProbeAvx512{b, options, begin, end});
}

double sum_squares_avx512(const void* data, ElemType type, size_t n) {
  return dispatch_sum_type(type, SumSquaresAvx512{data, n});
}

}  // namespace detail
}  // namespace adam
}  // namespace hetmem

#pragma GCC pop_options

#else  // not x86: never selected (max_simd_level() is scalar), defined for the linker

namespace hetmem {
namespace adam {
namespace detail {
void adam_range_avx512(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end) {
  adam_range_scalar(b, c, begin, end);
}
void probe_range_avx512(const AdamBuffers& b, const ProbeOptions& options, size_t begin, size_t end) {
  probe_range_scalar(b, options, begin, end);
}
double sum_squares_avx512(const void* data, ElemType type, size_t n) { return sum_squares_scalar(data, type, n); }
}  // namespace detail
}  // namespace adam
}  // namespace hetmem

#endif
