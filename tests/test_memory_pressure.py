"""The kernel takes volatile memory back under a real memory limit instead of OOM-killing.

Each case runs a child process in a memory cgroup made beneath this process's own (never at the
hierarchy's root) and removed afterwards, with a volatile cache more than three times the limit. As
uid 65534 with ``backend="auto"`` (what an ordinary user gets: the sigbus backend's userfaultfd trap)
and as root on the uffd backend; the cache read in passes both ways users do it: each part pinned,
read and marked volatile again, or the whole cache marked volatile once and then only read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require, run_python

import vrange

CHILD = Path(__file__).resolve().parent / "memory_pressure_child.py"
LIMIT = 96 << 20
CACHE = 320 << 20  # 3.3 x the limit
NOBODY = 65534


@dataclass
class MemoryCgroup:
    version: str
    path: Path

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def _make_cgroup(version: str) -> MemoryCgroup:
    require("root", "(to make a memory cgroup)")
    require(f"cgroup_{version}_memory", "(to make a memory cgroup beneath this process's own)")
    directory = vrange.features().cgroup.directory
    assert directory is not None
    parent = Path(directory)
    if version == "v2":
        controllers = (parent / "cgroup.controllers").read_text().split()
        if "memory" not in controllers:
            pytest.skip(f"needs the memory controller in {parent}/cgroup.controllers (to limit a "
                        f"cgroup beneath it): it has {' '.join(controllers) or 'none'}")
        try:
            (parent / "cgroup.subtree_control").write_text("+memory")
        except OSError as error:
            pytest.skip(f"needs the v2 memory controller enabled beneath {parent}: {error}")
    path = parent / f"vrange-test-{os.getpid()}"
    path.mkdir()
    limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
    (path / limit_file).write_text(str(LIMIT))
    return MemoryCgroup(version, path)


@pytest.fixture(params=["v1", "v2"])
def memory_cgroup(request: pytest.FixtureRequest) -> Iterator[MemoryCgroup]:
    cgroup = _make_cgroup(request.param)
    try:
        yield cgroup
    finally:
        cgroup.path.rmdir()


def run_child(cgroup: MemoryCgroup, backend: str, mode: str, uid: int | None,
              *extra: str, size: int = CACHE) -> dict[str, object]:
    arguments = ["--cgroup-procs", str(cgroup.procs), "--backend", backend, "--mode", mode,
                 "--size", str(size), "--passes", "3", *extra]
    if uid is not None:
        arguments += ["--uid", str(uid)]
    completed = run_python(script=CHILD, args=arguments, timeout=120)
    assert completed.returncode != -9, (
        f"OOM-killed (oom_kill count {cgroup.oom_kills()}): {completed.stderr[-2000:]}")
    assert completed.returncode == 0, completed.stdout + completed.stderr[-2000:]
    assert cgroup.oom_kills() == 0
    result: dict[str, object] = json.loads(completed.stdout)
    assert result["wrong_parts"] == []
    # The kernel took chunks back and they were regenerated: more bytes than the cache holds.
    assert isinstance(result["purges"], int) and result["purges"] > 0, result
    assert isinstance(result["bytes_regenerated"], int) and result["bytes_regenerated"] > size
    return result


@pytest.mark.hang_timeout(150)
@pytest.mark.requires("sigbus_uffd_trap", "(what auto gives an unprivileged process)")
@pytest.mark.parametrize("mode", ["remark", "once"])
def test_unprivileged_auto_cache_is_reclaimed_not_oom_killed(memory_cgroup: MemoryCgroup,
                                                            mode: str) -> None:
    result = run_child(memory_cgroup, "auto", mode, uid=NOBODY)
    assert result["uid"] == NOBODY
    assert (result["backend"], result["trap"]) == ("sigbus", "uffd"), result["auto_reason"]
    if mode == "once":
        assert isinstance(result["volatile_refills"], int) and result["volatile_refills"] > 0


@pytest.mark.hang_timeout(150)
@pytest.mark.requires("uffd_backend", "(the cache is on it)")
def test_mark_once_cache_on_uffd_backend_is_reclaimed(memory_cgroup: MemoryCgroup) -> None:
    result = run_child(memory_cgroup, "uffd", "once", uid=None)
    assert (result["backend"], result["trap"]) == ("uffd", None)
    assert isinstance(result["volatile_refills"], int) and result["volatile_refills"] > 0


@pytest.mark.hang_timeout(150)
@pytest.mark.requires("sigbus_uffd_trap", "(the cache is on it)")
def test_mark_once_cache_on_forced_uffd_trap_as_root(memory_cgroup: MemoryCgroup) -> None:
    result = run_child(memory_cgroup, "sigbus:uffd", "once", uid=None)
    assert (result["backend"], result["trap"]) == ("sigbus", "uffd")


@pytest.mark.hang_timeout(150)
@pytest.mark.parametrize("mode", ["remark", "once"])
@pytest.mark.parametrize("uid", [NOBODY, None], ids=["uid65534", "root"])
def test_container_like_process_keeps_a_cache_three_times_its_limit(
        memory_cgroup: MemoryCgroup, mode: str, uid: int | None) -> None:
    """userfaultfd denied by seccomp, default settings: only vrange can give the memory back (the
    memfd trap), and its pressure monitor does, before the OOM killer. As root it is also woken by
    the cgroup's own signal (a v1 usage threshold needs root: cgroup.event_control is mode 0200)."""
    result = run_child(memory_cgroup, "auto", mode, uid, "--deny-userfaultfd", size=3 * LIMIT)
    assert (result["backend"], result["trap"], result["managed"]) == ("sigbus", "memfd", True)
    assert result["policy_signal"] == f"cgroup-{memory_cgroup.version}", result["policy_reason"]
    by_reason = result["purges_by_reason"]
    assert isinstance(by_reason, dict) and by_reason["pressure"] > 0, result
    assert by_reason["kernel"] == 0  # nothing else could have taken it
    assert result["purges"] == sum(by_reason.values())
    if uid is None and memory_cgroup.version == "v1":
        assert isinstance(result["signal_events"], int) and result["signal_events"] > 0, result
