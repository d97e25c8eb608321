"""The userfaultfd backend: Python side of the process-wide fault handler and of each region."""

from __future__ import annotations

import logging
import os
import signal
import threading

from .._feature_report import BackendSupport, Features, TrapSupport
from .._native import ffi, lib
from ..errors import check
from ._base import BackendRegion, Plan, ProbedFacts, SourceSpec
from ._regeneration import Regeneration

logger = logging.getLogger("vrange")

# The real-time signal that carries Python-regenerator faults to the faulting thread.
FAULT_SIGNAL = signal.SIGRTMIN + 6


class _Handler:
    """The process's fault handler: one userfaultfd, one C thread, a pool of GIL-taking workers.
    It lives as long as the process (a forked child makes its own)."""

    def __init__(self) -> None:
        out = ffi.new("vr_uffd_handler **")
        check(lib.vr_uffd_handler_new(FAULT_SIGNAL, out), "open a userfaultfd for the fault handler")
        self.pointer = out[0]
        result = lib.vr_uffd_handler_start(self.pointer)
        if result < 0:
            lib.vr_uffd_handler_free(self.pointer)
            check(result, f"install the fault signal (SIGRTMIN+6) and start the handler thread "
                          f"(is signal {FAULT_SIGNAL} used by other code in this process?)")
        self.pid = os.getpid()

    def ensure_signal(self) -> None:
        """Take the fault signal back if other code replaced vrange's handler since."""
        if lib.vr_uffd_handler_signal_is_ours(self.pointer) == 1:
            return
        logger.warning("the handler of signal %d (SIGRTMIN+6) was replaced; "
                       "re-installing vrange's", FAULT_SIGNAL)
        check(lib.vr_uffd_fault_signal_install(FAULT_SIGNAL, 1), "re-install the fault signal handler")


_handler: _Handler | None = None
_handler_lock = threading.Lock()
# Why a forked child could not open its own handler (its regions are fenced).
_child_handler_error: str | None = None
# Closed regions whose C struct may still be used by a job in flight (which calls back into Python
# through the handle); released once the C side says nobody else holds them.
_retired: list[UffdRegion] = []
# The sweep's cffi calls let the GIL go: without this, two threads creating regions at once could
# both release the same retired region (a double free).
_retired_lock = threading.Lock()


def _get_handler() -> _Handler:
    global _handler
    with _handler_lock:
        if _handler is None:
            _handler = _Handler()
        _handler.ensure_signal()
        return _handler


def _sweep_retired() -> None:
    with _retired_lock:
        keep = []
        for region in _retired:
            if lib.vr_region_references(region.pointer) == 1:
                lib.vr_region_release(region.pointer)
                region.pointer = ffi.NULL
            else:
                keep.append(region)
        _retired[:] = keep


class UffdRegion(BackendRegion):
    """A region served by the process's userfaultfd handler thread: a fault inside a system call
    blocks until the chunk is refilled, and the kernel reclaims volatile pages (MADV_FREE)."""

    name = "uffd"

    @classmethod
    def assess(cls, facts: ProbedFacts) -> tuple[BackendSupport, tuple[TrapSupport, ...]]:
        uffd = facts.userfaultfd
        missing = []
        if not uffd.full:
            missing.append(uffd.reason)
        if uffd.full and "THREAD_ID" not in uffd.api_features:
            missing.append("the kernel lacks UFFD_FEATURE_THREAD_ID")
        if "FREE" not in facts.madvise_accepted:
            missing.append("madvise rejects MADV_FREE")
        if missing:
            return BackendSupport(cls.name, False, "; ".join(missing), kernel_reclaims=True), ()
        # Without MADV_POPULATE_WRITE (Linux < 5.14) pinning touches every page instead
        # (features().fallbacks says so).
        pinning = ("MADV_POPULATE_WRITE pins" if "POPULATE_WRITE" in facts.madvise_accepted
                   else "pinning touches each page (no MADV_POPULATE_WRITE)")
        return BackendSupport(cls.name, True, "userfaultfd serves faults inside syscalls; "
                              f"MADV_FREE is accepted; {pinning}", kernel_reclaims=True), ()

    @classmethod
    def why_chosen(cls, support: BackendSupport) -> str:
        return ("userfaultfd serves faults inside syscalls here, so a syscall that touches a purged "
                "page blocks and succeeds")

    @classmethod
    def default_error_policy(cls, report: Features) -> str:
        # Without UFFDIO_POISON a failed chunk cannot be made to fail the access that waits on it.
        return "poison" if "POISON" in report.userfaultfd.range_ioctls else "abort"

    @classmethod
    def error_policy_problem(cls, policy: str, report: Features) -> str | None:
        if policy == "poison" and "POISON" not in report.userfaultfd.range_ioctls:
            return ("on_error='poison' needs UFFDIO_POISON (Linux 6.6+) on the uffd backend, and "
                    "this kernel lacks it: use 'abort' (the default here) or 'zeros', or the "
                    "sigbus backend (its poison needs no UFFDIO_POISON)")
        return None

    @classmethod
    def reset_after_fork(cls, regions: list[BackendRegion]) -> None:
        """A forked child has no handler thread and its mappings are not registered: it opens a
        handler of its own (once), with which each live region registers again."""
        global _handler, _handler_lock, _retired_lock, _child_handler_error
        _handler_lock = threading.Lock()
        _retired_lock = threading.Lock()
        _retired.clear()
        if _handler is not None:  # the parent's: its thread is not in this child
            lib.vr_uffd_handler_forget_in_child(_handler.pointer)
        had_handler, _handler = _handler is not None, None
        _child_handler_error = None
        if had_handler and any(region.pointer != ffi.NULL for region in regions):
            try:
                _get_handler()
            except OSError as error:
                _child_handler_error = str(error)

    def __init__(self, owner: object, base: int, size: int, plan: Plan, source: SourceSpec,
                 on_error: str, variant: str | None, regeneration: Regeneration) -> None:
        super().__init__(owner, base, size, plan, source, on_error, variant, regeneration)
        handler = _get_handler()
        self.new_native_region(handler.pointer)
        result = lib.vr_uffd_register(self.pointer)
        if result < 0:
            lib.vr_region_release(self.pointer)
            self.pointer = ffi.NULL
            check(result, "register the region with userfaultfd")
        self.opened()
        _sweep_retired()

    def after_fork_in_child(self) -> None:
        """Register the child's copy with the child's handler, so that missing pages are
        regenerated, never read as zeros; without a handler the region is fenced."""
        super().after_fork_in_child()
        if self.pointer == ffi.NULL:
            return
        if _handler is None:
            self.fence_in_child("this forked child cannot open a userfaultfd of its own "
                                f"({_child_handler_error})")
            return
        result = lib.vr_uffd_rebind_after_fork(self.pointer, _handler.pointer)
        if result < 0:
            self.fence_in_child("this forked child could not register it with its userfaultfd "
                                f"({os.strerror(-result)})")
    def mark_volatile(self, first_chunk: int, end_chunk: int) -> None:
        check(lib.vr_region_mark_volatile(self.pointer, first_chunk, end_chunk),
              "mark the range volatile (MADV_FREE)")

    def discard(self, first_chunk: int, end_chunk: int, only_failed: bool) -> None:
        check(lib.vr_region_discard(self.pointer, first_chunk, end_chunk, int(only_failed)),
              "drop failed pages (MADV_DONTNEED)")

    def populate(self, first_chunk: int, end_chunk: int) -> int:
        return int(lib.vr_uffd_populate(self.pointer, first_chunk, end_chunk))

    def prefault(self, first_chunk: int, end_chunk: int) -> int:
        return int(lib.vr_uffd_prefault(self.pointer, first_chunk, end_chunk))

    def resume(self) -> None:
        lib.vr_uffd_resume(self.pointer)

    def close_native(self) -> None:
        if self.unusable:  # its handler is the parent's (whose lock a fork may have caught held)
            self.pointer = ffi.NULL  # the native state stays allocated: it is this child's leak
            return
        lib.vr_uffd_close(self.pointer)
        with _retired_lock:
            _retired.append(self)
        _sweep_retired()
