"""Kernel-feature detection, checked against this machine by independent means."""

from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path

import pytest
from conftest import run_python

import vrange
from vrange._backends import _probes as features_module
from vrange.errors import VRangeOSError, check
from vrange._feature_report import UFFD_FEATURE_NAMES, decode_bits
from vrange.testing import deny_userfaultfd

NOBODY = 65534


def _read(path: str) -> str:
    return Path(path).read_text().strip()


def test_kernel_basics_match_the_system(report: vrange.Features) -> None:
    assert report.kernel_release == os.uname().release
    assert report.machine == os.uname().machine
    assert report.page_size == mmap.PAGESIZE
    assert report.max_map_count == int(_read("/proc/sys/vm/max_map_count"))
    thp_file = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp_file):
        assert f"[{report.thp_mode}]" in _read(thp_file).split()
    else:
        assert report.thp_mode is None


def test_report_is_cached_and_refreshable() -> None:
    first = vrange.features()
    assert vrange.features() is first
    fresh = vrange.features(refresh=True)
    assert fresh is not first
    assert vrange.features() is fresh
    assert fresh.userfaultfd.access == first.userfaultfd.access
    assert fresh.madvise == first.madvise


def test_madvise_report_matches_python_mmap_madvise(report: vrange.Features) -> None:
    # The advice numbers the native core was built with agree with Python's own where it has them.
    for advice in report.madvise:
        python_value = getattr(mmap, f"MADV_{advice.name}", None)
        if python_value is not None:
            assert python_value == advice.value, advice.name
    # And an independent madvise through Python's mmap module gives the same verdicts.
    for advice in report.madvise:
        scratch = mmap.mmap(-1, 2 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            scratch.write(b"\x5a" * len(scratch))
            try:
                scratch.madvise(advice.value)
                accepted, error_number = True, None
            except OSError as error:
                accepted, error_number = False, error.errno
        finally:
            scratch.close()
        assert advice.outcome.ok == accepted, advice.name
        assert advice.outcome.errno == error_number, advice.name
    names = [advice.name for advice in report.madvise]
    assert names == ["FREE", "COLD", "PAGEOUT", "POPULATE_READ", "POPULATE_WRITE", "GUARD_INSTALL"]


def test_madvise_accepted_lookup(report: vrange.Features) -> None:
    assert report.madvise_accepted("FREE") == report.madvise[0].outcome.ok
    with pytest.raises(KeyError, match="MADV_NOPE"):
        report.madvise_accepted("NOPE")


def test_userfaultfd_permission_inputs_match_proc(report: vrange.Features) -> None:
    uffd = report.userfaultfd
    sysctl = "/proc/sys/vm/unprivileged_userfaultfd"
    expected_sysctl = int(_read(sysctl)) if os.path.exists(sysctl) else None
    assert uffd.unprivileged_userfaultfd_sysctl == expected_sysctl
    status = dict(line.split(":", 1) for line in _read("/proc/self/status").splitlines())
    assert uffd.cap_sys_ptrace == bool(int(status["CapEff"], 16) >> 19 & 1)
    assert uffd.seccomp_mode == {"0": "disabled", "1": "strict", "2": "filter"}[status["Seccomp"].strip()]
    assert [attempt.method for attempt in uffd.attempts] == ["syscall", "dev", "syscall_user_mode_only"]


@pytest.mark.requires("root", "(the full-access case)")
@pytest.mark.requires("no_seccomp_filter", "(the full-access case)")
def test_userfaultfd_as_root_is_full_and_named(report: vrange.Features) -> None:
    uffd = report.userfaultfd
    assert uffd.access == "syscall"
    assert uffd.serves_syscalls is True
    assert uffd.full
    assert all(attempt.outcome.ok for attempt in uffd.attempts)
    assert {"THREAD_ID", "SIGBUS", "EVENT_REMOVE"} <= set(uffd.api_features)
    assert set(uffd.api_ioctls) == {"REGISTER", "UNREGISTER", "API"}
    assert {"WAKE", "COPY", "ZEROPAGE"} <= set(uffd.range_ioctls)
    rebuilt = sum(1 << UFFD_FEATURE_NAMES.index(name) for name in uffd.api_features)
    assert rebuilt == uffd.api_features_mask


def test_decode_bits_names_unknown_bits() -> None:
    assert decode_bits(0b101, ("A", "B", "C")) == ("A", "C")
    assert decode_bits(1 << 40, ("A",)) == ("bit40",)
    assert decode_bits(0, ("A",)) == ()


def _assert_uffd_denied(report: vrange.Features, error_number: int, name: str) -> None:
    uffd = report.userfaultfd
    attempts = {attempt.method: attempt.outcome for attempt in uffd.attempts}
    assert uffd.seccomp_mode == "filter"
    assert attempts["syscall"].errno == error_number
    assert attempts["syscall_user_mode_only"].errno == error_number
    assert name in uffd.reason and "seccomp" in uffd.reason
    assert uffd.full is False or uffd.access == "dev"


@pytest.mark.forked
@pytest.mark.requires("root", "(to install a seccomp filter)")
@pytest.mark.parametrize("error_number", [errno.EPERM, errno.ENOSYS], ids=["EPERM", "ENOSYS"])
def test_seccomp_denial_of_every_way_in_is_reported(error_number: int) -> None:
    deny_userfaultfd(error_number, include_dev=True)
    report = vrange.features(refresh=True)
    uffd = report.userfaultfd
    name = errno.errorcode[error_number]
    _assert_uffd_denied(report, error_number, name)
    assert {attempt.method: attempt.outcome.errno for attempt in uffd.attempts}["dev"] == error_number
    assert uffd.access == "none"
    assert uffd.serves_syscalls is None
    assert "no userfaultfd can be opened" in uffd.reason
    assert not report.backend("uffd").usable
    assert name in report.backend("uffd").reason
    assert report.auto_backend != "uffd"
    # No userfaultfd of any kind: the sigbus backend falls back to the memfd trap, which the kernel
    # cannot reclaim, and every report says so.
    trap = report.trap("uffd")
    assert not trap.usable and name in trap.reason
    if report.backend("sigbus").usable:
        sigbus = report.backend("sigbus")
        assert (sigbus.trap, sigbus.kernel_reclaims) == ("memfd", False)
        assert "memfd trap is used" in report.auto_reason
        assert "cannot reclaim" in report.auto_reason
        with vrange.Region(1 << 20, vrange.sources.Zeros()) as region:
            assert (region.backend, region.trap, region.kernel_reclaims) == ("sigbus", "memfd", False)
            assert "trap='memfd'" in repr(region)
        with pytest.raises(vrange.BackendUnavailable, match="uffd trap cannot run here"):
            vrange.Region(1 << 20, vrange.sources.Zeros(), backend="sigbus:uffd")


@pytest.mark.forked
@pytest.mark.requires("root", "(to install a seccomp filter)")
@pytest.mark.requires("dev_userfaultfd", "(what the filter leaves open)")
def test_seccomp_denial_of_the_syscall_leaves_dev_userfaultfd() -> None:
    deny_userfaultfd(errno.EPERM, include_dev=False)
    report = vrange.features(refresh=True)
    _assert_uffd_denied(report, errno.EPERM, "EPERM")
    assert report.userfaultfd.access == "dev"
    assert report.userfaultfd.serves_syscalls is True
    assert "/dev/userfaultfd opens a full descriptor" in report.userfaultfd.reason


@pytest.mark.forked
@pytest.mark.requires("root", "(to drop privileges)")
def test_unprivileged_process_gets_what_the_sysctl_allows() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    report = vrange.features(refresh=True)
    uffd = report.userfaultfd
    attempts = {attempt.method: attempt.outcome for attempt in uffd.attempts}
    assert uffd.cap_sys_ptrace is False
    if os.path.exists("/dev/userfaultfd"):
        assert attempts["dev"].errno == errno.EACCES  # the node is root-only (mode 0600)
    if uffd.unprivileged_userfaultfd_sysctl == 0:
        assert attempts["syscall"].errno == errno.EPERM
        assert attempts["syscall_user_mode_only"].ok
        # Verified by behaviour: the read(2) into a registered missing page failed with EFAULT.
        assert uffd.access == "user_mode_only"
        assert uffd.serves_syscalls is False
        assert "UFFD_USER_MODE_ONLY" in uffd.reason and "EFAULT" in uffd.reason
        assert "vm.unprivileged_userfaultfd=0" in uffd.reason
        assert not report.backend("uffd").usable
        # ... yet the kernel reclaims: the sigbus backend's userfaultfd trap needs no privilege.
        assert report.trap("uffd").usable and report.trap("uffd").kernel_reclaims
        sigbus = report.backend("sigbus")
        assert (sigbus.usable, sigbus.trap, sigbus.kernel_reclaims) == (True, "uffd", True)
        assert report.auto_backend == "sigbus" and "uffd trap is used" in report.auto_reason
        with vrange.Region(1 << 20, vrange.sources.Zeros()) as region:
            assert (region.trap, region.stats().trap, region.kernel_reclaims) == ("uffd", "uffd", True)
    else:
        assert uffd.access == "syscall" and uffd.serves_syscalls is True


def test_deny_userfaultfd_rejects_bad_errno() -> None:
    with pytest.raises(ValueError, match="positive errno"):
        deny_userfaultfd(0)
    with pytest.raises(ValueError, match="positive errno"):
        deny_userfaultfd(-1)


def test_a_failing_probe_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("simulated probe failure")

    monkeypatch.setattr(features_module, "_probe_psi", broken)
    monkeypatch.setattr(features_module, "_probe_cgroup", broken)
    report = features_module._compute()
    assert "psi: RuntimeError: simulated probe failure" in report.probe_errors
    assert "cgroup: RuntimeError: simulated probe failure" in report.probe_errors
    assert report.psi.readable.ok is False
    assert report.cgroup.version == "none"
    assert report.userfaultfd.attempts  # the other sections still ran


def test_psi_matches_proc_pressure(report: vrange.Features) -> None:
    path = "/proc/pressure/memory"
    if not os.access(path, os.R_OK):
        assert report.psi.readable.ok is False
        return
    assert report.psi.readable.ok
    fields = dict(pair.split("=") for pair in _read(path).splitlines()[0].split()[1:])
    assert report.psi.some_avg10 is not None
    assert abs(report.psi.some_avg10 - float(fields["avg10"])) < 10.0
    if os.geteuid() == 0:
        assert report.psi.triggers_writable.ok, report.psi.triggers_writable.error


def _own_memory_cgroup_v1() -> Path | None:
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return directory if directory.is_dir() else None
    return None


def test_cgroup_matches_proc_self_cgroup(report: vrange.Features) -> None:
    own = _own_memory_cgroup_v1()
    if own is not None:
        assert report.cgroup.version == "v1"
        assert Path("/sys/fs/cgroup/memory", (report.cgroup.path or "").lstrip("/")) == own
        assert report.cgroup.memory_usage_bytes is not None and report.cgroup.memory_usage_bytes > 0
    else:
        assert report.cgroup.version in ("v2", "none")


@pytest.mark.forked
@pytest.mark.requires("root", "(to make a memory cgroup)")
@pytest.mark.requires("cgroup_v1_memory", "(to make a memory cgroup)")
def test_cgroup_limit_is_found_in_a_child_cgroup() -> None:
    own = _own_memory_cgroup_v1()
    assert own is not None and os.access(own, os.W_OK), "the report and /proc disagree"
    limit = 256 << 20
    child = own / f"vrange-test-{os.getpid()}"
    child.mkdir()
    try:
        (child / "memory.limit_in_bytes").write_text(str(limit))
        script = (
            "import json, os, sys, vrange\n"
            f"open({str(child / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            "report = vrange.features().as_dict()\n"
            "print(json.dumps([report['cgroup'], report['pressure']]))\n"
        )
        output = run_python(script, check=True).stdout
        cgroup, pressure = json.loads(output)
    finally:
        child.rmdir()
    # vrange's pressure monitor watches the limit that would kill the process.
    assert pressure["signal"] == "cgroup-v1"
    assert pressure["limit_bytes"] == limit
    assert pressure["usage_file"] == str(child / "memory.usage_in_bytes")
    assert pressure["threshold_control"] == str(child / "cgroup.event_control")
    assert (pressure["high_water_bytes"], pressure["low_water_bytes"]) == (224 << 20, 192 << 20)
    assert cgroup["version"] == "v1"
    assert cgroup["memory_limit_bytes"] == limit
    assert cgroup["limit_set_at"] == str(child)
    assert cgroup["path"].endswith(child.name)


def test_check_turns_negative_errno_into_an_exception() -> None:
    assert check(0, "do nothing") == 0
    assert check(7, "count") == 7
    with pytest.raises(VRangeOSError) as caught:
        check(-errno.EPERM, "open a userfaultfd")
    assert caught.value.errno == errno.EPERM
    assert "vrange could not open a userfaultfd" in str(caught.value)
    assert "EPERM" in str(caught.value)
    assert isinstance(caught.value, vrange.VRangeError)


def test_available_backends_agree_with_the_report(report: vrange.Features) -> None:
    usable = tuple(support.name for support in report.backends if support.usable)
    assert vrange.available_backends() == usable
    assert [support.name for support in report.backends] == ["uffd", "sigbus"]
    if report.auto_backend is None:
        assert "no backend can run" in report.auto_reason
    else:
        assert report.auto_backend == usable[0]
        assert report.auto_reason.startswith(report.auto_backend)


def test_the_report_names_each_sigbus_trap(report: vrange.Features) -> None:
    assert [trap.name for trap in report.sigbus_traps] == ["uffd", "memfd"]
    sigbus = report.backend("sigbus")
    if sigbus.usable:
        preferred = next(trap for trap in report.sigbus_traps if trap.usable)
        assert sigbus.trap == preferred.name
        assert sigbus.kernel_reclaims == preferred.kernel_reclaims
    assert report.trap("memfd").kernel_reclaims is False
    assert report.backend("uffd").kernel_reclaims is True
    plain = report.as_dict()
    assert set(plain["sigbus_traps"]) == {"uffd", "memfd"}
    assert plain["backends"]["sigbus"]["trap"] == sigbus.trap
    with pytest.raises(KeyError):
        report.trap("nope")


def test_the_cached_report_is_probed_again_after_the_uid_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = vrange.features()
    assert vrange.features() is first
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    assert vrange.features() is not first


@pytest.mark.requires("no_memory_limit", "(the machine-wide case)")
def test_without_a_limit_the_monitor_watches_the_machine(report: vrange.Features) -> None:
    plan = report.pressure
    assert plan.signal == ("psi" if report.psi.triggers_writable.ok else "meminfo")
    assert plan.usage_file == "/proc/meminfo" and plan.usage_kind == "meminfo"
    assert 0 < plan.low_water_bytes < plan.high_water_bytes < plan.limit_bytes
