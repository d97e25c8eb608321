"""vrange: volatile ranges for Python.

Memory that holds a cache the program can regenerate: the kernel may take it back under memory
pressure, and it is refilled transparently, page by page, the next time anything touches it.
"""

from __future__ import annotations

import logging

from . import io, policy, sources
from ._backends import RegionStats, available_backends, features
from ._feature_report import Features
from .cache import Cache, CacheFullError, CacheStats
from .errors import BackendUnavailable, RegenerationError, VRangeError, VRangeOSError
from .region import DEFAULT_CHUNK_SIZE, BackendName, ErrorPolicy, Pin, Region

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BackendName",
    "BackendUnavailable",
    "Cache",
    "CacheFullError",
    "CacheStats",
    "ErrorPolicy",
    "Features",
    "Pin",
    "RegenerationError",
    "Region",
    "RegionStats",
    "VRangeError",
    "VRangeOSError",
    "__version__",
    "available_backends",
    "features",
    "io",
    "policy",
    "sources",
]

# A library never configures logging: without a handler of the application's, vrange's messages go
# nowhere (instead of Python's last-resort handler). ``python -m vrange`` shows them on stderr.
logging.getLogger("vrange").addHandler(logging.NullHandler())
