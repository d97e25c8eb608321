"""compat/run.py: the scenario matrix across backends and process profiles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_python

import vrange

RUNNER = Path(__file__).resolve().parent.parent / "compat" / "run.py"


@pytest.fixture(scope="module")
def matrix() -> dict:
    completed = run_python(script=RUNNER, args=["--json"], timeout=600)
    assert completed.returncode in (0, 1), completed.stderr
    return json.loads(completed.stdout)


def profile(matrix: dict, name: str) -> dict:
    return next(entry for entry in matrix["profiles"] if entry["profile"] == name)


def test_no_cell_fails(matrix: dict) -> None:
    failures = [(entry["profile"], scenario, backend, cell.get("reason"))
                for entry in matrix["profiles"] if "cells" in entry
                for scenario, row in entry["cells"].items()
                for backend, cell in row.items() if cell["status"] == "FAIL"]
    assert failures == []
    assert matrix["kernel"] == os.uname().release


@pytest.mark.parametrize("name, errno_name", [("seccomp-eperm", "EPERM"),
                                              ("seccomp-enosys", "ENOSYS")])
def test_container_profiles_fall_back_to_sigbus(matrix: dict, name: str, errno_name: str) -> None:
    entry = profile(matrix, name)
    assert entry["userfaultfd"] == "none"
    assert (entry["auto"], entry["auto_trap"]) == ("sigbus", "memfd")
    for scenario, row in entry["cells"].items():
        for spec in ("uffd", "sigbus:uffd"):  # no userfaultfd of any kind: neither can run
            assert row[spec]["status"] == "N/A" and errno_name in row[spec]["reason"], spec
        expected = "SKIP" if scenario == "kernel discard" else "PASS"
        assert row["sigbus:memfd"]["status"] == expected, (scenario, row["sigbus:memfd"])


def test_native_profile_runs_everything_that_applies(matrix: dict) -> None:
    entry = profile(matrix, "native")
    for scenario, row in entry["cells"].items():
        for backend, cell in row.items():
            assert cell["status"] in ("PASS", "SKIP", "N/A"), (scenario, backend, cell)
            if cell["status"] == "SKIP":
                assert (scenario, backend) == ("kernel discard", "sigbus:memfd")


def test_unprivileged_profile_is_user_mode_only(matrix: dict, report: vrange.Features) -> None:
    entry = profile(matrix, "unprivileged")
    if "unavailable" in entry:
        pytest.skip(f"profile not run: {entry['unavailable']}")
    if report.userfaultfd.unprivileged_userfaultfd_sysctl != 0:
        pytest.skip("needs vm.unprivileged_userfaultfd=0 (with 1 unprivileged users get a full "
                    "userfaultfd; here it is "
                    f"{report.userfaultfd.unprivileged_userfaultfd_sysctl})")
    assert entry["userfaultfd"] == "user_mode_only"
    assert (entry["auto"], entry["auto_trap"]) == ("sigbus", "uffd")  # the kernel reclaims
    for scenario, row in entry["cells"].items():
        assert row["uffd"]["status"] == "N/A"
        assert row["sigbus:uffd"]["status"] == "PASS", (scenario, row["sigbus:uffd"])
