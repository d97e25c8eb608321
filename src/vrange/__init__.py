"""vrange: volatile ranges for Python.

Memory that holds a cache the program can regenerate: the kernel may take it back under memory
pressure, and it is refilled transparently, page by page, the next time anything touches it.
"""

from __future__ import annotations

from ._backends import available_backends
from .errors import BackendUnavailable, RegenerationError, VRangeError, VRangeOSError
from ._features import Features, features

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "Features",
    "RegenerationError",
    "VRangeError",
    "VRangeOSError",
    "__version__",
    "available_backends",
    "features",
]
