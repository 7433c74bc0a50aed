// Placeholder translation unit until the radix tree lands: binds nothing yet.
#include <pybind11/pybind11.h>
void bind_radix_tree(pybind11::module_& m) {}
