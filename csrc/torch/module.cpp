// The Python module fastrl._C. Importing it runs the TORCH_LIBRARY_FRAGMENT registrations of every
// op family (csrc/torch/<family>.cpp); the ops are then reached as torch.ops.fastrl.<name>.
// The few host-side helpers that take Python objects (not tensors) are plain pybind11 functions.
#include <torch/extension.h>

#include <vector>

#include "cpu/advantages.h"

namespace {

// fastrl.group_index on a list of str (verl's uid strings): hashes each string's UTF-8 bytes in
// place (CPython caches them for compact ASCII strings), no sort, no copies. Returns None if an
// item is not a str, so the caller can fall back to a dict of arbitrary hashable objects.
py::object dense_ids_of_str(const py::list& items) {
  const int64_t n = static_cast<int64_t>(items.size());
  std::vector<fastrl::cpu::KeyView> views(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(items.ptr(), i);
    if (!PyUnicode_Check(item)) return py::none();
    Py_ssize_t size = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(item, &size);
    if (utf8 == nullptr) throw py::error_already_set();
    views[i] = {reinterpret_cast<const uint8_t*>(utf8), static_cast<int64_t>(size)};
  }
  at::Tensor ids = at::empty({n}, at::kLong);
  std::vector<int64_t> first(static_cast<size_t>(n));
  const int64_t num_keys =
      fastrl::cpu::dense_ids(views.data(), n, ids.data_ptr<int64_t>(), first.data());
  return py::make_tuple(ids, num_keys);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrl compiled ops (registered under torch.ops.fastrl)";
#ifdef FASTRL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("dense_ids_of_str", &dense_ids_of_str, py::arg("items"),
        "Dense ids (first-appearance order) of a list of str, or None if an item is not a str.");
}
