"""Kernel-feature detection: what this kernel and this process may use, and why not when not.

Everything is found by doing (opening a userfaultfd, madvising a scratch mapping, writing a PSI
trigger), not by comparing version numbers. :func:`features` computes the report once and caches it;
it never raises: a probe that fails unexpectedly is recorded in ``Features.probe_errors``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ._native import ffi, lib
from ._mappings import MappingUse, mapping_budget
from .errors import errno_name

__all__ = [
    "AdviceSupport",
    "BackendSupport",
    "CgroupReport",
    "Features",
    "OpenAttempt",
    "PressurePlan",
    "ProbeOutcome",
    "PsiReport",
    "TrapSupport",
    "UserfaultfdReport",
    "features",
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

CAP_SYS_PTRACE = 19
SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}
KERNEL_FAULT_PROBE_TIMEOUTS_MS = (1000, 3000, 6000)
# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit number.
CGROUP_V1_UNLIMITED = 1 << 62


def decode_bits(mask: int, names: dict[int, str] | tuple[str, ...]) -> tuple[str, ...]:
    """Names of the set bits of ``mask``; a bit without a name appears as ``bit<N>``."""
    table = dict(enumerate(names)) if isinstance(names, tuple) else names
    return tuple(table.get(bit, f"bit{bit}") for bit in range(mask.bit_length()) if mask >> bit & 1)


def describe_errno(code: int) -> str:
    return f"{errno_name(code)} ({os.strerror(code)})"


# --- report types -----------------------------------------------------------------------------


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
        if value and all(isinstance(item, (AdviceSupport, BackendSupport, TrapSupport))
                         for item in value):
            return {item.name: _plain(item) for item in value}
        return [_plain(item) for item in value]
    return value


# --- probes ---------------------------------------------------------------------------------------

T = TypeVar("T")


class _ProbeRun:
    """Runs report sections so that an unexpected failure is recorded, never raised."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def section(self, name: str, probe: Callable[[], T], fallback: T) -> T:
        try:
            return probe()
        except Exception as error:  # noqa: BLE001 - the report must never raise
            self.errors.append(f"{name}: {type(error).__name__}: {error}")
            return fallback


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _proc_status_fields() -> dict[str, str]:
    fields = {}
    for line in (_read_text("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _thp_mode() -> str | None:
    text = _read_text("/sys/kernel/mm/transparent_hugepage/enabled")
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _open_userfaultfd(method: str) -> tuple[int, int | None]:
    """(result, fd): result 0 with a descriptor, or -errno."""
    fd_out = ffi.new("int *", -1)
    flags = lib.O_CLOEXEC | lib.O_NONBLOCK
    if method == "syscall":
        result = lib.vr_uffd_open_syscall(flags, fd_out)
    elif method == "dev":
        result = lib.vr_uffd_open_dev(flags, fd_out)
    else:
        result = lib.vr_uffd_open_syscall(flags | lib.UFFD_USER_MODE_ONLY, fd_out)
    return result, (fd_out[0] if result == 0 else None)


def _dev_node_description() -> str:
    path = "/dev/userfaultfd"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"{path} absent (Linux < 6.1 or not created in this container)"
    except OSError as error:
        return f"{path} not inspectable: {describe_errno(error.errno or 0)}"
    mode = oct(info.st_mode & 0o777)
    access = "read/write allowed" if os.access(path, os.R_OK | os.W_OK) else "not accessible"
    return f"{path} mode {mode} uid {info.st_uid} gid {info.st_gid}, {access} for this process"


def _uffd_reason(
    access: UserfaultfdAccess,
    attempts: dict[str, ProbeOutcome],
    sysctl: int | None,
    cap_sys_ptrace: bool | None,
    seccomp_mode: str,
) -> str:
    syscall, dev, user_only = attempts["syscall"], attempts["dev"], attempts["syscall_user_mode_only"]
    if access == "syscall":
        return "userfaultfd(2) opens a full descriptor; faults inside syscalls are served (verified)"
    parts = []
    if syscall.errno == 1:  # EPERM
        if user_only.ok:
            parts.append(
                "userfaultfd(2) refuses a full descriptor (EPERM): vm.unprivileged_userfaultfd="
                f"{sysctl} and the process lacks CAP_SYS_PTRACE"
                + ("" if cap_sys_ptrace is False else " (capability state unknown)")
            )
        elif seccomp_mode == "filter":
            parts.append("userfaultfd(2) fails with EPERM under a seccomp filter (container default "
                         "profiles deny it)")
        else:
            parts.append("userfaultfd(2) fails with EPERM")
    elif syscall.errno == 38:  # ENOSYS
        cause = ("a seccomp filter denies it" if seccomp_mode == "filter"
                 else "the kernel lacks CONFIG_USERFAULTFD")
        parts.append(f"userfaultfd(2) fails with ENOSYS: {cause}")
    elif syscall.error:
        parts.append(f"userfaultfd(2) fails with {syscall.error}")
    if access == "dev":
        parts.append("/dev/userfaultfd opens a full descriptor; faults inside syscalls are served "
                     "(verified)")
        return "; ".join(parts)
    if dev.errno == 2:
        parts.append("/dev/userfaultfd does not exist")
    elif dev.error:
        parts.append(f"/dev/userfaultfd fails with {dev.error}")
    if access == "user_mode_only":
        parts.append("only UFFD_USER_MODE_ONLY is allowed, and a read(2) into a registered missing "
                     "page failed with EFAULT: faults inside syscalls are not served")
    else:
        parts.append("no userfaultfd can be opened"
                     + (f" (UFFD_USER_MODE_ONLY: {user_only.error})" if user_only.error else ""))
    return "; ".join(parts)


def _probe_userfaultfd(run: _ProbeRun) -> UserfaultfdReport:
    status = _proc_status_fields()
    cap_text = status.get("CapEff")
    cap_sys_ptrace = bool(int(cap_text, 16) >> CAP_SYS_PTRACE & 1) if cap_text else None
    seccomp_mode = SECCOMP_MODES.get(int(status.get("Seccomp", "-1")), "unknown")
    sysctl = _read_int("/proc/sys/vm/unprivileged_userfaultfd")

    outcomes: dict[str, ProbeOutcome] = {}
    descriptors: dict[str, int] = {}
    for method in ("syscall", "dev", "syscall_user_mode_only"):
        result, fd = _open_userfaultfd(method)
        outcomes[method] = ProbeOutcome.from_result(result)
        if fd is not None:
            descriptors[method] = fd
    try:
        probed = next((m for m in ("syscall", "dev", "syscall_user_mode_only") if m in descriptors), None)
        features_mask = ioctls_mask = range_ioctls_mask = 0
        serves: bool | None = None
        if probed is not None:
            fd = descriptors[probed]
            features_out = ffi.new("uint64_t *")
            ioctls_out = ffi.new("uint64_t *")
            api_result = lib.vr_uffd_api(fd, 0, features_out, ioctls_out)
            if api_result < 0:
                run.errors.append(f"userfaultfd: UFFDIO_API failed with {describe_errno(-api_result)}")
            else:
                features_mask, ioctls_mask = int(features_out[0]), int(ioctls_out[0])
                range_out = ffi.new("uint64_t *")
                serves_out = ffi.new("int *", -1)
                # A loaded machine may not schedule the probe's reader thread in time: only a
                # timeout is tried again, with more time.
                for timeout_ms in KERNEL_FAULT_PROBE_TIMEOUTS_MS:
                    fault_result = lib.vr_probe_uffd_kernel_fault(fd, timeout_ms, range_out,
                                                                  serves_out)
                    if fault_result != -errno.ETIMEDOUT:
                        break
                if fault_result < 0:
                    run.errors.append("userfaultfd: the syscall-fault probe failed with "
                                      f"{describe_errno(-fault_result)}")
                else:
                    serves = bool(serves_out[0])
                    range_ioctls_mask = int(range_out[0])
    finally:
        for fd in descriptors.values():
            lib.vr_close(fd)

    access: UserfaultfdAccess
    if serves is None:
        access = "none"  # nothing opened, or nothing verified: claim nothing
    elif not serves:
        access = "user_mode_only"
    else:
        access = "dev" if probed == "dev" else "syscall"
    reason = _uffd_reason(access, outcomes, sysctl, cap_sys_ptrace, seccomp_mode)
    if probed is not None and serves is None:
        reason += "; a descriptor opened but its behaviour could not be verified (see probe_errors)"
    return UserfaultfdReport(
        access=access,
        serves_syscalls=serves,
        reason=reason,
        attempts=tuple(OpenAttempt(method, outcome) for method, outcome in outcomes.items()),  # type: ignore[arg-type]
        api_features=decode_bits(features_mask, UFFD_FEATURE_NAMES),
        api_features_mask=features_mask,
        api_ioctls=decode_bits(ioctls_mask, UFFD_IOCTL_NAMES),
        range_ioctls=decode_bits(range_ioctls_mask, UFFD_IOCTL_NAMES),
        unprivileged_userfaultfd_sysctl=sysctl,
        cap_sys_ptrace=cap_sys_ptrace,
        seccomp_mode=seccomp_mode,
        dev_node=_dev_node_description(),
    )


def _probe_madvise() -> tuple[AdviceSupport, ...]:
    entries = []
    for name in PROBED_ADVICE:
        value = int(getattr(lib, f"MADV_{name}"))
        entries.append(AdviceSupport(name, value, ProbeOutcome.from_result(lib.vr_probe_madvise(value))))
    return tuple(entries)


def _probe_psi() -> PsiReport:
    path = "/proc/pressure/memory"
    some = full = None
    try:
        text = Path(path).read_text()
        readable = ProbeOutcome(ok=True)
        for line in text.splitlines():
            kind, *pairs = line.split()
            values = dict(pair.split("=", 1) for pair in pairs)
            if kind == "some":
                some = float(values["avg10"])
            elif kind == "full":
                full = float(values["avg10"])
    except OSError as error:
        readable = ProbeOutcome(ok=False, errno=error.errno, error=describe_errno(error.errno or 0))
    # A trigger lives as long as its descriptor. A 2 s window is allowed to unprivileged users too.
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, b"some 500000 2000000\0")
            writable = ProbeOutcome(ok=True)
        finally:
            os.close(fd)
    except OSError as error:
        writable = ProbeOutcome(ok=False, errno=error.errno, error=describe_errno(error.errno or 0))
    return PsiReport(readable=readable, triggers_writable=writable, some_avg10=some, full_avg10=full)


def _cgroup_mounts() -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """((root, mount point) of the v1 memory hierarchy, (root, mount point) of cgroup2)."""
    v1 = v2 = None
    for line in (_read_text("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        root, mount_point = fields[3], fields[4]
        fstype, super_options = fields[separator + 1], fields[separator + 3:]
        options = ",".join(super_options).split(",")
        if fstype == "cgroup" and "memory" in options and v1 is None:
            v1 = (root, mount_point)
        elif fstype == "cgroup2" and v2 is None:
            v2 = (root, mount_point)
    return v1, v2


def _cgroup_directory(mount: tuple[str, str], path: str) -> Path:
    root, mount_point = mount
    if root != "/" and path.startswith(root):
        path = path[len(root):]
    return Path(mount_point) / path.lstrip("/")


def _tightest_limit(directory: Path, mount_point: Path, limit_file: str) -> tuple[int | None, str | None]:
    best: tuple[int | None, str | None] = (None, None)
    current = directory
    while True:
        text = _read_text(str(current / limit_file))
        if text is not None and text.strip() not in ("", "max"):
            value = int(text.strip())
            if value < CGROUP_V1_UNLIMITED and (best[0] is None or value < best[0]):
                best = (value, str(current))
        if current == mount_point or current.parent == current:
            return best
        current = current.parent


def _probe_cgroup() -> CgroupReport:
    v1_path = v2_path = None
    for line in (_read_text("/proc/self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1_path = path
        elif controllers == "":
            v2_path = path
    v1_mount, v2_mount = _cgroup_mounts()
    if v1_path is not None and v1_mount is not None:
        directory = _cgroup_directory(v1_mount, v1_path)
        limit, where = _tightest_limit(directory, Path(v1_mount[1]), "memory.limit_in_bytes")
        usage = _read_int(str(directory / "memory.usage_in_bytes"))
        return CgroupReport("v1", v1_path, limit, where, usage, str(directory))
    if v2_path is not None and v2_mount is not None:
        available = (_read_text(str(Path(v2_mount[1]) / "cgroup.controllers")) or "").split()
        if "memory" in available:
            directory = _cgroup_directory(v2_mount, v2_path)
            limit, where = _tightest_limit(directory, Path(v2_mount[1]), "memory.max")
            usage = _read_int(str(directory / "memory.current"))
            return CgroupReport("v2", v2_path, limit, where, usage, str(directory))
    return CgroupReport("none", None, None, None, None)


def _probe_sigbus_traps(madvise: tuple[AdviceSupport, ...],
                        memfd: ProbeOutcome) -> tuple[TrapSupport, ...]:
    """The userfaultfd trap is verified by doing: open a SIGBUS-mode userfaultfd the way a region
    does, register a scratch page and fill it with UFFDIO_COPY."""
    fd_out = ffi.new("int *", -1)
    result = lib.vr_sigbus_uffd_trap_open(fd_out)
    if result == 0:
        try:
            result = lib.vr_sigbus_uffd_trap_probe(fd_out[0])
        finally:
            lib.vr_close(fd_out[0])
    free_accepted = any(advice.name == "FREE" and advice.outcome.ok for advice in madvise)
    if result < 0:
        uffd_trap = TrapSupport("uffd", False, False,
                                "no SIGBUS-mode userfaultfd can be used here: "
                                f"{describe_errno(-result)}")
    elif not free_accepted:
        uffd_trap = TrapSupport("uffd", False, False, "madvise rejects MADV_FREE")
    else:
        uffd_trap = TrapSupport(
            "uffd", True, True,
            "a SIGBUS-mode userfaultfd (UFFD_FEATURE_SIGBUS, user-mode-only where that is all this "
            "process may open) registers private anonymous memory: volatile pages are MADV_FREE'd "
            "and the kernel reclaims them by itself under pressure")
    memfd_trap = TrapSupport(
        "memfd", memfd.ok, False,
        "an empty memfd is mapped over purged chunks: the kernel cannot reclaim these pages, only "
        "vrange's purges give memory back" if memfd.ok
        else f"memfd_create fails with {memfd.error}")
    return (uffd_trap, memfd_trap)


def _assess_backends(
    uffd: UserfaultfdReport, madvise: tuple[AdviceSupport, ...], traps: tuple[TrapSupport, ...]
) -> tuple[BackendSupport, ...]:
    accepted = {advice.name for advice in madvise if advice.outcome.ok}
    uffd_missing = []
    if not uffd.full:
        uffd_missing.append(uffd.reason)
    if uffd.full and "THREAD_ID" not in uffd.api_features:
        uffd_missing.append("the kernel lacks UFFD_FEATURE_THREAD_ID")
    uffd_missing += [f"madvise rejects MADV_{name}" for name in ("FREE", "POPULATE_WRITE")
                     if name not in accepted]
    uffd_support = (BackendSupport("uffd", False, "; ".join(uffd_missing), kernel_reclaims=True)
                    if uffd_missing else
                    BackendSupport("uffd", True, "userfaultfd serves faults inside syscalls; "
                                   "MADV_FREE and MADV_POPULATE_WRITE are accepted",
                                   kernel_reclaims=True))
    trap = next((support for support in traps if support.usable), None)
    if trap is None:
        sigbus_support = BackendSupport("sigbus", False, "; ".join(
            f"{support.name} trap: {support.reason}" for support in traps))
    else:
        sigbus_support = BackendSupport("sigbus", True, f"{trap.name} trap: {trap.reason}",
                                        trap=trap.name, kernel_reclaims=trap.kernel_reclaims)
    return (uffd_support, sigbus_support)


def _choose_auto(backends: tuple[BackendSupport, ...]) -> tuple[str | None, str]:
    by_name = {support.name: support for support in backends}
    if by_name["uffd"].usable:
        return "uffd", ("uffd: userfaultfd serves faults inside syscalls here, so a syscall that "
                        "touches a purged page blocks and succeeds")
    sigbus = by_name["sigbus"]
    if sigbus.usable:
        reclaim = ("the kernel reclaims volatile pages by itself (MADV_FREE) and a SIGBUS handler "
                   "refills them" if sigbus.kernel_reclaims else
                   "the kernel cannot reclaim these pages: only purge() and vrange's own policy give "
                   "memory back")
        return "sigbus", (f"sigbus: uffd is unusable ({by_name['uffd'].reason}); the {sigbus.trap} "
                          f"trap is used: {reclaim}; syscalls on purged pages fail with EFAULT, "
                          "use vrange.io")
    return None, ("no backend can run: uffd: " + by_name["uffd"].reason
                  + "; sigbus: " + sigbus.reason)


def water_marks(limit: int, headroom_fraction: int = 8) -> tuple[int, int]:
    """(high, low): purge when usage passes ``limit - headroom``, down to ``limit - 2 * headroom``,
    where the headroom is an eighth of the limit (at least 4 MiB, at most 1 GiB)."""
    headroom = min(max(limit // headroom_fraction, 4 << 20), 1 << 30)
    return max(limit - headroom, 0), max(limit - 2 * headroom, 0)


def _meminfo_total() -> int | None:
    for line in (_read_text("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def _plan_pressure(cgroup: CgroupReport, psi: PsiReport) -> PressurePlan:
    """Prefer the signal closest to what kills the process: its cgroup's limit, else the machine's
    memory (PSI, then MemAvailable)."""
    if cgroup.memory_limit_bytes is not None and cgroup.limit_set_at is not None:
        limit, where = cgroup.memory_limit_bytes, cgroup.limit_set_at
        high, low = water_marks(limit)
        if cgroup.version == "v2":
            own = cgroup.directory or where
            return PressurePlan(
                "cgroup-v2", f"cgroup v2 limit memory.max={limit} at {where}: a PSI trigger on "
                f"{own}/memory.pressure and changes of memory.events wake the monitor; it also "
                "checks memory.current every 100 ms and after vrange's own refills", limit,
                f"{where}/memory.current", "cgroup", high, low, 100,
                psi_file=f"{own}/memory.pressure", events_file=f"{where}/memory.events")
        return PressurePlan(
            "cgroup-v1", f"cgroup v1 limit memory.limit_in_bytes={limit} at {where}: a usage "
            "threshold (cgroup.event_control + eventfd on memory.usage_in_bytes) at the high-water "
            "mark wakes the monitor; it also checks usage every 100 ms and after vrange's own "
            "refills", limit, f"{where}/memory.usage_in_bytes", "cgroup", high, low, 100,
            threshold_control=f"{where}/cgroup.event_control")
    total = _meminfo_total() or 0
    high, low = water_marks(total, headroom_fraction=20)
    if psi.triggers_writable.ok:
        return PressurePlan(
            "psi", "no memory cgroup limit: a PSI trigger on /proc/pressure/memory wakes the "
            "monitor, which keeps MemTotal - MemAvailable under the high-water mark (checked every "
            "second too)", total, "/proc/meminfo", "meminfo", high, low, 1000,
            psi_file="/proc/pressure/memory")
    why = psi.triggers_writable.error or "unavailable"
    return PressurePlan(
        "meminfo", f"no memory cgroup limit and no PSI trigger ({why}): the monitor polls "
        "MemAvailable in /proc/meminfo every second, the last resort", total, "/proc/meminfo",
        "meminfo", high, low, 1000)


_UNKNOWN_UFFD = UserfaultfdReport(
    access="none", serves_syscalls=None, reason="userfaultfd probe failed (see probe_errors)",
    attempts=(), api_features=(), api_features_mask=0, api_ioctls=(), range_ioctls=(),
    unprivileged_userfaultfd_sysctl=None, cap_sys_ptrace=None, seccomp_mode="unknown",
    dev_node="unknown",
)
_FAILED = ProbeOutcome(ok=False, error="probe failed (see probe_errors)")


def _compute() -> Features:
    started = time.perf_counter()
    run = _ProbeRun()
    uname = os.uname()
    uffd = run.section("userfaultfd", lambda: _probe_userfaultfd(run), _UNKNOWN_UFFD)
    no_advice: tuple[AdviceSupport, ...] = ()
    madvise = run.section("madvise", _probe_madvise, no_advice)
    memfd = run.section("memfd", lambda: ProbeOutcome.from_result(lib.vr_probe_memfd()), _FAILED)
    psi = run.section("psi", _probe_psi, PsiReport(_FAILED, _FAILED, None, None))
    cgroup = run.section("cgroup", _probe_cgroup, CgroupReport("none", None, None, None, None))
    pressure = run.section("pressure", lambda: _plan_pressure(cgroup, psi), PressurePlan(
        "meminfo", "planning failed (see probe_errors)", 0, "/proc/meminfo", "meminfo", 0, 0,
        1000))
    traps = run.section(
        "sigbus traps", lambda: _probe_sigbus_traps(madvise, memfd),
        tuple(TrapSupport(name, False, False, "probe failed (see probe_errors)")
              for name in ("uffd", "memfd")))
    backends = run.section(
        "backends",
        lambda: _assess_backends(uffd, madvise, traps),
        tuple(BackendSupport(name, False, "assessment failed") for name in ("uffd", "sigbus")),
    )
    auto_backend, auto_reason = _choose_auto(backends)
    return Features(
        kernel_release=uname.release,
        machine=uname.machine,
        page_size=int(lib.vr_page_size()),
        thp_mode=run.section("thp", _thp_mode, None),
        max_map_count=_read_int("/proc/sys/vm/max_map_count"),
        userfaultfd=uffd,
        madvise=madvise,
        memfd=memfd,
        psi=psi,
        cgroup=cgroup,
        pressure=pressure,
        sigbus_traps=traps,
        backends=backends,
        auto_backend=auto_backend,
        auto_reason=auto_reason,
        probe_errors=tuple(run.errors),
        probe_seconds=time.perf_counter() - started,
    )


_cache: Features | None = None
_cache_euid: int | None = None
_cache_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _cache_lock
    _cache_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def features(refresh: bool = False) -> Features:
    """The feature report of this kernel and process, computed on first use and then cached.

    The report is probed again by itself when the effective uid changed since (a process that drops
    privileges); pass ``refresh=True`` after other changes (a seccomp filter installed by other code,
    a move to another cgroup). :func:`vrange.testing.deny_userfaultfd` refreshes it. Never raises.
    """
    global _cache, _cache_euid
    with _cache_lock:
        euid = os.geteuid()
        if _cache is None or refresh or _cache_euid != euid:
            _cache = _compute()
            _cache_euid = euid
        return _cache


def invalidate() -> None:
    """Forget the cached report: the next :func:`features` call probes again."""
    global _cache
    with _cache_lock:
        _cache = None
