"""The kernel-feature report: what this kernel and this process may use, and why not when not.

The types of the report :func:`vrange.features` returns, and the tables that decode its bit masks.
The probes that fill it are in ``vrange._backends._probes`` (they call the native core); each
backend states its own requirements (``BackendRegion.assess``), evaluated there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from ._mappings import MappingUse, mapping_budget
from .errors import errno_name

__all__ = [
    "AdviceSupport",
    "BackendSupport",
    "CgroupReport",
    "Fallback",
    "Features",
    "OpenAttempt",
    "PressurePlan",
    "ProbeOutcome",
    "PsiReport",
    "TrapSupport",
    "UserfaultfdReport",
]

UserfaultfdAccess = Literal["syscall", "dev", "user_mode_only", "none"]

# Bit i of the UFFDIO_API features word (include/uapi/linux/userfaultfd.h).
UFFD_FEATURE_NAMES = (
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
)

# Bit numbers of the ioctls word (_UFFDIO_* in the same header).
UFFD_IOCTL_NAMES = {
    0x00: "REGISTER",
    0x01: "UNREGISTER",
    0x02: "WAKE",
    0x03: "COPY",
    0x04: "ZEROPAGE",
    0x05: "MOVE",
    0x06: "WRITEPROTECT",
    0x07: "CONTINUE",
    0x08: "POISON",
    0x3F: "API",
}

# The madvise advice vrange uses or may use, probed on a scratch mapping.
PROBED_ADVICE = ("FREE", "COLD", "PAGEOUT", "POPULATE_READ", "POPULATE_WRITE", "GUARD_INSTALL")



def decode_bits(mask: int, names: dict[int, str] | tuple[str, ...]) -> tuple[str, ...]:
    """Names of the set bits of ``mask``; a bit without a name appears as ``bit<N>``."""
    table = dict(enumerate(names)) if isinstance(names, tuple) else names
    return tuple(table.get(bit, f"bit{bit}") for bit in range(mask.bit_length()) if mask >> bit & 1)


def describe_errno(code: int) -> str:
    return f"{errno_name(code)} ({os.strerror(code)})"


# --- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeOutcome:
    """Whether one operation worked, and the errno when it did not."""

    ok: bool
    errno: int | None = None
    error: str | None = None

    @classmethod
    def from_result(cls, result: int) -> ProbeOutcome:
        if result >= 0:
            return cls(ok=True)
        return cls(ok=False, errno=-result, error=describe_errno(-result))


@dataclass(frozen=True)
class OpenAttempt:
    """One way of obtaining a userfaultfd, and what the kernel answered."""

    method: Literal["syscall", "dev", "syscall_user_mode_only"]
    outcome: ProbeOutcome


@dataclass(frozen=True)
class UserfaultfdReport:
    """What this process may do with userfaultfd, and why."""

    access: UserfaultfdAccess
    """``syscall`` or ``dev``: a full userfaultfd (serves faults inside syscalls) through the
    userfaultfd(2) call or /dev/userfaultfd; ``user_mode_only``: only UFFD_USER_MODE_ONLY, whose
    faults inside syscalls fail with EFAULT; ``none``: no userfaultfd at all."""
    serves_syscalls: bool | None
    """Verified by behaviour: a read(2) into a registered missing page blocked and was served
    (True) or failed with EFAULT (False); None when no descriptor could be probed."""
    reason: str
    attempts: tuple[OpenAttempt, ...]
    api_features: tuple[str, ...]
    api_features_mask: int
    api_ioctls: tuple[str, ...]
    range_ioctls: tuple[str, ...]
    unprivileged_userfaultfd_sysctl: int | None
    cap_sys_ptrace: bool | None
    seccomp_mode: str
    dev_node: str

    @property
    def full(self) -> bool:
        """True when a userfaultfd that serves faults inside syscalls can be opened here."""
        return self.access in ("syscall", "dev") and self.serves_syscalls is True


@dataclass(frozen=True)
class AdviceSupport:
    """Whether madvise accepted one advice value on a scratch mapping."""

    name: str
    value: int
    outcome: ProbeOutcome


@dataclass(frozen=True)
class PsiReport:
    """Pressure-stall information for memory (/proc/pressure/memory)."""

    readable: ProbeOutcome
    triggers_writable: ProbeOutcome
    some_avg10: float | None
    full_avg10: float | None


@dataclass(frozen=True)
class CgroupReport:
    """The memory cgroup this process is in, and the tightest limit on the way to the root."""

    version: Literal["v1", "v2", "none"]
    path: str | None
    memory_limit_bytes: int | None
    """None when no ancestor sets a limit."""
    limit_set_at: str | None
    memory_usage_bytes: int | None
    directory: str | None = None
    """This process's own cgroup directory in the mounted hierarchy."""


@dataclass(frozen=True)
class PressurePlan:
    """What vrange's pressure monitor watches here (see :mod:`vrange.policy`), and why.

    The monitor purges volatile chunks of the regions it manages when ``usage_file`` says usage is
    above ``high_water_bytes``, until it is back under ``low_water_bytes``. It wakes on the kernel's
    signal (``psi_file`` trigger, cgroup v1 usage threshold, cgroup v2 ``memory.events``), on
    vrange's own refills, and every ``interval_ms`` to watch the headroom proactively."""

    signal: Literal["cgroup-v2", "cgroup-v1", "psi", "meminfo"]
    reason: str
    limit_bytes: int
    usage_file: str
    usage_kind: Literal["cgroup", "meminfo"]
    high_water_bytes: int
    low_water_bytes: int
    interval_ms: int
    psi_file: str | None = None
    events_file: str | None = None
    threshold_control: str | None = None


@dataclass(frozen=True)
class TrapSupport:
    """Whether the sigbus backend can use one trap here (how an access to a missing page becomes a
    SIGBUS), and whether the kernel can reclaim the volatile pages of a region behind it."""

    name: Literal["uffd", "memfd"]
    usable: bool
    kernel_reclaims: bool
    reason: str


@dataclass(frozen=True)
class BackendSupport:
    """Whether one backend can run here; ``reason`` says why or why not."""

    name: str
    usable: bool
    reason: str
    trap: str | None = None
    """sigbus: the trap its regions use by default here (``"uffd"`` or ``"memfd"``); uffd: None."""
    kernel_reclaims: bool = False
    """True when the kernel itself takes volatile pages back under memory pressure (MADV_FREE);
    False when only vrange purges them (the memfd trap)."""


@dataclass(frozen=True)
class Fallback:
    """A kernel feature vrange would use and this kernel (or process) lacks, and what vrange does
    instead."""

    name: str
    """The missing feature, e.g. ``"MADV_POPULATE_WRITE"``, ``"UFFDIO_POISON"``."""
    missing: str
    """How it was found missing (the probe's answer)."""
    fallback: str
    """What vrange does instead, or what stops working."""


@dataclass(frozen=True)
class Features:
    """What this kernel and this process may use. Made by :func:`features`."""

    kernel_release: str
    machine: str
    page_size: int
    thp_mode: str | None
    max_map_count: int | None
    userfaultfd: UserfaultfdReport
    madvise: tuple[AdviceSupport, ...]
    memfd: ProbeOutcome
    psi: PsiReport
    cgroup: CgroupReport
    pressure: PressurePlan
    sigbus_traps: tuple[TrapSupport, ...]
    backends: tuple[BackendSupport, ...]
    auto_backend: str | None
    auto_reason: str
    probe_errors: tuple[str, ...]
    probe_seconds: float
    fallbacks: tuple[Fallback, ...] = ()
    """Features vrange would use that are missing here, each with what vrange does instead."""

    def mappings(self) -> MappingUse:
        """The process's memory mappings and vrange's share of them, now (not cached): the
        sigbus backend's memfd-trap regions reserve their worst case from a process-wide budget
        of half of ``vm.max_map_count`` and are refused beyond it (see :class:`MappingUse`)."""
        return mapping_budget.use()

    def madvise_accepted(self, name: str) -> bool:
        """True if madvise accepted ``MADV_<name>`` (e.g. ``"FREE"``) on this kernel."""
        for advice in self.madvise:
            if advice.name == name:
                return advice.outcome.ok
        raise KeyError(f"MADV_{name} is not among the probed advice {PROBED_ADVICE}")

    def trap(self, name: str) -> TrapSupport:
        """The support entry of the sigbus trap ``name`` (``"uffd"`` or ``"memfd"``)."""
        for support in self.sigbus_traps:
            if support.name == name:
                return support
        raise KeyError(f"unknown trap {name!r}; known: {[t.name for t in self.sigbus_traps]}")

    def fallback(self, name: str) -> Fallback | None:
        """The fallback entry of the missing feature ``name`` (e.g. ``"MADV_POPULATE_WRITE"``),
        or None when the feature is there (or was never probed)."""
        for entry in self.fallbacks:
            if entry.name == name:
                return entry
        return None

    def backend(self, name: str) -> BackendSupport:
        """The support entry of backend ``name`` (``"uffd"`` or ``"sigbus"``)."""
        for support in self.backends:
            if support.name == name:
                return support
        raise KeyError(f"unknown backend {name!r}; known: {[b.name for b in self.backends]}")

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-compatible data (tuples of named entries become dicts), with
        the mapping use of this instant under ``"mappings"``."""
        plain: dict[str, Any] = _plain(self)
        plain["mappings"] = _plain(self.mappings())
        return plain


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, tuple):
        if value and all(isinstance(item, (AdviceSupport, BackendSupport, TrapSupport, Fallback))
                         for item in value):
            return {item.name: _plain(item) for item in value}
        return [_plain(item) for item in value]
    return value
