// pybind11 binding of the CPU Adam core.  Takes raw pointers (tensor.data_ptr()) and sizes;
// hetmem/ops/adam.py validates the tensors before it calls in.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "hetmem_binding.h"
#include "kernels.h"

namespace py = pybind11;
using namespace hetmem::adam;

namespace {

ElemType parse_type(const std::string& name, const char* what, bool allow_float32) {
  if (name == "float32" && allow_float32) return ElemType::kFloat32;
  if (name == "float16") return ElemType::kFloat16;
  if (name == "bfloat16") return ElemType::kBFloat16;
  throw py::value_error(std::string(what) + " must be " + (allow_float32 ? "'float32', " : "") +
                        "'float16' or 'bfloat16', got '" + name + "'");
}

SimdLevel parse_level(const std::string& name) {
  if (name == "scalar") return SimdLevel::kScalar;
  if (name == "avx2") return SimdLevel::kAvx2;
  if (name == "avx512") return SimdLevel::kAvx512;
  throw py::value_error("simd level must be 'scalar', 'avx2' or 'avx512', got '" + name + "'");
}

AdamBuffers make_buffers(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq,
                         uintptr_t out, size_t numel, const std::string& grad_dtype,
                         const std::string& out_dtype) {
  if (numel > 0 && (!param || !grad || !exp_avg || !exp_avg_sq)) {
    throw py::value_error("param, grad, exp_avg and exp_avg_sq must be non-null pointers");
  }
  AdamBuffers b;
  b.param = reinterpret_cast<float*>(param);
  b.grad = reinterpret_cast<const void*>(grad);
  b.grad_type = parse_type(grad_dtype, "grad_dtype", true);
  b.exp_avg = reinterpret_cast<float*>(exp_avg);
  b.exp_avg_sq = reinterpret_cast<float*>(exp_avg_sq);
  b.out = reinterpret_cast<void*>(out);
  b.out_type = parse_type(out_dtype, "out_dtype", false);
  b.n = numel;
  return b;
}

void adam_step_binding(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq,
                       uintptr_t out, size_t numel, const std::string& grad_dtype,
                       const std::string& out_dtype, int64_t step, double lr, double beta1,
                       double beta2, double eps, double weight_decay, bool decoupled,
                       bool bias_correction, double grad_scale) {
  const AdamBuffers b = make_buffers(param, grad, exp_avg, exp_avg_sq, out, numel, grad_dtype, out_dtype);
  AdamHyper h;
  h.step = step;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.weight_decay = weight_decay;
  h.decoupled = decoupled;
  h.bias_correction = bias_correction;
  h.grad_scale = grad_scale;
  py::gil_scoped_release release;
  adam_step(b, h);
}

void stream_probe_binding(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq,
                          uintptr_t out, size_t numel, const std::string& grad_dtype,
                          const std::string& out_dtype, bool prefetch, bool streaming_stores, bool static_split) {
  const AdamBuffers b = make_buffers(param, grad, exp_avg, exp_avg_sq, out, numel, grad_dtype, out_dtype);
  ProbeOptions options;
  options.prefetch = prefetch;
  options.streaming_stores = streaming_stores;
  options.static_split = static_split;
  py::gil_scoped_release release;
  stream_probe(b, options);
}

double sum_squares_binding(uintptr_t data, size_t numel, const std::string& dtype) {
  if (numel > 0 && !data) throw py::value_error("data must be a non-null pointer");
  const ElemType type = parse_type(dtype, "dtype", true);
  py::gil_scoped_release release;
  return sum_squares(reinterpret_cast<const void*>(data), type, numel);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  HETMEM_MODULE_INFO(m);
  m.doc() = "hetmem CPU Adam/AdamW kernel (AVX-512, AVX2, scalar; chosen at run time)";
  m.def("adam_step", &adam_step_binding, "One Adam/AdamW step over flat buffers (raw pointers).",
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("out") = 0,
        py::arg("numel"), py::arg("grad_dtype") = "float32", py::arg("out_dtype") = "bfloat16",
        py::arg("step"), py::arg("lr"), py::arg("beta1") = 0.9, py::arg("beta2") = 0.999,
        py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0, py::arg("decoupled") = false,
        py::arg("bias_correction") = true, py::arg("grad_scale") = 1.0);
  m.def("stream_probe", &stream_probe_binding,
        "Adam's memory traffic with trivial math (the roofline); changes the buffers.",
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("out") = 0,
        py::arg("numel"), py::arg("grad_dtype") = "float32", py::arg("out_dtype") = "bfloat16",
        py::arg("prefetch") = true, py::arg("streaming_stores") = false, py::arg("static_split") = false);
  m.def("sum_squares", &sum_squares_binding,
        "Sum of the squares of a flat fp32/fp16/bf16 buffer, in double (same bits on every SIMD path).",
        py::arg("data"), py::arg("numel"), py::arg("dtype") = "float32");
  m.def("simd_level", [] { return std::string(simd_level_name(simd_level())); },
        "The SIMD path adam_step uses now.");
  m.def("max_simd_level", [] { return std::string(simd_level_name(max_simd_level())); },
        "The best SIMD path this CPU supports.");
  m.def("set_simd_level",
        [](const std::string& level) { return std::string(simd_level_name(set_simd_level(parse_level(level)))); },
        "Use this SIMD path (capped at max_simd_level()); returns the path now in use.", py::arg("level"));
  m.def("set_num_threads", &set_num_threads, "Threads per call, counting the caller (>= 1).",
        py::arg("threads"));
  m.def("num_threads", &num_threads);
  m.def("set_serial_threshold", &set_serial_threshold,
        "Calls with fewer elements run on the calling thread.", py::arg("elements"));
  m.def("serial_threshold", &serial_threshold);
}
