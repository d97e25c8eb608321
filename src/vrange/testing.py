"""Helpers for testing code that uses vrange: simulate restricted environments.

Everything here changes the calling process for good (a seccomp filter cannot be removed): call these
in a forked child or a subprocess, never in a process you want to keep.
"""

from __future__ import annotations

import errno as errno_module

from ._backends._memory import deny_userfaultfd as _install_userfaultfd_filter
from .region import Region

__all__ = ["deny_userfaultfd", "page_out"]


def deny_userfaultfd(error_number: int = errno_module.EPERM, *, include_dev: bool = True) -> None:
    """Make userfaultfd fail in this process the way a container's default seccomp profile does.

    Installs a seccomp filter (on every thread, with no_new_privs set) under which the
    ``userfaultfd(2)`` system call fails with ``error_number`` (EPERM like Docker's default profile,
    or ENOSYS like others). With ``include_dev`` the ``USERFAULTFD_IOC_NEW`` ioctl on
    /dev/userfaultfd fails the same way, so no userfaultfd can be had at all.
    The next :func:`vrange.features` call probes again and shows the effect.
    """
    if not isinstance(error_number, int) or not 0 < error_number <= 0xFFFF:
        raise ValueError(f"error_number must be a positive errno value, not {error_number!r}")
    _install_userfaultfd_filter(error_number, include_dev)  # and forgets the feature report


def page_out(region: Region, offset: int = 0, length: int | None = None) -> None:
    """Make the kernel reclaim the range now (MADV_PAGEOUT), as memory pressure would.

    Volatile pages (lazy-free after ``mark_volatile``) are discarded, so their next access is
    served by the regenerator; non-volatile pages are kept (there is no swap to write them to, or
    they are swapped and come back unchanged). Use it to inject kernel purges into your own tests.
    The kernel may leave a few pages in place (it skips pages it cannot isolate at that moment).
    Works on every region the kernel reclaims (``region.kernel_reclaims``): the uffd backend and the
    sigbus backend's uffd trap.
    """
    offset, length = region._range(offset, length)
    if not region.kernel_reclaims:
        raise ValueError(f"page_out needs a region the kernel reclaims (the uffd backend or the "
                         f"sigbus backend's uffd trap), not one on the {region.backend} backend's "
                         f"{region.trap} trap; use region.purge()")
    region._core.page_out(offset, length)
