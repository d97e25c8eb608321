"""Helpers for testing code that uses vrange: inject purges, simulate restricted environments.

:func:`page_out`, :func:`inject_purge` and :func:`live_regions` can be called anywhere in a test.
:func:`deny_userfaultfd` changes the calling process for good (a seccomp filter cannot be removed):
call it in a forked child or a subprocess, never in a process you want to keep. The pytest plugin
(:mod:`vrange.pytest_plugin`, ``--vrange-purge``) is built on these.
"""

from __future__ import annotations

import errno as errno_module
import mmap

from ._backends._memory import KERNEL_PROFILE_CODES as _KERNEL_PROFILE_CODES
from ._backends import any_regenerating_on_this_thread as _any_regenerating_on_this_thread
from ._backends import live_regions as _live_backend_regions
from ._backends._memory import deny_userfaultfd as _install_userfaultfd_filter
from ._backends._memory import simulate_kernel as _install_kernel_profile
from .errors import VRangeError, VRangeOSError
from .region import Region

__all__ = ["KERNEL_PROFILES", "deny_userfaultfd", "inject_purge", "live_regions", "page_out",
           "simulate_kernel"]

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

_PAGE = mmap.PAGESIZE


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
    The kernel skips pages it cannot isolate at that moment (a page just made lazy-free may still sit
    in another CPU's batch): while pages of volatile chunks stay resident, the call is repeated from
    each CPU the thread may run on in turn. A volatile page written since it was marked is dirty and
    stays.
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


def live_regions() -> list[Region]:
    """Every open :class:`vrange.Region` of this process (made by any code), by address."""
    regions = []
    for core in _live_backend_regions():
        region = core.owner()
        # A region another thread is still constructing has registered its core before its
        # constructor stored it: it is not open yet.
        if isinstance(region, Region) and not region._closed and \
                getattr(region, "_core", None) is core:
            regions.append(region)
    return sorted(regions, key=lambda region: region._address)


def inject_purge(region: Region | None = None, *, page_out: bool = False) -> int:
    """Discard the volatile chunks of ``region`` (of every open region by default) now, as the
    kernel or vrange's pressure monitor may at any moment; returns the bytes discarded.

    Unlike :meth:`Region.purge` it may be called from anywhere (a profiler hook, a signal handler,
    another thread) and never waits nor raises because of what a region is doing: it does nothing
    when this thread is inside a regenerator (it is serving a fault, possibly in the middle of an
    operation on another region), and it skips a region whose state lock is taken (one of its
    methods runs on this or another thread, or it is closing) or that this thread is regenerating.
    Pinned (non-volatile) chunks are never discarded, nor chunks a system call holds
    (``vrange.io``): volatility is the program's promise that the bytes can be rebuilt.

    With ``page_out=True`` the regions the kernel reclaims (``region.kernel_reclaims``) have their
    volatile chunks paged out (MADV_PAGEOUT, see :func:`page_out`) instead of purged, so their next
    access takes the kernel-reclaim path; the kernel may keep a few pages, so a chunk may come back
    part kept, part regenerated. The bytes returned for those are the resident volatile bytes
    handed to the kernel. Other regions are purged.
    """
    if _any_regenerating_on_this_thread():
        return 0
    regions = live_regions() if region is None else [region]
    return sum(_inject_into(each, page_out) for each in regions)


def _inject_into(region: Region, page_out: bool) -> int:
    lock = region._state_lock
    if not lock.acquire(blocking=False):
        return 0  # held by a method of the region (maybe on this very thread) or by close()
    try:
        core = region._core
        if region._closed or core.unusable or core.regenerating_on_this_thread():
            return 0
        if not (page_out and core.kernel_reclaims):
            return core.purge(0, core.chunk_count)
        runs = core.volatile_runs()
        if not runs:
            return 0
        residency = core.residency()  # one byte per page, bit 0: resident
        chunk, size, paged_out = core.chunk_size, core.size, 0
        for first, end in runs:
            start, stop = first * chunk, min(end * chunk, size)
            resident = sum(byte & 1 for byte in residency[start // _PAGE:stop // _PAGE])
            if resident:
                core.page_out(start, stop - start)
                paged_out += resident * _PAGE
        return paged_out
    finally:
        lock.release()
