"""The engine's C++ extensions: `engine._C` (KV block allocator, radix tree) and the kernels' `ettrl_kernels._C`
(attention, fused layer ops, panel matmuls, sampling), re-exported here for the engine's models."""
import functools
from types import ModuleType

from ettrl_kernels.extension import extension, extension_op

__all__ = ["extension", "extension_op", "core"]


@functools.cache
def core() -> ModuleType | None:
    """The module engine._C (block allocator and radix tree); None in a checkout without `setup.py build_ext`."""
    try:
        from engine import _C  # type: ignore[attr-defined]  # compiled by setup.py, no stub
    except ImportError:
        return None
    return _C
