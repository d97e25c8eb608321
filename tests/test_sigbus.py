"""What only the sigbus backend has: signal hygiene (on both traps) and mapping-count limits."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

import vrange
from conftest import run_python as run_python_in
from vrange import sources
from vrange._backends.sigbus import MAX_MEMFD_TRAP_CHUNKS as SIGBUS_MAX_CHUNKS

# What a test of the SIGBUS handler's hygiene needs: it runs on both traps.
sigbus_handler = pytest.mark.requires("sigbus_handler", "(it tests the SIGBUS handler)")

PRELUDE = """
        SPEC = BACKEND
        import faulthandler, mmap, tempfile
        from vrange import sources
        def truncated_mapping_access():
            with tempfile.TemporaryFile() as file:
                file.write(b"x" * 8192)
                file.flush()
                mapping = mmap.mmap(file.fileno(), 8192)
                file.truncate(0)
                print("touching", flush=True)
                return mapping[4096]   # beyond the end of the file: SIGBUS that is not vrange's
        def purged_region():
            region = vrange.Region(1 << 20, sources.Zeros(), backend=SPEC)
            region[0:3] = b"abc"
            region.mark_volatile()
            region.purge()
            return region
"""


def run_python(script: str, spec: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, after ``PRELUDE`` (``SPEC`` is the backend spec)."""
    return run_python_in(script, backend=spec, prelude=PRELUDE)


@sigbus_handler
def test_foreign_sigbus_still_kills_the_process(backend: str) -> None:
    result = run_python("""
        region = purged_region()
        assert bytes(region[0:3]) == bytes(3)   # vrange's own traps are served
        truncated_mapping_access()
        print("survived", flush=True)
    """, backend)
    assert result.returncode == -signal.SIGBUS, result.stderr
    assert "touching" in result.stdout and "survived" not in result.stdout


@sigbus_handler
def test_faulthandler_installed_first_still_reports_foreign_sigbus(backend: str) -> None:
    result = run_python("""
        faulthandler.enable()
        region = purged_region()
        assert bytes(region[0:3]) == bytes(3)
        truncated_mapping_access()
    """, backend)
    assert result.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in result.stderr
    assert "truncated_mapping_access" in result.stderr  # faulthandler's Python traceback


@sigbus_handler
def test_a_replaced_handler_is_detected_and_vrange_goes_back_in_front(backend: str) -> None:
    result = run_python("""
        import logging
        logging.basicConfig()        # vrange's logger says it (it has only a NullHandler)
        region = purged_region()
        faulthandler.enable()        # replaces vrange's SIGBUS handler
        region.purge()               # vrange notices, re-installs itself, chains to faulthandler
        assert bytes(region[0:3]) == bytes(3), "trap not served"
        print("served", flush=True)
        truncated_mapping_access()
    """, backend)
    assert "served" in result.stdout, result.stderr
    assert "another SIGBUS handler replaced vrange's" in result.stderr
    assert result.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in result.stderr


@sigbus_handler
def test_errno_is_preserved_across_a_served_fault(backend: str) -> None:
    result = run_python("""
        import ctypes, errno
        region = purged_region()
        ctypes.set_errno(errno.ENOTTY)
        value = ctypes.c_char.from_address(region.address + 70000).value   # served in the handler
        assert value == b"\\0"
        assert ctypes.get_errno() == errno.ENOTTY, ctypes.get_errno()
        print("ok", flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def _map_count() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


@pytest.mark.forked
@pytest.mark.hang_timeout(120)
@pytest.mark.requires("sigbus_memfd_trap", "(its chunks take a mapping each)")
def test_large_region_with_scattered_purges_stays_far_from_max_map_count() -> None:
    size = 1 << 30
    region = vrange.Region(size, sources.Zeros(), backend="sigbus:memfd")
    try:
        chunk = region.chunk_size
        assert chunk == size // SIGBUS_MAX_CHUNKS == 128 * 1024  # raised from 64 KiB
        before = _map_count()
        chunks = size // chunk
        for index in range(0, chunks, 2):  # every other chunk: the most mappings it can take
            region[index * chunk] = index % 251 + 1
        region.mark_volatile(0, size // 2)
        for index in range(0, chunks // 2, 6):  # scattered purges in the volatile half
            region.purge(index * chunk, chunk)
        peak = _map_count() - before
        assert peak <= 2 * SIGBUS_MAX_CHUNKS, peak
        with open("/proc/sys/vm/max_map_count") as limit:
            assert _map_count() < int(limit.read()) // 2
        for index in range(0, chunks, 2):
            purged = index < chunks // 2 and index % 6 == 0
            expected = 0 if purged else index % 251 + 1
            assert region[index * chunk] == expected, index
        assert region.mark_nonvolatile(0, size // 2) is True
    finally:
        region.close()


@pytest.mark.forked
@pytest.mark.hang_timeout(120)
@pytest.mark.requires("sigbus_uffd_trap", "(it keeps a region in one mapping)")
def test_uffd_trap_keeps_the_chunk_size_and_adds_no_mappings() -> None:
    size = 1 << 30
    with vrange.Region(size, sources.Zeros(), backend="sigbus:uffd") as region:
        chunk = region.chunk_size
        assert chunk == vrange.DEFAULT_CHUNK_SIZE  # no cap on the number of chunks
        assert size // chunk > SIGBUS_MAX_CHUNKS
        before = _map_count()
        for index in range(0, size // chunk, 2):
            region[index * chunk] = index % 251 + 1
        region.mark_volatile(0, size // 2)
        for index in range(0, size // chunk // 2, 6):
            region.purge(index * chunk, chunk)
        assert _map_count() - before <= 2  # one VMA, whatever happens inside it
        for index in range(0, size // chunk, 2):
            purged = index < size // chunk // 2 and index % 6 == 0
            assert region[index * chunk] == (0 if purged else index % 251 + 1), index
        assert region.mark_nonvolatile(0, size // 2) is True


@pytest.mark.requires("sigbus_uffd_trap", "(the kernel makes its pages missing by itself)")
def test_a_handler_replaced_later_is_taken_back_by_the_watchdog() -> None:
    """On the userfaultfd trap the kernel makes pages missing with no vrange call in between: the
    monitor's thread notices a replaced SIGBUS handler and puts vrange's back in front."""
    result = run_python("""
        import time, vrange.policy, vrange.testing
        region = vrange.Region(1 << 20, sources.Zeros(), backend=SPEC)
        region[0:3] = b"abc"
        region.mark_volatile()
        faulthandler.enable()                       # replaces vrange's handler
        deadline = time.monotonic() + 10
        while vrange.policy.stats().handler_reinstalls == 0:
            assert time.monotonic() < deadline, "the watchdog never re-installed the handler"
            time.sleep(0.01)
        vrange.testing.page_out(region)             # as memory pressure would
        assert bytes(region[0:3]) == bytes(3), "trap not served"
        print("served", flush=True)
        truncated_mapping_access()                  # still reaches faulthandler, chained
    """, "sigbus:uffd")
    assert "served" in result.stdout, result.stderr
    assert result.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in result.stderr


@pytest.mark.forked
@pytest.mark.requires("sigbus_uffd_trap", "(its region moves to the memfd trap in the child)")
@pytest.mark.requires("root", "(to install a seccomp filter)")
def test_a_forked_child_without_userfaultfd_falls_back_to_the_memfd_trap() -> None:
    """The child's copy of the mapping is not registered; if the child cannot open a userfaultfd,
    the region moves to the memfd trap instead of handing out zeros."""
    from conftest import CountingRegenerator, pattern

    from vrange.testing import deny_userfaultfd

    region = vrange.Region(1 << 20, CountingRegenerator(), backend="sigbus:uffd")
    region.mark_nonvolatile(0, 1 << 19)              # pinned half, then a volatile half
    region.mark_volatile(1 << 19)
    region[1 << 19:(1 << 19) + 4] = bytes(region[1 << 19:(1 << 19) + 4])
    deny_userfaultfd(include_dev=True)
    pid = os.fork()
    if pid == 0:
        try:
            ok = region.trap == "memfd" and not region.kernel_reclaims and region.managed
            region.purge()
            ok = ok and bytes(region[:]) == pattern(0, 1 << 20)
            region.mark_volatile()
            region.purge()
            ok = ok and region.mark_nonvolatile() is True and bytes(region[:]) == pattern(0, 1 << 20)
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert region.trap == "uffd"                      # the parent is untouched
    region.close()


@pytest.mark.forked
@pytest.mark.requires("sigbus_memfd_trap", "(its regions reserve mappings)")
def test_memfd_trap_regions_reserve_their_mappings_from_a_process_wide_budget(
        report: vrange.Features) -> None:
    """Several memfd-trap regions cannot exhaust vm.max_map_count together (each keeps a refilled
    chunk in a mapping of its own): each reserves its worst case, one beyond the budget is refused
    with a clear error at creation, and closing one gives its share back."""
    size = 512 << 20  # 8192 chunks of 64 KiB: 8193 mappings at worst
    budget = report.mappings().budget
    fit = budget // (size // vrange.DEFAULT_CHUNK_SIZE + 1)
    regions = [vrange.Region(size, sources.Zeros(), backend="sigbus:memfd") for _ in range(fit)]
    try:
        assert all(region.stats().mappings_reserved == 8193 for region in regions)
        assert report.mappings().reserved == 8193 * fit
        with pytest.raises(vrange.VRangeError, match="max_map_count.*chunk_size"):
            vrange.Region(size, sources.Zeros(), backend="sigbus:memfd")
        assert report.mappings().reserved == 8193 * fit  # the refused one reserved nothing
        if report.trap("uffd").usable:  # the other trap keeps a region in one mapping
            with vrange.Region(size, sources.Zeros(), backend="sigbus:uffd") as one_mapping:
                assert one_mapping.stats().mappings_reserved == 0
        regions.pop().close()
        assert report.mappings().reserved == 8193 * (fit - 1)
        regions.append(vrange.Region(size, sources.Zeros(), backend="sigbus:memfd"))
    finally:
        for region in regions:
            region.close()
    assert report.mappings().reserved == 0


@pytest.mark.hang_timeout(120)
@pytest.mark.requires("sigbus_memfd_trap", "(its regions reserve mappings)")
def test_memfd_trap_worst_case_fits_and_a_refused_mapping_is_a_clear_error() -> None:
    """A process close to vm.max_map_count (its own mappings split page by page, in a child; the
    limit itself is left alone): a region whose worst case does not fit is refused at creation; one
    that fits refills every other chunk (its worst case) without dying; and once the process is at
    the limit, mark_nonvolatile raises a RegenerationError that names vm.max_map_count instead of
    blaming the source."""
    result = run_python("""
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        PAGE, CHUNK = mmap.PAGESIZE, vrange.DEFAULT_CHUNK_SIZE
        limit = vrange.features().mappings().max_map_count
        def map_count():
            with open("/proc/self/maps") as maps:
                return sum(1 for _ in maps)
        padding = mmap.mmap(-1, 2 * limit * PAGE)  # virtual only: never touched
        base = ctypes.addressof(ctypes.c_char.from_buffer(padding))
        next_page = 0
        def split(pages):  # each read-only page amid the padding is two more mappings
            global next_page
            for _ in range(pages):
                if libc.mprotect(base + next_page * PAGE, PAGE, 1) != 0:
                    return ctypes.get_errno()
                next_page += 2
            return 0
        split((limit - 2000 - map_count()) // 2)
        try:
            vrange.Region(2048 * CHUNK, sources.Zeros(), backend=SPEC)
            raise AssertionError("a region beyond the free mappings was created")
        except vrange.VRangeError as error:
            assert "max_map_count" in str(error), error
        region = vrange.Region(512 * CHUNK, sources.Zeros(), backend=SPEC)
        before = map_count()
        for chunk in range(0, 512, 2):   # every other chunk: the most mappings it can take
            region[chunk * CHUNK] = 1
        used = map_count() - before
        assert 0 < used <= region.stats().mappings_reserved, used
        region.mark_volatile()
        region.purge()
        assert split(limit) == errno.ENOMEM  # now at the limit: refills cannot get a mapping
        try:
            region.mark_nonvolatile()
            raise AssertionError("mark_nonvolatile succeeded past vm.max_map_count")
        except vrange.RegenerationError as error:
            message = str(error)
            assert "vm.max_map_count" in message and "ENOMEM" in message, message
            assert "native source" not in message, message
        print("ok", used, flush=True)
    """, "sigbus:memfd")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


@pytest.mark.requires("sigbus_memfd_trap", "(its regions reserve mappings)")
def test_fork_while_another_thread_reserves_mappings_never_hangs_the_child() -> None:
    """The budget's lock re-created in a forked child: a fork while another thread held it (it
    creates memfd-trap regions in a loop) left the child's close() waiting for ever."""
    result = run_python("""
        import signal, threading
        CHUNK = vrange.DEFAULT_CHUNK_SIZE
        stop = threading.Event()
        def churn():
            while not stop.is_set():
                vrange.Region(64 * CHUNK, sources.Zeros(), backend=SPEC).close()
        mine = vrange.Region(4 * CHUNK, sources.Zeros(), backend=SPEC)
        thread = threading.Thread(target=churn)
        thread.start()
        codes = set()
        for attempt in range(60):
            pid = os.fork()
            if pid == 0:
                signal.alarm(5)  # a hang dies with SIGALRM
                mine.close()
                vrange.features().mappings()
                os._exit(0)
            codes.add(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        stop.set()
        thread.join()
        print("codes", sorted(codes), flush=True)
    """, "sigbus:memfd")
    assert "codes [0]" in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.mark.requires("sigbus_uffd_trap", "(its region cannot move to the memfd trap)")
@pytest.mark.requires("root", "(to install a seccomp filter)")
def test_a_region_the_memfd_trap_cannot_take_over_in_a_child_is_fenced_not_fatal() -> None:
    """A uffd-trap region whose worst case does not fit the mapping budget cannot move to the memfd
    trap in a child without userfaultfd (it would die at vm.max_map_count): its calls raise a clear
    error and a raw access faults (SIGSEGV) instead."""
    result = run_python("""
        from vrange.testing import deny_userfaultfd
        region = vrange.Region(512 << 20, sources.Zeros(), backend="sigbus:uffd", chunk_size=4096)
        deny_userfaultfd(include_dev=True)
        pid = os.fork()
        if pid == 0:
            try:
                region.mark_nonvolatile()
                os._exit(3)
            except vrange.VRangeError as error:
                print("refused:", "memfd trap cannot take it over" in str(error), flush=True)
            print("reserved:", vrange.features().mappings().reserved, flush=True)
            region[0]
            os._exit(4)
        print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    """, "sigbus:uffd")
    assert "refused: True" in result.stdout and "reserved: 0" in result.stdout, \
        result.stdout + result.stderr[-2000:]
    assert f"child {-signal.SIGSEGV}" in result.stdout, result.stdout


# The size of the sigbus backend's process-wide table of regions (VR_SIGBUS_MAX_REGIONS in
# _native/sigbus.c): its SIGBUS handler looks a faulting address up there, without locks.
SIGBUS_MAX_REGIONS = 4096


@sigbus_handler
@pytest.mark.hang_timeout(120)
def test_a_full_region_table_refuses_new_regions_clearly_and_closing_one_makes_room(
        backend: str) -> None:
    """Beyond the table's 4096 regions a new sigbus region is refused with a VRangeOSError (EMFILE)
    that says why, leaving no descriptor or mapping behind; the regions already made keep working
    (a purged page is refilled by the handler); closing one lets the next one in."""
    result = run_python(f"""
        import errno, resource
        MAX_REGIONS = {SIGBUS_MAX_REGIONS}
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = MAX_REGIONS + 1024  # the memfd trap holds a descriptor per region
        if hard != resource.RLIM_INFINITY and hard < wanted:
            print("skip: RLIMIT_NOFILE hard limit", hard, flush=True)
            sys.exit(0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
        PAGE = mmap.PAGESIZE
        def usage():
            with open("/proc/self/maps") as maps:
                return len(os.listdir("/proc/self/fd")), sum(1 for _ in maps)
        def refused():
            try:
                vrange.Region(PAGE, sources.Zeros(), backend=SPEC)
            except vrange.VRangeError as error:
                return error
            return None
        def works(region, value):
            region[0:1] = bytes([value])
            if region[0] != value:
                return False
            region.mark_volatile()
            if region.purge() != PAGE:
                return False
            return bytes(region[0:PAGE]) == bytes(PAGE) and region.mark_nonvolatile() is True
        regions = []
        error = None
        while error is None and len(regions) <= MAX_REGIONS:
            try:
                regions.append(vrange.Region(PAGE, sources.Zeros(), backend=SPEC))
            except vrange.VRangeError as caught:
                error = caught
        print("created", len(regions), flush=True)
        print("refused", isinstance(error, vrange.VRangeOSError),
              getattr(error, "errno", None) == errno.EMFILE,
              "too many sigbus regions are open" in str(error), flush=True)
        before = usage()
        print("refused again", refused() is not None, usage() == before, flush=True)
        print("the made ones work", all(works(regions[index], index % 251 + 1)
                                         for index in (0, len(regions) // 2, len(regions) - 1)),
              flush=True)
        regions.pop().close()
        regions.append(vrange.Region(PAGE, sources.Zeros(), backend=SPEC))
        print("room after a close", works(regions[-1], 7), refused() is not None, flush=True)
        for region in regions:
            region.close()
        with vrange.Region(PAGE, sources.Zeros(), backend=SPEC) as region:
            print("all closed", works(region, 9), flush=True)
    """, backend)
    if result.stdout.startswith("skip: "):
        pytest.skip(f"needs {SIGBUS_MAX_REGIONS + 1024} descriptors: {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert f"created {SIGBUS_MAX_REGIONS}\n" in result.stdout, result.stdout
    for line in ("refused True True True", "refused again True True", "the made ones work True",
                 "room after a close True True", "all closed True"):
        assert line in result.stdout, (line, result.stdout, result.stderr[-2000:])
