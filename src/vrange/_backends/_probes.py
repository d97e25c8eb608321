"""Kernel-feature probes: fill the report :func:`features` returns, by doing, not by version numbers.

Everything is found by doing (opening a userfaultfd, madvising a scratch mapping, writing a PSI
trigger). Each backend states its own requirements (``BackendRegion.assess``, evaluated here on the
probed facts) and the backend table decides what ``auto`` picks. :func:`features` computes the
report once and caches it; it never raises: a probe that fails unexpectedly is recorded in
``Features.probe_errors``.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .._feature_report import (
    PROBED_ADVICE, UFFD_FEATURE_NAMES, UFFD_IOCTL_NAMES, AdviceSupport, BackendSupport,
    CgroupReport, Fallback, Features, OpenAttempt, ProbeOutcome, PressurePlan, PsiReport, TrapSupport,
    UserfaultfdAccess, UserfaultfdReport, decode_bits, describe_errno)
from .._native import ffi, lib
from . import _registry
from ._base import ProbedFacts
from ._table import AUTO_ORDER, BACKENDS

CAP_SYS_PTRACE = 19
SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}
KERNEL_FAULT_PROBE_TIMEOUTS_MS = (1000, 3000, 6000)
# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit number.
CGROUP_V1_UNLIMITED = 1 << 62


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
        result = lib.vr_userfaultfd_open_syscall(flags, fd_out)
    elif method == "dev":
        result = lib.vr_userfaultfd_open_dev(flags, fd_out)
    else:
        result = lib.vr_userfaultfd_open_syscall(flags | lib.UFFD_USER_MODE_ONLY, fd_out)
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
    if syscall.errno == errno.EPERM:
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
    elif syscall.errno == errno.ENOSYS:
        cause = ("a seccomp filter denies it" if seccomp_mode == "filter"
                 else "the kernel lacks CONFIG_USERFAULTFD")
        parts.append(f"userfaultfd(2) fails with ENOSYS: {cause}")
    elif syscall.error:
        parts.append(f"userfaultfd(2) fails with {syscall.error}")
    if access == "dev":
        parts.append("/dev/userfaultfd opens a full descriptor; faults inside syscalls are served "
                     "(verified)")
        return "; ".join(parts)
    if dev.errno == errno.ENOENT:
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
            api_result = lib.vr_userfaultfd_api(fd, 0, features_out, ioctls_out)
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


def cgroup_mounts() -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
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


def cgroup_directory(mount: tuple[str, str], path: str) -> Path:
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
    v1_mount, v2_mount = cgroup_mounts()
    if v1_path is not None and v1_mount is not None:
        directory = cgroup_directory(v1_mount, v1_path)
        limit, where = _tightest_limit(directory, Path(v1_mount[1]), "memory.limit_in_bytes")
        usage = _read_int(str(directory / "memory.usage_in_bytes"))
        return CgroupReport("v1", v1_path, limit, where, usage, str(directory))
    if v2_path is not None and v2_mount is not None:
        available = (_read_text(str(Path(v2_mount[1]) / "cgroup.controllers")) or "").split()
        if "memory" in available:
            directory = cgroup_directory(v2_mount, v2_path)
            limit, where = _tightest_limit(directory, Path(v2_mount[1]), "memory.max")
            usage = _read_int(str(directory / "memory.current"))
            return CgroupReport("v2", v2_path, limit, where, usage, str(directory))
    return CgroupReport("none", None, None, None, None)


def _choose_auto(backends: tuple[BackendSupport, ...]) -> tuple[str | None, str]:
    """The first usable backend of the table's ``auto`` order, and why (naming the ones passed over
    and why they cannot run)."""
    by_name = {support.name: support for support in backends}
    passed_over: list[BackendSupport] = []
    for name in AUTO_ORDER:
        support = by_name[name]
        if support.usable:
            skipped = "".join(f"{other.name} is unusable ({other.reason}); " for other in passed_over)
            return name, f"{name}: {skipped}{BACKENDS[name].why_chosen(support)}"
        passed_over.append(support)
    return None, "no backend can run: " + "; ".join(f"{support.name}: {support.reason}"
                                                    for support in passed_over)


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


def _fallbacks(uffd: UserfaultfdReport, madvise: tuple[AdviceSupport, ...],
               backends: tuple[BackendSupport, ...], auto_backend: str | None) -> tuple[Fallback, ...]:
    """The features vrange would use that are missing here, and what it does instead (one entry
    per feature; older kernels lack them: see vrange.testing.KERNEL_PROFILES)."""
    refused = {advice.name: advice.outcome for advice in madvise if not advice.outcome.ok}
    by_name = {support.name: support for support in backends}
    entries: list[Fallback] = []

    def advice_missing(name: str, before: str) -> str:
        return f"madvise rejects MADV_{name}: {refused[name].error} (Linux < {before})"

    if "POPULATE_WRITE" in refused:
        entries.append(Fallback(
            "MADV_POPULATE_WRITE", advice_missing("POPULATE_WRITE", "5.14"),
            "MADV_POPULATE_WRITE is refused: pinning (mark_nonvolatile) faults each missing page in "
            "through a system call and dirties each present lazy-free page with an atomic no-op "
            "write, so the kernel can no longer discard it (uffd backend and sigbus uffd trap)"))
    if "POPULATE_READ" in refused:
        entries.append(Fallback(
            "MADV_POPULATE_READ", advice_missing("POPULATE_READ", "5.14"),
            "MADV_POPULATE_READ is refused: prefault (and vrange.io's retries) fault each missing "
            "page in through a system call, one page at a time; present pages keep their "
            "volatility (uffd backend)"))
    if "PAGEOUT" in refused:
        entries.append(Fallback(
            "MADV_PAGEOUT", advice_missing("PAGEOUT", "5.4"),
            "MADV_PAGEOUT is missing: vrange.testing.page_out raises VRangeError naming it (tests "
            "cannot make the kernel reclaim on demand; use region.purge()); nothing else in vrange "
            "uses it, and the kernel still reclaims volatile pages by itself under pressure"))
    handshake_answered = bool(uffd.api_ioctls)
    if uffd.range_ioctls and "POISON" not in uffd.range_ioctls:
        entries.append(Fallback(
            "UFFDIO_POISON", "UFFDIO_REGISTER does not offer the UFFDIO_POISON ioctl (Linux < 6.6)",
            "UFFDIO_POISON is missing: the uffd backend's default on_error is 'abort' (a refill "
            "that fails on a raw access prints why and aborts; 'zeros' is the opt-in "
            "alternative, 'poison' is refused); the sigbus backend's 'poison' needs no "
            "UFFDIO_POISON"))
    if handshake_answered and "THREAD_ID" not in uffd.api_features:
        entries.append(Fallback(
            "UFFD_FEATURE_THREAD_ID", "the UFFDIO_API handshake does not offer it (Linux < 4.14)",
            "UFFD_FEATURE_THREAD_ID is missing: the uffd backend cannot run (its handler must know "
            f"which thread faulted); auto picks {auto_backend or 'no backend'}"))
    if handshake_answered and "SIGBUS" not in uffd.api_features:
        sigbus = by_name.get("sigbus")
        trap = (f"the {sigbus.trap} trap is used" if sigbus is not None and sigbus.usable
                else "the sigbus backend cannot run")
        entries.append(Fallback(
            "UFFD_FEATURE_SIGBUS", "the UFFDIO_API handshake does not offer it (Linux < 4.14)",
            "UFFD_FEATURE_SIGBUS is missing: the sigbus backend's userfaultfd trap cannot run; "
            f"{trap} (only vrange purges those pages: the kernel cannot reclaim them)"))
    return tuple(entries)


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
    facts = ProbedFacts(uffd, frozenset(advice.name for advice in madvise if advice.outcome.ok),
                        memfd)
    supports: list[BackendSupport] = []
    trap_list: list[TrapSupport] = []
    for name, backend in BACKENDS.items():
        failed = (BackendSupport(name, False, "assessment failed (see probe_errors)"),
                  tuple(TrapSupport(variant, False, False,  # type: ignore[arg-type]
                                    "probe failed (see probe_errors)")
                        for variant in backend.variants))
        support, variants = run.section(f"backend {name}", lambda: backend.assess(facts), failed)
        supports.append(support)
        trap_list.extend(variants)
    backends, traps = tuple(supports), tuple(trap_list)
    auto_backend, auto_reason = _choose_auto(backends)
    no_fallbacks: tuple[Fallback, ...] = ()
    fallbacks = run.section("fallbacks",
                            lambda: _fallbacks(uffd, madvise, backends, auto_backend), no_fallbacks)
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
        fallbacks=fallbacks,
    )


_cache: Features | None = None
_cache_euid: int | None = None
_cache_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _cache_lock
    _cache_lock = threading.Lock()


_registry.on_fork_reset_lock(_reset_lock_after_fork)


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
