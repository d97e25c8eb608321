"""Loads the compiled native core and checks that it matches this Python code.

The core is built by ``pip install`` (cffi out-of-line API mode); nothing is compiled at import.
"""

from __future__ import annotations

from typing import Any

from ..errors import VRangeError

EXPECTED_NATIVE_VERSION = 3

try:
    from .._vrange_native import ffi as _ffi, lib as _lib
except ImportError as error:  # pragma: no cover - only on a broken install
    raise VRangeError(
        "vrange's native core is not built; install vrange with pip (pip install .) so that cffi "
        f"compiles it ({error})"
    ) from error

if _lib.vr_native_version() != EXPECTED_NATIVE_VERSION:  # pragma: no cover - only on a stale build
    raise VRangeError(
        f"vrange's native core is version {_lib.vr_native_version()}, this Python code expects "
        f"{EXPECTED_NATIVE_VERSION}: reinstall vrange so both come from the same build"
    )

ffi: Any = _ffi
lib: Any = _lib
