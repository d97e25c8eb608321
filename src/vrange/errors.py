"""The exceptions vrange raises, and the one place where a native errno becomes one of them."""

from __future__ import annotations

import errno as errno_module
import os

__all__ = [
    "VRangeError",
    "BackendUnavailable",
    "RegenerationError",
    "VRangeOSError",
    "check",
    "os_error",
    "errno_name",
]


class VRangeError(Exception):
    """Base class of every exception vrange raises on purpose."""


class BackendUnavailable(VRangeError):
    """A backend that exists cannot run on this machine or in this process (the message says why)."""


class RegenerationError(VRangeError):
    """A regenerator failed; the original exception is the ``__cause__``."""


class VRangeOSError(VRangeError, OSError):
    """A system call made by the native core failed; ``errno`` and ``strerror`` are set."""


def errno_name(code: int) -> str:
    """``EPERM`` for 1, and so on; ``errno <n>`` for numbers this Python does not name."""
    return errno_module.errorcode.get(code, f"errno {code}")


def os_error(code: int, action: str) -> VRangeOSError:
    """The exception for a native failure with errno ``code``; ``action`` completes the sentence
    "vrange could not ...", e.g. ``"open a userfaultfd"``."""
    return VRangeOSError(code, f"vrange could not {action}: {os.strerror(code)} "
                               f"({errno_name(code)})")


def check(result: int, action: str) -> int:
    """Return a native call's non-negative result, or raise for its negative errno (the one path
    from a native errno to an exception; see :func:`os_error`)."""
    if result >= 0:
        return result
    raise os_error(-result, action)
