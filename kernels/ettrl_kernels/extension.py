"""The C++ kernel extension `ettrl_kernels._C` (csrc/, built by setup.py), or None where it is not built."""
import functools


@functools.cache
def extension():
    """The module ettrl_kernels._C, imported once; None in a checkout without `setup.py build_ext`."""
    try:
        from ettrl_kernels import _C
    except ImportError:
        return None
    return _C


def extension_op(name: str):
    """ettrl_kernels._C.<name>, or None where the extension is not built or has no such function."""
    return getattr(extension(), name, None)
