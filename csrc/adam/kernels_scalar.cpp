// The scalar path: portable C++ for CPUs without AVX2 (and the reference the SIMD paths
// match bit for bit).
#include "element.h"
#include "kernels.h"

namespace hetmem {
namespace adam {
namespace detail {
namespace {

struct AdamScalar {
  const AdamBuffers& b;
  const AdamConstants& c;
  size_t begin, end;
  template <ElemType G, ElemType O, bool HasOut>
  void run() const { adam_elements<G, O, HasOut>(b, c, begin, end); }
};

struct SumSquaresScalar {
  const void* data;
  size_t n;
  template <ElemType T>
  double run() const {
    double lanes[kSumLanes] = {};
    return sum_squares_finish<T>(data, 0, n, lanes);
  }
};

struct ProbeScalar {
  const AdamBuffers& b;
  size_t begin, end;
  template <ElemType G, ElemType O, bool HasOut>
  void run() const { probe_elements<G, O, HasOut>(b, begin, end); }
};

}  // namespace

void adam_range_scalar(const AdamBuffers& b, const AdamConstants& c, size_t begin, size_t end) {
  dispatch_types(b, AdamScalar{b, c, begin, end});
}

// (no software prefetch or streaming stores here: `options` changes nothing but the split)
void probe_range_scalar(const AdamBuffers& b, const ProbeOptions& /*options*/, size_t begin, size_t end) {
  dispatch_types(b, ProbeScalar{b, begin, end});
}

double sum_squares_scalar(const void* data, ElemType type, size_t n) {
  return dispatch_sum_type(type, SumSquaresScalar{data, n});
}

}  // namespace detail
}  // namespace adam
}  // namespace hetmem
