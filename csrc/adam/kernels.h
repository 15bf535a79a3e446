// CPU Adam/AdamW core: no torch, no pybind11 (see csrc/adam/binding.cpp for the binding).
//
// One call updates one flat range of parameters in place (fma(a, b, c) = a * b + c rounded
// once):
//
//   g  = grad / grad_scale                      (grad read as fp32, fp16 or bf16)
//   Adam  (L2):        g = fma(weight_decay, p, g)          torch: grad.add(param, alpha=wd)
//   AdamW (decoupled): p = p * (1 - lr * weight_decay)      torch: param.mul_(1 - lr * wd)
//   m  = fma(w, g - m, m) for w = 1 - beta1 < 0.5, else fma(w - 1, g - m, g)
//                                                            torch: exp_avg.lerp_(g, w)
//   v  = fma((1 - beta2) * g, g, v * beta2)      torch: exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
//   p  = p + (-step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)
//                                                            torch: param.addcdiv_(m, denom, -step_size)
//   out = round_to_nearest_even(p)               (optional fp16/bf16 copy of the new p)
//
// with step_size = lr / (1 - beta1^step) and bias_correction2 = 1 - beta2^step computed in
// double and rounded to float once, as torch.optim.Adam's single-tensor path hands its
// Python-float scalars to fp32 kernels.  The fused multiply-adds are where torch's own
// vectorized CPU kernels (Vectorized<float> on AVX2/AVX-512) fuse: matching them matters
// where g + wd * p cancels, because Adam divides that tiny difference by its own magnitude.
// Every other operation rounds on its own (the files are compiled without FMA
// contraction), so the scalar, AVX2 and AVX-512 paths give bit-identical results and the
// SIMD tails need no special casing.  (torch's vectorized sqrt is not always correctly
// rounded; this one is, so single elements can differ from torch by an ulp there.)
#pragma once

#include <cstddef>
#include <cstdint>

namespace hetmem {
namespace adam {

// The instruction-set paths, in increasing order.
enum class SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Element types of the gradient and of the low-precision output.
enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

const char* simd_level_name(SimdLevel level);

// Hyperparameters of one step, as the caller (Python) holds them.
struct AdamHyper {
  int64_t step = 1;            // 1-based step count of these parameters (after the increment)
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;      // AdamW when true, Adam (L2 folded into the gradient) when false
  bool bias_correction = true;
  double grad_scale = 1.0;     // the gradient is divided by this (loss scale / clip coefficient)
};

// The per-element constants derived from AdamHyper (double math on the host, then float).
struct AdamConstants {
  float grad_scale;        // divisor of the gradient; used only when `scaled`
  float weight_decay;      // L2 coefficient; used only when `l2`
  float decay;             // 1 - lr * weight_decay; used only when `decoupled_decay`
  float lerp_coeff;        // w = 1 - beta1 when w < 0.5, else w - 1 (torch's lerp)
  float beta2;
  float one_minus_beta2;   // 1 - beta2
  float bc2_sqrt;          // sqrt(1 - beta2^step), or 1 without bias correction
  float eps;
  float neg_step_size;     // -lr / (1 - beta1^step), or -lr without bias correction
  bool lerp_from_m;        // w < 0.5: the lerp is fma(w, g - m, m), else fma(w - 1, g - m, g)
  bool scaled;             // grad_scale != 1
  bool l2;                 // Adam with weight_decay != 0
  bool decoupled_decay;    // AdamW with weight_decay != 0
};

AdamConstants make_constants(const AdamHyper& hyper);

// The tensors of one call: n elements each, any alignment.  `out` may be null
// (out_type is then ignored).  `grad` and `out` may be the same memory when both are the
// same 16-bit type: every element's gradient is read before its output is written.
struct AdamBuffers {
  float* param = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  const void* grad = nullptr;
  ElemType grad_type = ElemType::kFloat32;
  void* out = nullptr;
  ElemType out_type = ElemType::kBFloat16;
  size_t n = 0;
};

// One Adam step over all n elements: on the thread pool for large n, on the calling
// thread below serial_threshold().  Thread-safe: concurrent callers take turns.
void adam_step(const AdamBuffers& buffers, const AdamHyper& hyper);

// How stream_probe moves its bytes.  The default is adam_step's own loop; the benchmark
// times every variant and takes the fastest as the roofline, so that the roofline is the
// best streaming kernel for Adam's traffic that we have, not only the one Adam uses.
struct ProbeOptions {
  bool prefetch = true;           // adam_step's software prefetch (element.h); false: hardware only
  bool streaming_stores = false;  // param, exp_avg, exp_avg_sq stored around the cache (when all
                                  // three share the vectors' alignment; plain stores otherwise)
  bool static_split = false;      // one contiguous range per thread and no taking of others'
                                  // blocks (torch's at::parallel_for split)
};

// A streaming kernel with exactly adam_step's memory traffic and trivial math, for the
// roofline: reads param, exp_avg, exp_avg_sq and grad, writes param, exp_avg, exp_avg_sq
// and (when set) out, with the same loads and stores as adam_step; with default options
// also the same prefetch and thread split.
void stream_probe(const AdamBuffers& buffers, const ProbeOptions& options = ProbeOptions());

// The sum of the squares of n elements of `type` (the squared L2 norm of a gradient), in
// double, in one pass with no temporary; the same bits on every SIMD path and alignment
// (element.h says how).  Runs on the calling thread only: its caller is autograd's thread,
// which must not queue behind an Adam call on the pool.
double sum_squares(const void* data, ElemType type, size_t n);

// -- configuration ------------------------------------------------------------------------

SimdLevel max_simd_level();          // the best path this CPU (and OS) supports
SimdLevel simd_level();              // the path adam_step uses now
SimdLevel set_simd_level(SimdLevel level);  // capped at max_simd_level(); returns the result

void set_num_threads(int threads);   // >= 1, counting the calling thread
int num_threads();

// Calls with fewer elements than this run on the calling thread (waking a pool thread costs
// ~6 us, one thread updates 2^17 elements in cache in ~35 us).  Default 2^17; calls shorter
// than two work blocks (2 x 2^16 elements) always run on the calling thread.
void set_serial_threshold(size_t elements);
size_t serial_threshold();

// -- per-level range kernels (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp) ---

namespace detail {
void adam_range_scalar(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end);
void adam_range_avx2(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end);
void adam_range_avx512(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end);
void probe_range_scalar(const AdamBuffers& b, const ProbeOptions& options, size_t begin, size_t end);
void probe_range_avx2(const AdamBuffers& b, const ProbeOptions& options, size_t begin, size_t end);
void probe_range_avx512(const AdamBuffers& b, const ProbeOptions& options, size_t begin, size_t end);
double sum_squares_scalar(const void* data, ElemType type, size_t n);
double sum_squares_avx2(const void* data, ElemType type, size_t n);
double sum_squares_avx512(const void* data, ElemType type, size_t n);
}  // namespace detail

}  // namespace adam
}  // namespace hetmem
