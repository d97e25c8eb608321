"""``python -m vrange``: the commands the README promises."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import run_python, syscalls_are_served, usable_specs

import vrange


def run_vrange(*args: str, backend: str | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_python(module="vrange", args=args, timeout=timeout,
                      env=None if backend is None else {"VRANGE_BACKEND": backend})


def table_rows(output: str) -> dict[str, str]:
    """The demo's summary table: approach -> the rest of its row."""
    rows = {}
    for line in output.splitlines():
        for approach in ("vrange uffd", "vrange sigbus:uffd", "vrange sigbus:memfd",
                         "keep everything (dict)", "recompute every time"):
            if line.startswith(approach + " "):
                rows[approach] = line[len(approach):]
    return rows


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


def test_demo_on_each_backend(backend: str) -> None:
    result = run_vrange("demo", "--quick", backend=backend)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert set(rows) == {f"vrange {backend}", "keep everything (dict)", "recompute every time"}
    assert all(" right" in row for row in rows.values()), rows
    *_, decodes = rows["recompute every time"].split("rss")[1].split()[:1] or ["?"]
    assert int(decodes) == 3000  # recompute decodes on every read
    efault = next(line for line in result.stdout.splitlines() if line.startswith(f"  vrange {backend}:"))
    if syscalls_are_served(backend):
        assert "waited for the refill" in efault
    else:
        assert "failed with EFAULT" in efault and "vrange.io.write() refilled and wrote 4.0 MiB" in efault


def test_demo_keeps_a_budget_where_it_cannot_confine_itself() -> None:
    result = run_vrange("demo", "--quick", "--budget-only", "--limit", "4M", "--cache", "32M",
                        timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a byte budget of 4.0 MiB" in result.stdout
    rows = table_rows(result.stdout)
    for spec in vrange.available_backends():
        vrange_rows = [row for name, row in rows.items() if name.startswith(f"vrange {spec}")]
        assert vrange_rows and all(" budget " in row and " right" in row for row in vrange_rows)


@pytest.mark.hang_timeout(200)
@pytest.mark.requires("root", "(to make memory cgroups; otherwise the demo keeps a budget)")
def test_the_readme_demo_confines_itself_and_is_never_oom_killed() -> None:
    """The README's main job, as CI runs it: as root each run gets a memory cgroup a third of its
    cache; the kernel (or vrange's monitor, on the memfd trap) takes tiles back."""
    result = run_vrange("demo", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Each run is confined to 128.0 MiB" in result.stdout
    rows = table_rows(result.stdout)
    assert not any("killed" in row or "failed" in row for row in rows.values()), rows
    assert all(" right" in row for row in rows.values()), rows
    for approach, row in rows.items():
        if approach.startswith("vrange"):
            assert "kernel" in row or "pressure" in row, (approach, row)  # memory was given back
    assert "*" in rows["keep everything (dict)"]  # it needs more than the limit


def test_unknown_command_is_an_error() -> None:
    result = run_vrange("nonsense")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_bench_quick_reports_rows_against_a_baseline() -> None:
    result = run_vrange("bench", "--quick")
    assert result.returncode == 0, result.stderr
    specs = usable_specs(vrange.features())
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("  fault/")]
    assert {row[0].split("/")[1] for row in rows} == set(specs)
    for row in rows:
        measured, baseline, _unit, ratio = row[1:5]
        assert float(measured) > 0 and float(baseline) > 0 and float(ratio) > 0
