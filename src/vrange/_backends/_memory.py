"""Memory helpers over the native core for the public modules: the address of a buffer, timing
page touches from C and the minimal userfaultfd handler (``vrange.bench``), and the seccomp
filters of ``vrange.testing``."""

from __future__ import annotations

from typing import Any

from .._native import ffi, lib
from ..errors import check
from ._probes import invalidate


def buffer_address(buffer: Any) -> int:
    """The start address of an object that exports a buffer (a memoryview, an mmap, a Region)."""
    pointer = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


def touch_pages(address: int, length: int, stride: int, write: bool) -> int:
    """Touch one byte every ``stride`` bytes of the range from C, with the GIL released;
    nanoseconds taken."""
    elapsed = ffi.new("uint64_t *")
    check(lib.vr_touch_pages(address, length, stride, int(write), elapsed), "touch pages")
    return int(elapsed[0])


def deny_userfaultfd(error_number: int, include_dev: bool) -> None:
    """Install the seccomp filter of :func:`vrange.testing.deny_userfaultfd`, and forget the
    feature report (what this process may use has changed)."""
    check(lib.vr_seccomp_deny_userfaultfd(error_number, int(include_dev)),
          "install a seccomp filter denying userfaultfd")
    invalidate()


KERNEL_PROFILE_CODES = {
    "no-populate-write": lib.VR_KERNEL_NO_POPULATE_WRITE,
    "no-pageout": lib.VR_KERNEL_NO_PAGEOUT,
    "no-poison": lib.VR_KERNEL_NO_POISON,
    "no-uffd-thread-id-sigbus": lib.VR_KERNEL_NO_UFFD_THREAD_ID_SIGBUS,
}
"""The older-kernel profiles the native core can simulate (``vrange.testing.KERNEL_PROFILES``)."""


def simulate_kernel(name: str) -> None:
    """Install the seccomp filter (and the userfaultfd answers) of an older-kernel profile, and
    forget the feature report."""
    check(lib.vr_seccomp_simulate_kernel(KERNEL_PROFILE_CODES[name]),
          f"install the seccomp filter of the kernel profile {name!r}")
    invalidate()


def touch_pages_in_order(address: int, pages: list[int], page_size: int) -> int:
    """Write one byte of each page ``pages[i]`` (indexes from ``address``), in that order, from C
    with the GIL released; nanoseconds taken."""
    order = ffi.new("uint32_t[]", pages)
    elapsed = ffi.new("uint64_t *")
    check(lib.vr_touch_pages_in_order(address, order, len(pages), page_size, elapsed),
          "touch pages in order")
    return int(elapsed[0])


def touch_pages_each(address: int, length: int, stride: int, count: int) -> list[int]:
    """Write one byte every ``stride`` bytes from C, timing each access on its own (at most
    ``count`` of them); the nanoseconds of each."""
    each = ffi.new("uint64_t[]", count)
    done = lib.vr_touch_pages_each(address, length, stride, each, count)
    check(done, "touch pages one by one")
    return [int(each[index]) for index in range(done)]


def uffd_floor(length: int, chunk_size: int) -> int:
    """Nanoseconds to touch every page of a fresh ``length``-byte range served by a minimal C
    userfaultfd handler (one UFFDIO_COPY of ``chunk_size`` zero bytes per fault): the cost of
    userfaultfd with no library around it."""
    elapsed = ffi.new("uint64_t *")
    check(lib.vr_bench_uffd_floor(length, chunk_size, elapsed), "run the minimal userfaultfd handler")
    return int(elapsed[0])
