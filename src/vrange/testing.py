"""Helpers for testing code that uses vrange: simulate restricted environments.

Everything here changes the calling process for good (a seccomp filter cannot be removed): call these
in a forked child or a subprocess, never in a process you want to keep.
"""

from __future__ import annotations

import errno as errno_module

from ._backends._memory import KERNEL_PROFILE_CODES as _KERNEL_PROFILE_CODES
from ._backends._memory import deny_userfaultfd as _install_userfaultfd_filter
from ._backends._memory import simulate_kernel as _install_kernel_profile
from .errors import VRangeError, VRangeOSError
from .region import Region

__all__ = ["KERNEL_PROFILES", "deny_userfaultfd", "page_out", "simulate_kernel"]

KERNEL_PROFILES: dict[str, str] = {
    "no-populate-write": "MADV_POPULATE_WRITE/READ fail with EINVAL, as before Linux 5.14",
    "no-pageout": "MADV_PAGEOUT/MADV_COLD fail with EINVAL, as before Linux 5.4",
    "no-poison": "the UFFDIO_POISON ioctl fails with EINVAL and UFFDIO_API does not advertise it, "
                 "as before Linux 6.6",
    "no-uffd-thread-id-sigbus": "UFFDIO_API refuses or does not grant UFFD_FEATURE_THREAD_ID and "
                                "UFFD_FEATURE_SIGBUS, as on very old kernels (before 4.14)",
}
"""The older kernels :func:`simulate_kernel` can make this process see: name → what it simulates."""
assert set(KERNEL_PROFILES) == set(_KERNEL_PROFILE_CODES)


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


def simulate_kernel(name: str) -> None:
    """Make this process see an older kernel that lacks one feature (see :data:`KERNEL_PROFILES`).

    Installs a seccomp filter (every thread, no_new_privs set; irreversible: call it in a forked
    child) under which the advice or ioctl that kernel lacks fails with EINVAL, as it does there,
    and then forgets the feature report, so the next :func:`vrange.features` probes again. vrange
    adapts (``features().fallbacks`` names what it does instead).

    - ``no-populate-write``: ``madvise`` with ``MADV_POPULATE_READ``/``MADV_POPULATE_WRITE``.
    - ``no-pageout``: ``madvise`` and ``process_madvise`` with ``MADV_COLD``/``MADV_PAGEOUT``.
    - ``no-poison``: the ``UFFDIO_POISON`` ioctl; and vrange's ``UFFDIO_API`` and
      ``UFFDIO_REGISTER`` answers no longer list it.
    - ``no-uffd-thread-id-sigbus``: vrange's ``UFFDIO_API`` handshake fails with EINVAL when it
      requests ``UFFD_FEATURE_THREAD_ID`` or ``UFFD_FEATURE_SIGBUS`` (as a kernel that does not know
      the bits) and never lists them; ``userfaultfd(2)`` with ``UFFD_USER_MODE_ONLY`` fails with
      EINVAL (such a kernel predates the flag too).

    A seccomp filter sees only system-call arguments: it cannot read the features a ``UFFDIO_API``
    call requests nor rewrite what the kernel answers. So the two ioctl answers are edited in the
    one native function through which vrange makes each call; code outside vrange issuing those
    ioctls itself still sees the real kernel's answer (the filter still refuses ``UFFDIO_POISON``).
    Nothing else of the real kernel changes (its other features and bugs stay).
    """
    if name not in KERNEL_PROFILES:
        raise ValueError(f"unknown kernel profile {name!r}; known: {', '.join(KERNEL_PROFILES)}")
    _install_kernel_profile(name)  # and forgets the feature report


def page_out(region: Region, offset: int = 0, length: int | None = None) -> None:
    """Make the kernel reclaim the range now (MADV_PAGEOUT), as memory pressure would.

    Volatile pages (lazy-free after ``mark_volatile``) are discarded, so their next access is
    served by the regenerator; non-volatile pages are kept (there is no swap to write them to, or
    they are swapped and come back unchanged). Use it to inject kernel purges into your own tests.
    The kernel may leave a few pages in place (it skips pages it cannot isolate at that moment).
    Works on every region the kernel reclaims (``region.kernel_reclaims``): the uffd backend and the
    sigbus backend's uffd trap. Needs ``MADV_PAGEOUT`` (Linux 5.4+): without it, raises
    :class:`vrange.VRangeError` naming it (``features().madvise_accepted("PAGEOUT")`` tells in
    advance); ``region.purge()`` discards volatile chunks on every kernel.
    """
    offset, length = region._range(offset, length)
    if not region.kernel_reclaims:
        raise ValueError(f"page_out needs a region the kernel reclaims (the uffd backend or the "
                         f"sigbus backend's uffd trap), not one on the {region.backend} backend's "
                         f"{region.trap} trap; use region.purge()")
    try:
        region._core.page_out(offset, length)
    except VRangeOSError as error:
        if error.errno != errno_module.EINVAL:
            raise
        raise VRangeError(
            "page_out needs MADV_PAGEOUT (Linux 5.4+), which this kernel rejects (EINVAL): it cannot "
            "make the kernel reclaim on demand here; use region.purge() to discard volatile "
            "chunks (the kernel still reclaims them by itself under memory pressure)") from error
