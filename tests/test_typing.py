"""A user's script that uses Region, pinned(), mark_nonvolatile(report=...) and sources passes
``mypy --strict``; a backend or error policy that does not exist is a type error (they are
``Literal`` types: vrange.BackendName, vrange.ErrorPolicy)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the test extra (pip install '.[test]')")

USER_SCRIPT = '''
from __future__ import annotations

import vrange
from vrange import sources


def regenerate(offset: int, buf: memoryview) -> None:
    buf[:] = bytes(len(buf))


def main(path: str) -> None:
    backend: vrange.BackendName = "sigbus:memfd"
    policy: vrange.ErrorPolicy = "poison"
    with vrange.Region(1 << 20, regenerate, backend="auto", on_error="zeros") as region:
        with region.pinned(0, 4096, populate=False) as pin:
            view: memoryview = pin.view
            purged: bool = pin.purged
            ranges: list[tuple[int, int]] = pin.purged_ranges
            print(bytes(view[:4]), purged, ranges, pin.offset + pin.length, pin.active)
        was_purged: bool = region.mark_nonvolatile()
        report: list[tuple[int, int]] = region.mark_nonvolatile(0, 65536, report=True,
                                                                 populate=False)
        region.mark_volatile(0, 65536)
        discarded: int = region.purge()
        pins: int = region.pin_count(0)
        stats: vrange.RegionStats = region.stats()
        print(was_purged, report, discarded, pins, stats.resident_bytes)
    with vrange.Region(4096, sources.Zeros(), backend=backend, on_error=policy) as zeros:
        zeros.prefault()
    with vrange.Region(4096, sources.File(path), chunk_size=4096, priority=1,
                       group="files", managed=True) as files:
        first: int = files[0]
        print(first, files.backend, files.trap, files.kernel_reclaims)
'''

MISTAKES = '''
from __future__ import annotations

import vrange


def regenerate(offset: int, buf: memoryview) -> None:
    buf[:] = bytes(len(buf))


vrange.Region(4096, regenerate, backend="ufd")
vrange.Region(4096, regenerate, on_error="ignore")
'''


def run_mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), str(script)],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.hang_timeout(300)
def test_a_user_script_passes_mypy_strict(tmp_path: Path) -> None:
    result = run_mypy(tmp_path, USER_SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.hang_timeout(300)
def test_unknown_backends_and_policies_are_type_errors(tmp_path: Path) -> None:
    result = run_mypy(tmp_path, MISTAKES)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("[arg-type]") == 2, result.stdout
    assert 'Argument "backend"' in result.stdout and 'Argument "on_error"' in result.stdout
