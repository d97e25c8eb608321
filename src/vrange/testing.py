"""Helpers for testing code that uses vrange: simulate restricted environments.

Everything here changes the calling process for good (a seccomp filter cannot be removed): call these
in a forked child or a subprocess, never in a process you want to keep.
"""

from __future__ import annotations

import errno as errno_module

from ._native import lib
from .errors import check

__all__ = ["deny_userfaultfd"]


def deny_userfaultfd(error_number: int = errno_module.EPERM, *, include_dev: bool = True) -> None:
    """Make userfaultfd fail in this process the way a container's default seccomp profile does.

    Installs a seccomp filter (on every thread, with no_new_privs set) under which the
    ``userfaultfd(2)`` system call fails with ``error_number`` (EPERM like Docker's default profile,
    or ENOSYS like others). With ``include_dev`` the ``USERFAULTFD_IOC_NEW`` ioctl on
    /dev/userfaultfd fails the same way, so no userfaultfd can be had at all.
    Call :func:`vrange.features` with ``refresh=True`` afterwards to see the effect.
    """
    if not isinstance(error_number, int) or not 0 < error_number <= 0xFFFF:
        raise ValueError(f"error_number must be a positive errno value, not {error_number!r}")
    check(lib.vr_seccomp_deny_userfaultfd(error_number, int(include_dev)),
          "install a seccomp filter denying userfaultfd")
