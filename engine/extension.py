"""The engine's C++ extensions: `engine._C` (KV block allocator, radix tree) and the kernels' `ettrl_kernels._C`
(attention, fused layer ops, panel matmuls, sampling), re-exported here for the engine's models."""
import functools

from ettrl_kernels.extension import extension, extension_op

__all__ = ["extension", "extension_op", "core"]


@functools.cache
def core():
    """The module engine._C (block allocator and radix tree); None in a checkout without `setup.py build_ext`."""
    try:
        from engine import _C
    except ImportError:
        return None
    return _C
