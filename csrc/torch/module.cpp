// The Python module fastrl._C. Importing it runs the TORCH_LIBRARY_FRAGMENT registrations of every
// op family (csrc/torch/<family>.cpp); the ops are then reached as torch.ops.fastrl.<name>.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrl compiled ops (registered under torch.ops.fastrl)";
#ifdef FASTRL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
