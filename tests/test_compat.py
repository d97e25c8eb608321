"""``python -m vrange compat``: the scenario matrix across backends and profiles."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_python

import vrange
from vrange.compat import BACKENDS, PROFILES, SCENARIOS

KEYS = {"scenario", "backend", "profile", "kernel", "result", "reason"}
RUN_PY = Path(__file__).resolve().parent.parent / "compat" / "run.py"


def run_compat(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_python(module="vrange", args=["compat", *args], timeout=timeout)


def parse_lines(output: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in output.splitlines()]


@pytest.fixture(scope="module")
def full_run() -> subprocess.CompletedProcess[str]:
    return run_compat("--json")


@pytest.fixture(scope="module")
def cells(full_run: subprocess.CompletedProcess[str]) -> dict[tuple[str, str, str], dict[str, str]]:
    by_key: dict[tuple[str, str, str], dict[str, str]] = {}
    for cell in parse_lines(full_run.stdout):
        key = (cell["profile"], cell["scenario"], cell["backend"])
        assert key not in by_key, f"cell {key} twice"
        by_key[key] = cell
    return by_key


@pytest.mark.hang_timeout(600)
def test_every_cell_is_one_line_with_the_six_keys(
        full_run: subprocess.CompletedProcess[str],
        cells: dict[tuple[str, str, str], dict[str, str]]) -> None:
    lines = parse_lines(full_run.stdout)
    assert all(set(cell) == KEYS for cell in lines), lines[:3]
    assert all(cell["result"] in ("pass", "fail", "n/a") for cell in lines)
    assert all(isinstance(cell["reason"], str) for cell in lines)
    assert all(cell["reason"] for cell in lines if cell["result"] != "pass")
    assert set(cells) == {(profile, scenario, backend) for profile in PROFILES
                          for scenario in SCENARIOS for backend in BACKENDS}
    assert {cell["kernel"] for cell in lines} == {os.uname().release}
    # One line as it starts, and no progress without a terminal unless asked.
    assert full_run.stderr.splitlines() == [
        f"python -m vrange compat: {len(lines)} cells ({len(PROFILES)} profiles x "
        f"{len(SCENARIOS)} scenarios x {len(BACKENDS)} backend specs), each profile in a process "
        "of its own (--progress shows each profile)"]


def test_no_cell_fails(full_run: subprocess.CompletedProcess[str],
                       cells: dict[tuple[str, str, str], dict[str, str]]) -> None:
    failures = [(key, cell["reason"]) for key, cell in cells.items() if cell["result"] == "fail"]
    assert failures == []
    assert full_run.returncode == 0, full_run.stderr[-2000:]


def _memory_pressure_applies(report: vrange.Features) -> bool:
    directory = report.cgroup.directory
    return os.geteuid() == 0 and directory is not None and os.access(directory, os.W_OK)


def test_native_profile_runs_everything_that_applies(
        cells: dict[tuple[str, str, str], dict[str, str]], report: vrange.Features) -> None:
    for scenario in SCENARIOS:
        for backend in BACKENDS:
            cell = cells[("native", scenario, backend)]
            if (scenario, backend) == ("kernel-discard", "sigbus:memfd"):
                assert cell["result"] == "n/a" and "memfd" in cell["reason"]
            elif scenario == "memory-pressure" and not _memory_pressure_applies(report):
                assert cell["result"] == "n/a", cell
            elif cell["result"] != "pass":
                # Only a backend this machine cannot run is n/a, for the reason features() gives.
                name, _, trap = backend.partition(":")
                support = report.trap(trap) if trap and report.backend(name).usable \
                    else report.backend(name)
                assert cell["result"] == "n/a" and not support.usable, cell
                assert cell["reason"] == support.reason


@pytest.mark.parametrize("profile, errno_name", [("seccomp-eperm", "EPERM"),
                                                 ("seccomp-enosys", "ENOSYS")])
def test_container_profiles_fall_back_to_sigbus(
        cells: dict[tuple[str, str, str], dict[str, str]], report: vrange.Features,
        profile: str, errno_name: str) -> None:
    for scenario in SCENARIOS:
        for backend in ("uffd", "sigbus:uffd"):  # no userfaultfd of any kind: neither can run
            cell = cells[(profile, scenario, backend)]
            assert cell["result"] == "n/a" and errno_name in cell["reason"], cell
        cell = cells[(profile, scenario, "sigbus:memfd")]
        if scenario == "kernel-discard" or (scenario == "memory-pressure"
                                            and not _memory_pressure_applies(report)):
            assert cell["result"] == "n/a", cell
        else:
            assert cell["result"] == "pass", cell


def test_unprivileged_profile(cells: dict[tuple[str, str, str], dict[str, str]],
                              report: vrange.Features) -> None:
    row = {(scenario, backend): cells[("unprivileged", scenario, backend)]
           for scenario in SCENARIOS for backend in BACKENDS}
    if os.geteuid() != 0:
        assert all(cell["result"] == "n/a" and "needs root" in cell["reason"]
                   for cell in row.values())
        return
    assert all(cell["result"] == "n/a" for (scenario, _), cell in row.items()
               if scenario == "memory-pressure"), "made a cgroup as uid 65534"
    if report.userfaultfd.unprivileged_userfaultfd_sysctl == 0:
        # A user-mode-only userfaultfd: the uffd backend cannot serve syscalls, the trap runs.
        for (scenario, backend), cell in row.items():
            if backend == "uffd":
                assert cell["result"] == "n/a", cell
            elif backend == "sigbus:uffd" and scenario != "memory-pressure":
                assert cell["result"] == "pass", cell


def test_simulated_kernels_are_profiles_where_the_library_has_them() -> None:
    kernels = getattr(vrange.testing, "KERNEL_PROFILES", {})
    assert {name for name, profile in PROFILES.items() if profile.kind == "kernel"} == set(kernels)
    assert list(PROFILES)[:4] == ["native", "seccomp-eperm", "seccomp-enosys", "unprivileged"]


def test_list_names_every_scenario_and_profile() -> None:
    result = run_compat("--list")
    assert result.returncode == 0, result.stderr
    for name in [*SCENARIOS, *PROFILES]:
        assert f"\n  {name} " in result.stdout or f"\n  {name}\n" in result.stdout, name
    assert SCENARIOS["foreign-sigbus"].description in " ".join(result.stdout.split())


@pytest.mark.parametrize("width", ["60", "80", "100", "160"])
def test_the_list_fits_the_terminal(width: str) -> None:
    """A description wraps beside its name instead of running past the terminal's edge into the
    next line's name column."""
    result = run_python(module="vrange", args=["compat", "--list"], env={"COLUMNS": width})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= int(width) for line in lines), \
        [line for line in lines if len(line) > int(width)]
    for description in [scenario.description for scenario in SCENARIOS.values()]:
        assert description in " ".join(result.stdout.split())


@pytest.mark.parametrize("option, value", [("--profile", "docker"), ("--scenario", "nope"),
                                           ("--backend", "sigbus:nope"), ("--timeout", "0")])
def test_bad_options_exit_2_with_a_clear_error(option: str, value: str) -> None:
    result = run_compat(option, value)
    assert result.returncode == 2
    assert result.stdout == ""
    assert value in result.stderr and "python -m vrange compat: error: " in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_table_mode_subset_with_progress() -> None:
    result = run_compat("--profile", "native", "--profile", "seccomp-enosys", "--scenario",
                        "first-touch", "--scenario", "kernel-discard", "--progress")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vrange ") and os.uname().release in lines[0]
    assert "profile native: this process as it is" in lines
    assert any(line.startswith("profile seccomp-enosys:") for line in lines)
    header = next(line for line in lines if line.strip().startswith("uffd"))
    assert header.split() == list(BACKENDS)
    rows = [line.split() for line in lines if line.strip().startswith("kernel-discard")]
    assert len(rows) == 2 and rows[0][3] == "n/a"  # sigbus:memfd, with its note number
    assert lines[-1].startswith("12 cells: ") and lines[-1].endswith(" 0 fail")
    assert "n/a" in result.stdout and "Notes:" in result.stdout
    announced, *progress = result.stderr.splitlines()
    assert announced.startswith("python -m vrange compat: 12 cells (2 profiles x 2 scenarios x 3 ")
    assert len(progress) == 2 and "profile native done" in progress[0], result.stderr
    assert "profile seccomp-enosys done" in progress[1]


def test_the_matrix_prose_fits_the_terminal() -> None:
    """The long reasons (why auto chose a backend, the notes) wrap at the terminal's width instead
    of running past its edge into the grid's first column."""
    result = run_python(module="vrange", env={"COLUMNS": "80"}, timeout=600, args=[
        "compat", "--profile", "native", "--profile", "unprivileged", "--scenario", "raw-syscall"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "profile native: this process as it is" in lines
    header = next(line for line in lines if line.strip().startswith("uffd"))
    assert header.split() == list(BACKENDS)
    assert "Notes:" in lines and lines[-1].startswith("6 cells: ")


def test_run_py_is_the_same_command() -> None:
    result = run_python(script=RUN_PY, args=["--json", "--profile", "native", "--scenario",
                                             "backend-spec"], timeout=120)
    assert result.returncode == 0, result.stderr
    lines = parse_lines(result.stdout)
    assert [(cell["scenario"], cell["backend"]) for cell in lines] == \
        [("backend-spec", backend) for backend in BACKENDS]
