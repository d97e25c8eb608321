"""``python -m vrange``: the commands the README promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import vrange


def run_vrange(*args: str, backend: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    if backend is not None:
        environment["VRANGE_BACKEND"] = backend
    return subprocess.run([sys.executable, "-m", "vrange", *args], capture_output=True, text=True,
                          timeout=60, check=False, env=environment)


def test_features_json_names_every_item() -> None:
    result = run_vrange("features", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("kernel_release", "page_size", "thp_mode", "userfaultfd", "madvise", "memfd", "psi",
                "cgroup", "backends", "auto_backend", "auto_reason", "probe_errors"):
        assert key in data, key
    uffd = data["userfaultfd"]
    for key in ("access", "serves_syscalls", "reason", "attempts", "api_features", "api_ioctls",
                "range_ioctls", "unprivileged_userfaultfd_sysctl", "cap_sys_ptrace", "seccomp_mode"):
        assert key in uffd, key
    assert set(data["madvise"]) == {"FREE", "COLD", "PAGEOUT", "POPULATE_READ", "POPULATE_WRITE",
                                    "GUARD_INSTALL"}
    assert set(data["backends"]) == {"uffd", "sigbus"}
    for key in ("readable", "triggers_writable"):
        assert "ok" in data["psi"][key]
    for key in ("version", "memory_limit_bytes"):
        assert key in data["cgroup"]
    # The JSON says what the in-process report says.
    report = vrange.features()
    assert data["userfaultfd"]["access"] == report.userfaultfd.access
    assert data["page_size"] == report.page_size
    assert data["probe_errors"] == []


def test_features_table_is_readable() -> None:
    result = run_vrange("features")
    assert result.returncode == 0, result.stderr
    for heading in ("Kernel", "userfaultfd", "madvise", "Memory", "Backends"):
        assert f"\n{heading}" in result.stdout
    assert "MADV_POPULATE_WRITE" in result.stdout
    assert vrange.features().userfaultfd.access in result.stdout


def test_demo_reads_back_every_byte(backend: str) -> None:
    result = run_vrange("demo", backend=backend)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Backend: {backend} (from $VRANGE_BACKEND)" in result.stdout
    assert "every byte right" in result.stdout
    assert "wrote 4.0 MiB" in result.stdout
    assert "6. mark_nonvolatile" in result.stdout


def test_unknown_command_is_an_error() -> None:
    result = run_vrange("nonsense")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_bench_quick_reports_every_case_against_a_baseline() -> None:
    result = run_vrange("bench", "--quick")
    assert result.returncode == 0, result.stderr
    report = vrange.features()
    specs = [spec for spec in ("uffd", "sigbus:uffd", "sigbus:memfd")
             if report.backend(spec.partition(":")[0]).usable
             and (":" not in spec or report.trap(spec.partition(":")[2]).usable)]
    rows = [line for line in result.stdout.splitlines()
            if any(f" {spec} " in line for spec in specs)]
    assert len(rows) == 6 * len(specs)
    assert {row.split()[2] for row in rows} == set(specs)
    for row in rows:
        *_, per_page, baseline, ratio = row.split()
        assert float(per_page) > 0 and float(baseline) > 0 and float(ratio) > 0
    assert "features() full probe" in result.stdout
