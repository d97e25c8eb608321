"""Run the same scenarios on every backend under every process profile, and print a matrix.

    python compat/run.py            # a table
    python compat/run.py --json     # the same as JSON

A *profile* restricts the process the way real deployments do (a container's seccomp profile, an
unprivileged user); each profile runs in a subprocess of its own, since a seccomp filter or a
dropped privilege cannot be undone. Inside it, every scenario runs on every backend in a forked child,
so a crash is a FAIL of that cell, not of the run. A cell is PASS, FAIL (with the reason), SKIP (the
scenario does not apply to that backend, with the reason) or N/A (the backend cannot run under that
profile: the reason from vrange.features()). Exit status 1 if any cell failed.

Kernel profiles (other kernels under qemu) are not here yet: today every profile runs on the kernel of
this machine, which the header names.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

PROFILES = {
    "native": "this process as it is",
    "seccomp-eperm": "userfaultfd denied with EPERM (Docker's default seccomp profile)",
    "seccomp-enosys": "userfaultfd denied with ENOSYS (other container runtimes)",
    "unprivileged": "uid 65534, no capabilities (user-mode-only userfaultfd at most)",
}
BACKENDS = ("uffd", "sigbus:uffd", "sigbus:memfd")  # backend specs: the sigbus backend per trap
CHUNK = 64 * 1024
SIZE = 16 * CHUNK
NOBODY = 65534


class Skip(Exception):
    """The scenario does not apply to this backend."""


# --- scenarios ----------------------------------------------------------------------------------------


def _pattern(offset: int, length: int) -> bytes:
    return bytes((position * 7 + 3) % 251 for position in range(offset, offset + length))


def _regenerate(offset: int, buffer: memoryview) -> None:
    buffer[:] = _pattern(offset, len(buffer))


def _purged(backend: str):  # type: ignore[no-untyped-def]
    import vrange

    region = vrange.Region(SIZE, _regenerate, backend=backend)
    region.mark_nonvolatile()
    region.mark_volatile()
    region.purge()
    return region


def first_touch(backend: str) -> None:
    import vrange

    with vrange.Region(SIZE, _regenerate, backend=backend) as region:
        assert bytes(region[:]) == _pattern(0, SIZE), "bytes differ"
        assert region.mark_nonvolatile() is False, "a first touch was reported as a purge"


def purge_and_refill(backend: str) -> None:
    with _purged(backend) as region:
        assert region.stats().resident_bytes == 0, "purge left pages resident"
        assert bytes(region[:]) == _pattern(0, SIZE), "bytes differ after refill"
        assert region.mark_nonvolatile() is True, "the purge was not reported"


def kernel_discard(backend: str) -> None:
    import vrange
    from vrange.testing import page_out

    if backend == "sigbus:memfd":
        raise Skip("the kernel cannot discard the memfd trap's pages by itself")
    with vrange.Region(SIZE, _regenerate, backend=backend) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        page_out(region)
        assert region.mark_nonvolatile(), "MADV_PAGEOUT discarded nothing"
        assert bytes(region[:]) == _pattern(0, SIZE), "bytes differ after refill"


def raw_syscall(backend: str) -> None:
    with _purged(backend) as region:
        read_end, write_end = os.pipe()
        view = memoryview(region)
        try:
            written = os.write(write_end, view[:4096])
            outcome = os.read(read_end, 4096) == _pattern(0, 4096) and written == 4096
        except OSError as error:
            outcome = error.errno
        finally:
            view.release()
            os.close(read_end)
            os.close(write_end)
        expected = True if backend == "uffd" else errno.EFAULT  # the documented behaviour
        assert outcome == expected, f"os.write gave {outcome!r}, documented: {expected!r}"


def io_write(backend: str) -> None:
    import vrange

    with _purged(backend) as region:
        read_end, write_end = os.pipe()
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(
            b"".join(iter(lambda: os.read(read_end, 65536), b""))))
        reader.start()
        view = memoryview(region)
        vrange.io.write(write_end, view)
        view.release()
        os.close(write_end)
        reader.join()
        os.close(read_end)
        assert received[0] == _pattern(0, SIZE), "bytes differ"


def native_file_source(backend: str) -> None:
    import tempfile

    import vrange

    content = os.urandom(SIZE)
    with tempfile.TemporaryFile() as file:
        file.write(content)
        file.flush()
        with vrange.Region(SIZE, vrange.sources.File(file.fileno()), backend=backend) as region:
            region.mark_nonvolatile()
            region.mark_volatile()
            region.purge()
            assert bytes(region[:]) == content, "bytes differ"


def gil_released_access(backend: str) -> None:
    try:
        import numpy
    except ImportError:
        raise Skip("needs numpy") from None
    with _purged(backend) as region:
        source = numpy.frombuffer(region, dtype=numpy.uint8)
        copy = numpy.empty_like(source)
        numpy.copyto(copy, source)
        del source
        assert copy.tobytes() == _pattern(0, SIZE), "bytes differ"


def fork_child(backend: str) -> None:
    with _purged(backend) as region:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if bytes(region[:]) == _pattern(0, SIZE) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child read wrong bytes"


SCENARIOS: dict[str, Callable[[str], None]] = {
    "first touch": first_touch,
    "purge and refill": purge_and_refill,
    "kernel discard": kernel_discard,
    "raw syscall on purged page": raw_syscall,
    "vrange.io.write from purged": io_write,
    "native File source": native_file_source,
    "GIL-released access (numpy)": gil_released_access,
    "fork child": fork_child,
}


# --- running a profile (in its own process) ------------------------------------------------------------


def apply_profile(name: str) -> str | None:
    """Restrict this process; returns why the profile cannot be applied, or None."""
    from vrange.testing import deny_userfaultfd

    if name == "native":
        return None
    if name in ("seccomp-eperm", "seccomp-enosys"):
        deny_userfaultfd(errno.EPERM if name == "seccomp-eperm" else errno.ENOSYS)
        return None
    if name == "unprivileged":
        if os.geteuid() != 0:
            return "needs root to drop privileges"
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return None
    return f"unknown profile {name!r}"


def run_cell(scenario: Callable[[str], None], backend: str) -> dict[str, str]:
    """Run one scenario in a forked child; report what happened."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            signal.alarm(60)  # a hang is a failure, not a stuck matrix
            scenario(backend)
            result = {"status": "PASS"}
        except Skip as skip:
            result = {"status": "SKIP", "reason": str(skip)}
        except BaseException as error:  # noqa: BLE001 - every failure is reported
            result = {"status": "FAIL", "reason": f"{type(error).__name__}: {error}"}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    data = b"".join(iter(lambda: os.read(read_end, 65536), b""))
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)  # type: ignore[no-any-return]
    if os.WIFSIGNALED(status):
        return {"status": "FAIL", "reason": f"killed by {signal.Signals(os.WTERMSIG(status)).name}"}
    return {"status": "FAIL", "reason": f"exited {os.waitstatus_to_exitcode(status)} silently"}


def _import_everything_first() -> None:
    """Import what the scenarios use while this process can still read every file (the
    unprivileged profile cannot read a Python installed under /root)."""
    import tempfile  # noqa: F401

    import vrange._backends.sigbus  # noqa: F401  (imported lazily by vrange.Region)
    import vrange._backends.uffd  # noqa: F401
    import vrange.io  # noqa: F401
    import vrange.testing  # noqa: F401

    try:
        import numpy  # noqa: F401
    except ImportError:
        pass


def _support(report, spec: str):  # type: ignore[no-untyped-def]
    """The backend's support entry, or its trap's where the spec names one."""
    name, _, trap = spec.partition(":")
    backend = report.backend(name)
    return report.trap(trap) if trap and backend.usable else backend


def run_profile(name: str) -> dict[str, object]:
    _import_everything_first()
    reason = apply_profile(name)
    if reason is not None:
        return {"profile": name, "unavailable": reason}
    import vrange

    report = vrange.features(refresh=True)
    cells: dict[str, dict[str, dict[str, str]]] = {}
    for backend in BACKENDS:
        support = _support(report, backend)
        for scenario_name, scenario in SCENARIOS.items():
            cell = (run_cell(scenario, backend) if support.usable
                    else {"status": "N/A", "reason": support.reason})
            cells.setdefault(scenario_name, {})[backend] = cell
    return {"profile": name, "userfaultfd": report.userfaultfd.access,
            "auto": report.auto_backend, "auto_trap": report.backend("sigbus").trap,
            "auto_reason": report.auto_reason, "cells": cells}


# --- the matrix ------------------------------------------------------------------------------------------


def collect() -> dict[str, object]:
    profiles = []
    for name in PROFILES:
        completed = subprocess.run([sys.executable, __file__, "--profile", name],
                                   capture_output=True, text=True, timeout=600, check=False)
        if completed.returncode != 0:
            profiles.append({"profile": name, "unavailable":
                             f"the profile's process failed: {completed.stderr.strip()[-500:]}"})
        else:
            profiles.append(json.loads(completed.stdout))
    return {"kernel": os.uname().release, "machine": os.uname().machine, "profiles": profiles}


def format_matrix(result: dict[str, object]) -> str:
    profiles = result["profiles"]
    assert isinstance(profiles, list)
    lines = [f"vrange compatibility matrix on Linux {result['kernel']} ({result['machine']})", ""]
    for profile in profiles:
        lines.append(f"{profile['profile']}: {PROFILES[profile['profile']]}")
        if "unavailable" in profile:
            lines.append(f"  not run: {profile['unavailable']}")
            continue
        lines.append(f"  userfaultfd: {profile['userfaultfd']}; auto: {profile['auto_reason']}")
    width = max(len(name) for name in SCENARIOS) + 2
    columns = [(p["profile"], b) for p in profiles if "cells" in p for b in BACKENDS]
    lines += ["", " " * width + "".join(f"{p[:14] + '/' + b:<28}" for p, b in columns)]
    totals: dict[str, int] = {}
    notes: dict[str, int] = {}  # reason -> its number in the footnotes
    for scenario in SCENARIOS:
        row = f"{scenario:<{width}}"
        for profile in profiles:
            if "cells" not in profile:
                continue
            for backend in BACKENDS:
                cell = profile["cells"][scenario][backend]
                status = cell["status"]
                totals[status] = totals.get(status, 0) + 1
                if "reason" in cell:
                    number = notes.setdefault(cell["reason"], len(notes) + 1)
                    status += f" [{number}]"
                row += f"{status:<28}"
        lines.append(row)
    lines += [""] + [f"[{number}] {note}" for note, number in notes.items()]
    lines += ["", "  ".join(f"{count} {status}" for status, count in sorted(totals.items()))]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--profile", choices=list(PROFILES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        print(json.dumps(run_profile(args.profile)))
        return 0
    result = collect()
    print(json.dumps(result, indent=2) if args.json else format_matrix(result))
    failed = any(cell["status"] == "FAIL" for profile in result["profiles"]  # type: ignore[union-attr]
                 if "cells" in profile for row in profile["cells"].values() for cell in row.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
