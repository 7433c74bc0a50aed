"""The C++ extension `engine._C` (csrc/, built by setup.py), or None where it is not built."""
import functools


@functools.cache
def extension():
    """The module engine._C, imported once; None in a checkout without `setup.py build_ext`."""
    try:
        from engine import _C
    except ImportError:
        return None
    return _C


def extension_op(name: str):
    """engine._C.<name>, or None where the extension is not built or has no such function."""
    return getattr(extension(), name, None)
