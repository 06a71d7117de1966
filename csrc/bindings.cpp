// Python module of the CUDA backend: madx_fast._cuda_C (setup.py) or a JIT build of csrc/
// (madx_fast/kernels/cuda/_build.py). The Python launchers in madx_fast/kernels/cuda call these.
#include <torch/extension.h>

#include "ops.h"

// Hash of csrc/ the module was built from (setup.py / the JIT loader pass -DMADX_SOURCE_DIGEST=<hex>), so
// the loader can tell a stale prebuilt module from the sources next to it.
#define MADX_STRINGIFY_(x) #x
#define MADX_STRINGIFY(x) MADX_STRINGIFY_(x)
#ifdef MADX_SOURCE_DIGEST
#define MADX_SOURCE_DIGEST_STR MADX_STRINGIFY(MADX_SOURCE_DIGEST)
#else
#define MADX_SOURCE_DIGEST_STR ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "madx_fast CUDA kernels: fused bottleneck adapter and NICE coupling (forward and backward)";
#ifdef MADX_EMULATE
  m.attr("EMULATED") = true;  // kernels run on the CPU emulator (tests only)
#else
  m.attr("EMULATED") = false;
#endif
  m.attr("SOURCE_DIGEST") = MADX_SOURCE_DIGEST_STR;
  m.def("adapter_forward", &madx::adapter_forward, py::arg("x"), py::arg("residual"), py::arg("w_down"),
        py::arg("b_down"), py::arg("w_up"), py::arg("b_up"), py::arg("scaling"), py::arg("activation"));
  m.def("adapter_backward", &madx::adapter_backward, py::arg("dy"), py::arg("x"), py::arg("z"), py::arg("w_down"),
        py::arg("w_up"), py::arg("scaling"), py::arg("activation"), py::arg("residual_is_input"));
  m.def("nice_coupling", &madx::nice_coupling, py::arg("x"), py::arg("weights"), py::arg("activation"),
        py::arg("inverse"));
  m.def("nice_coupling_backward", &madx::nice_coupling_backward, py::arg("dout"), py::arg("out"), py::arg("inp"),
        py::arg("weights"), py::arg("activation"), py::arg("inverse"));
}
