"""The C++ kernel extension `ettrl_kernels._C` (csrc/, built by setup.py), or None where it is not built."""
from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any


@functools.cache
def extension() -> ModuleType | None:
    """The module ettrl_kernels._C, imported once; None in a checkout without `setup.py build_ext`."""
    try:
        from ettrl_kernels import _C  # type: ignore[attr-defined]  # compiled from csrc/, no stub
    except ImportError:
        return None
    return _C


def extension_op(name: str) -> Callable[..., Any] | None:
    """ettrl_kernels._C.<name>, or None where the extension is not built or has no such function."""
    return getattr(extension(), name, None)
