// The Python face of the extension: importing it registers the fastadv_ext ops
// (ops.cpp, cuda_ops.cpp); build_info() says what was compiled in.
//
// Only built as a Python module (torch.utils.cpp_extension defines
// TORCH_EXTENSION_NAME); the CMake library, loaded with torch.ops.load_library,
// answers torch.ops.fastadv_ext.build_info() instead.
#if defined(TORCH_EXTENSION_NAME)

#include <pybind11/pybind11.h>

#include <string>

#include "build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastadv native ops (torch.ops.fastadv_ext.*) and their build information";
  m.def(
      "build_info",
      [] {
        // One source of truth: the JSON that torch.ops.fastadv_ext.build_info() returns.
        py::object loads = py::module_::import("json").attr("loads");
        return loads(fastadv::build_info_json()).cast<py::dict>();
      },
      "What this build holds: torch version, CUDA archs and runtime, CPU variants, compiler.");
}

#endif  // TORCH_EXTENSION_NAME
