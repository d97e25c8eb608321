"""Descriptor hygiene, temporary files and privilege.

- Every descriptor vrange opens (userfaultfds, eventfds, memfds, File sources' copies, the sockets
  and buffer of an Isolated source's helper, the pressure monitor's files) is close-on-exec, and a
  program started with ``subprocess`` (``close_fds=False``) inherits none of them; neither does an
  Isolated source's helper, beyond the buffer and sockets it is handed on purpose.
- vrange creates no world-writable file in /tmp or /dev/shm (its memfds have no path).
- Nothing needs more privilege than the kernel demands: as uid 65534 vrange offers every backend and
  trap the kernel lets that user have, and each of them runs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Iterator

import pytest
from conftest import (CHUNK, PAGE, CountingRegenerator, kernel_reclaims, pattern, run_python,
                      usable_specs)

import vrange
from vrange import sources
from vrange.testing import page_out

# Every test in a child of its own: each opens process-wide descriptors (handler, trap, monitor)
# afresh, and the privilege test drops root for good.
pytestmark = pytest.mark.forked

O_CLOEXEC = 0o2000000
NOBODY = 65534
TESTS = os.path.dirname(os.path.abspath(__file__))


def descriptors(pid: int | str = "self") -> dict[int, tuple[str, int]]:
    """The open descriptors of a process: number -> (what it refers to, its flags)."""
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        except FileNotFoundError:  # the descriptor listdir used, or closed meanwhile
            continue
        table[int(name)] = (target, flags)
    return table


def children(task: str) -> list[int]:
    with open(f"/proc/self/task/{task}/children") as listing:
        return [int(pid) for pid in listing.read().split()]


def exercise(spec: str, path: str) -> list[vrange.Region]:
    """Regions of one backend with every kind of regenerator, each used so that its backend opens
    what it opens (handler threads and workers, traps, the pressure monitor); kept alive."""
    kept: list[vrange.Region] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_by_fd = sources.File(fd)
    finally:
        os.close(fd)
    regenerators: list[object] = [CountingRegenerator(), sources.Zeros(), sources.File(path),
                                  file_by_fd,
                                  sources.Isolated("isolated_regenerators:seeded_pattern", 7)]
    for regenerate in regenerators:
        region = vrange.Region(4 * CHUNK, regenerate, backend=spec,  # type: ignore[arg-type]
                               group="security")  # managed: the pressure monitor starts
        region[CHUNK]  # a first fill
        region.mark_volatile()
        assert region.purge() == CHUNK
        if kernel_reclaims(spec):
            page_out(region)
        with memoryview(region) as view:  # a syscall on a purged page (a worker on uffd)
            read_end, write_end = os.pipe()
            try:
                assert vrange.io.write(write_end, view[:PAGE]) == PAGE
            finally:
                os.close(read_end), os.close(write_end)
        region.mark_nonvolatile()
        kept.append(region)
    vrange.policy.set_budget(64 << 20, group="security")
    return kept


@pytest.fixture
def source_path() -> Iterator[str]:
    with tempfile.NamedTemporaryFile(prefix="vrange-security-") as file:
        file.write(pattern(0, 4 * CHUNK))
        file.flush()
        os.chmod(file.name, 0o644)  # readable by uid 65534 too
        yield file.name


def test_every_descriptor_vrange_opens_is_close_on_exec(report: vrange.Features,
                                                        source_path: str) -> None:
    before = descriptors()
    vrange.features(refresh=True)  # every probe: userfaultfds, memfds, pipes, /dev/userfaultfd
    assert descriptors() == before, "probing left descriptors open"
    specs = usable_specs(report)
    assert specs, "no backend can run here"
    kept = [region for spec in specs for region in exercise(spec, source_path)]
    opened = {fd: entry for fd, entry in descriptors().items() if before.get(fd) != entry}
    targets = [target for target, _ in opened.values()]
    print("descriptors vrange opened:", sorted(opened.items()))
    inheritable = {fd: (target, oct(flags)) for fd, (target, flags) in opened.items()
                   if not flags & O_CLOEXEC}
    assert not inheritable, f"descriptors without O_CLOEXEC: {inheritable}"
    # What each backend and source holds open while its regions live (so the check above saw it).
    if "uffd" in specs or "sigbus:uffd" in specs:
        assert "anon_inode:[userfaultfd]" in targets
    if "sigbus:memfd" in specs:
        assert any(target.startswith("/memfd:vrange-trap") for target in targets)
    assert any(target.startswith("/memfd:vrange-isolated") for target in targets)
    assert any(target.startswith("socket:") for target in targets)
    assert targets.count(os.path.realpath(source_path)) >= 2 * len(specs)  # File(path), File(fd)
    assert "anon_inode:[eventfd]" in targets  # the monitor's, and the uffd handler's
    assert all(os.get_inheritable(fd) is False for fd in opened)

    # A program started with every inheritable descriptor (close_fds=False) gets none of them.
    child = run_python(
        "import json, os; print(json.dumps({fd: os.readlink(f'/proc/self/fd/{fd}') "
        "for fd in os.listdir('/proc/self/fd') if os.path.exists(f'/proc/self/fd/{fd}')}))",
        flags=["-S"], close_fds=False, check=True)
    inherited = {int(fd): target for fd, target in json.loads(child.stdout).items()}
    leaked = {fd: target for fd, (target, _) in opened.items() if inherited.get(fd) == target}
    assert not leaked, f"a child program inherited {leaked}"

    # The Isolated sources' helpers get their buffer and their ends of the sockets, nothing else.
    helpers = [pid for task in os.listdir("/proc/self/task") for pid in children(task)]
    assert len(helpers) == len(specs)
    for helper in helpers:
        theirs = {target for target, _ in descriptors(helper).values()}
        handed = {target for target in targets if target.startswith("/memfd:vrange-isolated")}
        shared = theirs & (set(targets) - handed)
        assert not shared, f"the helper {helper} holds descriptors it was not handed: {shared}"
        assert "anon_inode:[userfaultfd]" not in theirs
    for region in kept:
        region.close()


# --- temporary files -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_BIND = 0x00020000, 1 << 14, 1 << 18, 4096

WORKLOAD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import vrange
    from conftest import run_python
    from test_security import exercise, usable_specs
    source = os.path.join({scratch!r}, "source")
    with open(source, "wb") as file:
        file.write(bytes(4 * 65536))
    report = vrange.features(refresh=True)
    kept = [region for spec in usable_specs(report) for region in exercise(spec, source)]
    for arguments in (["features"], ["features", "--json"]):
        run_python(module="vrange", args=arguments, check=True)
    pid = os.fork()  # a forked child's regions: its own handler, trap, helpers
    if pid == 0:
        for region in kept:
            region.purge()
            region[0]
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    print(len(kept), "regions on", ", ".join(usable_specs(report)))
""")


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _private_tmpfs(directory: str, keep: list[str]) -> set[str]:
    """Mount an empty tmpfs over ``directory`` in this mount namespace, with the paths in ``keep``
    (this checkout, its virtual environment) bound back in place; returns what was made for them."""
    held = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in keep
            if path.startswith(directory.rstrip("/") + "/")}
    _check(_libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, b"mode=1777"), "mount tmpfs")
    made = set()
    for path, fd in held.items():
        os.makedirs(path, exist_ok=True)
        parent = path
        while parent != directory:
            made.add(parent)
            parent = os.path.dirname(parent)
        _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND, None),
               f"bind {path}")
        os.close(fd)
    return made


def _new_entries(directory: str, made: set[str]) -> list[tuple[str, int]]:
    """Everything in the private tmpfs but what was made to bind paths back (and what is under
    those bound paths: another file system)."""
    root_device = os.stat(directory).st_dev
    found = []
    for base, directories, files in os.walk(directory):
        directories[:] = [name for name in directories
                          if os.lstat(os.path.join(base, name)).st_dev == root_device]
        for name in directories + files:
            path = os.path.join(base, name)
            if path not in made:
                found.append((path, os.lstat(path).st_mode))
    return found


NAMESPACE = textwrap.dedent("""
    import ctypes, json, os, sys, tempfile
    sys.path.insert(0, {tests!r})
    from conftest import run_python
    from test_security import CLONE_NEWNS, MS_PRIVATE, MS_REC, WORKLOAD, _check, _libc, \\
        _new_entries, _private_tmpfs
    if _libc.unshare(CLONE_NEWNS) != 0:
        print(json.dumps({{"skip": os.strerror(ctypes.get_errno())}}))
        sys.exit(0)
    try:
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
        made = {{directory: _private_tmpfs(directory, {keep!r})
                for directory in ("/tmp", "/dev/shm")}}
    except OSError as error:
        print(json.dumps({{"skip": str(error)}}))
        sys.exit(0)
    scratch = tempfile.mkdtemp(dir="/tmp")
    made["/tmp"].update((scratch, os.path.join(scratch, "source")))
    result = run_python(WORKLOAD.format(tests={tests!r}, scratch=scratch), timeout=120)
    print(json.dumps({{"returncode": result.returncode, "stdout": result.stdout,
                      "stderr": result.stderr,
                      "created": {{directory: _new_entries(directory, made[directory])
                                  for directory in ("/tmp", "/dev/shm")}}}}))
""")


@pytest.mark.requires("root", "(to make a mount namespace)")
def test_no_world_writable_temporary_files() -> None:
    """Run every backend, source and probe (and the CLI, and a forked child) in a mount namespace
    with private, empty /tmp and /dev/shm: whatever appears there was made by vrange (or this
    test's own scratch directory, left out)."""
    paths = sorted({os.path.realpath(path) for path in (
        TESTS, sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.dirname(vrange.__file__)))})
    keep = [path for path in paths  # bind each tree once
            if not any(path.startswith(other + "/") for other in paths)]
    outcome = run_python(NAMESPACE.format(tests=TESTS, keep=keep), timeout=180)
    assert outcome.returncode == 0, outcome.stderr
    result = json.loads(outcome.stdout)
    if "skip" in result:
        pytest.skip(f"cannot make a mount namespace: {result['skip']}")
    assert result["returncode"] == 0, result["stderr"]
    assert "regions" in result["stdout"]
    created = result["created"]
    print(result["stdout"].strip(), "; created in /tmp and /dev/shm:", created)
    world_writable = [(path, oct(mode)) for entries in created.values() for path, mode in entries
                      if mode & 0o002]
    assert not world_writable, f"world-writable files: {world_writable}"
    assert not created["/dev/shm"], f"vrange made files in /dev/shm: {created['/dev/shm']}"
    leftovers = [path for path, _ in created["/tmp"] if "__pycache__" not in path]
    assert not leftovers, f"vrange left files in /tmp: {leftovers}"


# --- privilege -----------------------------------------------------------------------------------

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "ppc64le": 364,
                   "s390x": 355}.get(platform.machine())
UFFD_USER_MODE_ONLY = 1


def kernel_grants_userfaultfd(flags: int) -> bool:
    """Does the kernel itself give this process a userfaultfd (system call or /dev/userfaultfd)?"""
    assert SYS_USERFAULTFD is not None
    fd = _libc.syscall(SYS_USERFAULTFD, O_CLOEXEC | flags)
    if fd >= 0:
        os.close(fd)
        return True
    assert ctypes.get_errno() in (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS)
    return os.access("/dev/userfaultfd", os.R_OK | os.W_OK)


def run_region(spec: str, regenerate: object, expected: bytes) -> None:
    size = len(expected)
    with vrange.Region(size, regenerate, backend=spec) as region:  # type: ignore[arg-type]
        assert region[:] == expected
        region.mark_volatile()
        assert region.purge() == size
        assert region[:] == expected  # refilled
        if kernel_reclaims(spec):
            page_out(region)
            assert region[:] == expected
        assert region.mark_nonvolatile(report=True) == [(0, size)]
        with memoryview(region) as view:
            read_end, write_end = os.pipe()
            try:
                assert vrange.io.write(write_end, view[:PAGE]) == PAGE
                assert os.read(read_end, PAGE) == expected[:PAGE]
            finally:
                os.close(read_end), os.close(write_end)
        assert region.stats().regeneration_errors == 0


def as_nobody(function: Callable[[], None]) -> None:
    """Run ``function`` in a forked child that drops root for good (setgroups, setgid, setuid to
    65534); its failure, with its traceback, is this call's."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_end)
            function()
        except BaseException:  # noqa: BLE001 - reported to the parent
            os.write(write_end, traceback.format_exc().encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"as uid 65534:\n{report}"


@pytest.mark.requires("root", "(to drop privileges)")
def test_an_unprivileged_process_runs_every_backend_the_kernel_allows(source_path: str) -> None:
    if SYS_USERFAULTFD is None:
        pytest.skip(f"the userfaultfd system call number of {platform.machine()} is not known here")
    as_nobody(lambda: unprivileged_backends(source_path))


def unprivileged_backends(source_path: str) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    assert os.getuid() == os.geteuid() == NOBODY and os.getgroups() == []
    with pytest.raises(PermissionError):
        os.setuid(0)  # for good
    report = vrange.features()  # probed again by itself: the effective uid changed
    assert report.userfaultfd.cap_sys_ptrace is False
    # What the kernel allows uid 65534, found without vrange; vrange must offer all of it.
    full = kernel_grants_userfaultfd(0)
    user_mode_only = full or kernel_grants_userfaultfd(UFFD_USER_MODE_ONLY)
    try:
        os.close(os.memfd_create("probe", os.MFD_CLOEXEC))
        memfd = True
    except OSError:
        memfd = False
    allowed = {"uffd": full, "sigbus:uffd": user_mode_only, "sigbus:memfd": memfd}
    for spec, kernel_allows in allowed.items():
        if kernel_allows:
            assert spec in usable_specs(report), \
                f"{spec}: the kernel allows it, vrange refuses: {report.backend(spec.split(':')[0])}"
        else:
            assert spec not in usable_specs(report), f"{spec}: vrange offers what the kernel denies"
    with open(source_path, "rb") as file:
        data = file.read()
    ran = []
    for spec in usable_specs(report):
        run_region(spec, CountingRegenerator(), pattern(0, 4 * CHUNK))
        run_region(spec, sources.Zeros(), bytes(4 * CHUNK))
        run_region(spec, sources.File(source_path), data)
        ran.append(spec)
    with vrange.Region(4 * CHUNK, sources.Zeros()) as region:  # auto picks what this user has
        assert region[0] == 0
        assert (region.backend if region.backend == "uffd" else f"sigbus:{region.trap}") in ran
    assert ran, "no backend runs for uid 65534"
    # On stock kernels (vm.unprivileged_userfaultfd=0, /dev/userfaultfd root-only) that is the
    # sigbus backend with the userfaultfd trap: the kernel still reclaims what is volatile.
    if user_mode_only:
        assert "sigbus:uffd" in ran
