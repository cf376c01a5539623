"""Compiled loops (numba) for the hot paths, their machine code cached on disk.

numba keeps what it compiled under ``__pycache__`` beside the source, or in
``NUMBA_CACHE_DIR``, or in the user's cache directory. Where none is writable (a read-only
image with a read-only home) it refuses to cache at all; the loops then compile at every
start (~2-3 s) instead of failing the import.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar, cast

from numba import njit

F = TypeVar("F", bound=Callable[..., Any])


def compiled(func: F) -> F:
    """``func`` compiled to machine code on its first call (nogil: it takes no Python object)."""
    try:
        return cast(F, njit(cache=True, nogil=True)(func))
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return cast(F, njit(nogil=True)(func))
