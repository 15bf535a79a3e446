// Python binding of the aio engine: raw pointers and sizes in, plain values out.
// Tensor checks live in hetmem/nvme/aio.py; every call that does IO or waits releases the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "crc32c.h"
#include "engine.h"
#include "hetmem_binding.h"

namespace py = pybind11;
using namespace hetmem::aio;

namespace {

BackendKind backend_from(const std::string& name) {
  BackendKind kind;
  if (!parse_backend(name, &kind))
    throw std::invalid_argument("backend=" + name + " is not one of io_uring, linux_aio, threads");
  return kind;
}

// (done, errno, short, moved, fail_offset, fail_length, fail_moved)
py::tuple as_tuple(const RequestStatus& s) {
  return py::make_tuple(s.done, s.error, s.short_transfer, s.moved, s.fail_offset, s.fail_length, s.fail_moved);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  HETMEM_MODULE_INFO(m);
  m.doc() = "hetmem async file IO engine (io_uring, Linux AIO, thread pool)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const SystemError& e) {
      py::object error = e.path.empty() ? py::module_::import("builtins").attr("OSError")(e.err, e.what())
                                        : py::module_::import("builtins").attr("OSError")(e.err, e.what(), e.path);
      PyErr_SetObject(PyExc_OSError, error.ptr());
    }
  });

  py::class_<File>(m, "File")
      .def(py::init([](const std::string& path, const std::string& backend, uint64_t block_size, int queue_depth,
                       int threads, bool direct, bool read_only) {
             Options o;
             o.backend = backend_from(backend);
             o.block_size = block_size;
             o.queue_depth = queue_depth;
             o.threads = threads;
             o.direct = direct;
             o.read_only = read_only;
             return new File(path, o);
           }),
           py::arg("path"), py::arg("backend") = "io_uring", py::arg("block_size") = 1 << 20,
           py::arg("queue_depth") = 8, py::arg("threads") = 1, py::arg("direct") = true, py::arg("read_only") = false)
      .def(
          "submit",
          [](File& f, bool write, uintptr_t ptr, uint64_t nbytes, uint64_t offset) {
            return f.submit(write ? Op::Write : Op::Read, reinterpret_cast<void*>(ptr), nbytes, offset);
          },
          py::arg("write"), py::arg("ptr"), py::arg("nbytes"), py::arg("offset"),
          py::call_guard<py::gil_scoped_release>())
      .def(
          "poll",
          [](File& f, uint64_t id) {
            RequestStatus s;
            {
              py::gil_scoped_release release;
              s = f.poll(id);
            }
            return as_tuple(s);
          },
          py::arg("id"))
      .def(
          "wait",
          [](File& f, uint64_t id) {
            RequestStatus s;
            {
              py::gil_scoped_release release;
              s = f.wait(id);
            }
            return as_tuple(s);
          },
          py::arg("id"))
      .def("close", &File::close, py::call_guard<py::gil_scoped_release>())
      .def(
          "set_fault",
          [](File& f, int kind, uint64_t after, int err, uint64_t short_by) {
            f.set_fault(static_cast<FaultKind>(kind), after, err, short_by);
          },
          py::arg("kind"), py::arg("after") = 0, py::arg("err") = 5, py::arg("short_by") = 4096)
      .def_property_readonly("direct", &File::direct)
      .def_property_readonly("direct_note", &File::direct_note)
      .def_property_readonly("mem_align", &File::mem_align)
      .def_property_readonly("offset_align", &File::offset_align)
      .def_property_readonly("block_size", &File::block_size)
      .def_property_readonly("backend", [](const File& f) { return std::string(backend_name(f.backend())); });

  m.def(
      "crc32c", [](uintptr_t ptr, uint64_t nbytes, uint32_t crc) { return crc32c_extend(crc, reinterpret_cast<const void*>(ptr), nbytes); },
      py::arg("ptr"), py::arg("nbytes"), py::arg("crc") = 0, py::call_guard<py::gil_scoped_release>());
  m.def(
      "crc32c_table",
      [](uintptr_t ptr, uint64_t nbytes, uint32_t crc) {
        return crc32c_extend_table(crc, reinterpret_cast<const void*>(ptr), nbytes);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("crc") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("crc32c_implementation", &crc32c_implementation);
  m.def(
      "backend_unavailable_reason", [](const std::string& name) { return backend_unavailable_reason(backend_from(name)); },
      py::arg("backend"));
}
