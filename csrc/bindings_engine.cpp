// Python bindings of the engine's C++ bookkeeping: module `engine._C` (KV block allocator, radix tree).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_allocator.h"

namespace py = pybind11;
using ettrl::BlockAllocator;

void bind_radix_tree(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "ETTRL engine core: KV block allocator and radix tree of token prefixes";
  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def("allocate", &BlockAllocator::allocate, py::arg("n"))
      .def("retain", &BlockAllocator::retain, py::arg("block"))
      .def("retain_many", &BlockAllocator::retain_many, py::arg("blocks"))
      .def("release", &BlockAllocator::release, py::arg("block"))
      .def("release_many", &BlockAllocator::release_many, py::arg("blocks"))
      .def("reset", &BlockAllocator::reset)
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block"))
      .def("check_integrity", &BlockAllocator::check_integrity)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("num_free", &BlockAllocator::num_free)
      .def_property_readonly("num_used", &BlockAllocator::num_used);
  bind_radix_tree(m);
}
