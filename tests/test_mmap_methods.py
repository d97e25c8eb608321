"""Every method a Region inherits from mmap.mmap either reads and writes the right bytes on purged
memory, on every backend, or is refused with a clear error (docs/pins.md, "mmap methods"). A
method Python adds to mmap.mmap later fails test_every_mmap_method_has_a_verdict until it is
reviewed here."""

from __future__ import annotations

import copy
import mmap
import pickle
from collections.abc import Iterator

import pytest
from conftest import CHUNK, PAGE, CountingRegenerator, pattern

import vrange
from vrange.testing import page_out

SIZE = 4 * CHUNK
FULL = pattern(0, SIZE)

VERDICTS = {
    # plain memory accesses by mmap's C code (GIL held): purged pages fault and are refilled
    "read": "access", "read_byte": "access", "readline": "access", "find": "access",
    "rfind": "access", "write": "access", "write_byte": "access", "move": "access",
    "__getitem__": "access", "__setitem__": "access",
    # no memory access
    "seek": "harmless", "tell": "harmless", "closed": "harmless", "__len__": "harmless",
    "__module__": "harmless",
    "flush": "harmless",  # msync of anonymous memory: changes nothing
    "__delitem__": "refused by mmap",
    "__reduce__": "refused by mmap", "__reduce_ex__": "refused by mmap",
    "__getstate__": "refused by mmap",
    # overridden by Region
    "close": "Region", "__enter__": "Region", "__exit__": "Region", "resize": "Region (refused)",
    "size": "Region", "madvise": "Region (destructive advice refused)", "__repr__": "Region",
    "__new__": "Region", "__init__": "Region",
}
OBJECT_METHODS = set(dir(object))


def test_every_mmap_method_has_a_verdict() -> None:
    names = {name for name in dir(mmap.mmap)
             if name not in OBJECT_METHODS or name in ("__reduce__", "__reduce_ex__",
                                                       "__getstate__", "__new__", "__init__",
                                                       "__repr__")}
    assert names <= set(VERDICTS), f"review these mmap.mmap methods: {names - set(VERDICTS)}"


@pytest.fixture
def discard(request: pytest.FixtureRequest) -> str:
    """``"purge"`` or ``"kernel"``: conftest pairs it with the backends where it exists (the kernel
    never discards memfd-trap pages, so that pair is not made)."""
    return str(request.param)


@pytest.fixture
def purged(discard: str, backend: str) -> Iterator[vrange.Region]:
    """A region whose every chunk was filled, marked volatile and discarded (by purge(), or by the
    kernel where it reclaims), so the method under test meets purged pages only."""
    regenerator = CountingRegenerator()
    with vrange.Region(SIZE, regenerator, backend=backend) as region:
        region.prefault()
        region.mark_volatile()
        if discard == "purge":
            assert region.purge() == SIZE
        else:
            page_out(region)
        yield region


def test_read_and_tell(purged: vrange.Region) -> None:
    purged.seek(CHUNK + 5)
    assert purged.read(3 * PAGE) == FULL[CHUNK + 5:CHUNK + 5 + 3 * PAGE]
    assert purged.tell() == CHUNK + 5 + 3 * PAGE
    purged.seek(-10, 2)
    assert purged.read() == FULL[-10:]


def test_read_byte(purged: vrange.Region) -> None:
    purged.seek(2 * CHUNK + 7)
    assert purged.read_byte() == FULL[2 * CHUNK + 7]


def test_readline(purged: vrange.Region) -> None:
    start = 3 * CHUNK + 11
    newline = FULL.find(b"\n", start)
    assert newline > 0
    purged.seek(start)
    assert purged.readline() == FULL[start:newline + 1]


def test_find_and_rfind(purged: vrange.Region) -> None:
    needle = FULL[3 * CHUNK + 100:3 * CHUNK + 112]
    assert purged.find(needle, CHUNK) == FULL.find(needle, CHUNK)
    assert purged.rfind(needle, 0, SIZE - PAGE) == FULL.rfind(needle, 0, SIZE - PAGE)
    assert purged.find(b"\xff" * 64) == -1        # reads every page, all refilled


def test_getitem(purged: vrange.Region) -> None:
    assert purged[CHUNK + 3] == FULL[CHUNK + 3]
    assert purged[2 * CHUNK:2 * CHUNK + PAGE] == FULL[2 * CHUNK:2 * CHUNK + PAGE]
    assert purged[::PAGE] == FULL[::PAGE]
    assert purged[-1] == FULL[-1]


def test_setitem_write_and_write_byte(purged: vrange.Region) -> None:
    purged.mark_nonvolatile()  # writes to volatile pages may be lost: pin first, keep them
    purged[CHUNK + 1] = 7
    purged[CHUNK + 8:CHUNK + 12] = b"abcd"
    purged.seek(2 * CHUNK + 10)
    assert purged.write(b"hello") == 5
    purged.write_byte(33)
    expected = bytearray(FULL)
    expected[CHUNK + 1] = 7
    expected[CHUNK + 8:CHUNK + 12] = b"abcd"
    expected[2 * CHUNK + 10:2 * CHUNK + 16] = b"hello!"
    assert bytes(purged[:]) == bytes(expected)


def test_writes_into_purged_volatile_pages_land_on_refilled_pages(purged: vrange.Region) -> None:
    purged.seek(CHUNK + 10)
    purged.write(b"mine")                     # the chunk is refilled first, then written
    page = purged[CHUNK:CHUNK + PAGE]
    assert page[10:14] == b"mine"
    assert page[:10] == FULL[CHUNK:CHUNK + 10] and page[14:] == FULL[CHUNK + 14:CHUNK + PAGE]


def test_move(purged: vrange.Region) -> None:
    purged.mark_nonvolatile()
    purged.move(CHUNK, 2 * CHUNK + PAGE, 3 * PAGE)  # both chunks purged
    assert purged[CHUNK:CHUNK + 3 * PAGE] == FULL[2 * CHUNK + PAGE:2 * CHUNK + 4 * PAGE]
    assert purged[CHUNK + 3 * PAGE:2 * CHUNK] == FULL[CHUNK + 3 * PAGE:2 * CHUNK]


def test_flush_changes_nothing(purged: vrange.Region) -> None:
    assert purged.flush() is None
    assert purged.flush(CHUNK, PAGE) is None
    assert purged[:] == FULL


def test_size_and_len(purged: vrange.Region) -> None:
    assert purged.size() == len(purged) == SIZE


def test_resize_is_refused(purged: vrange.Region) -> None:
    with pytest.raises(OSError, match="cannot be resized"):
        purged.resize(2 * SIZE)
    assert purged[:] == FULL


def test_pickling_copying_and_deleting_are_refused(purged: vrange.Region) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(purged)
    with pytest.raises(TypeError):
        copy.copy(purged)
    with pytest.raises(TypeError):
        del purged[0]


HARMLESS_ADVICE = ["MADV_NORMAL", "MADV_RANDOM", "MADV_SEQUENTIAL", "MADV_WILLNEED", "MADV_DOFORK",
                   "MADV_DONTDUMP", "MADV_DODUMP", "MADV_NOHUGEPAGE", "MADV_UNMERGEABLE",
                   "MADV_KEEPONFORK", "MADV_COLD", "MADV_PAGEOUT"]
REFUSED_ADVICE = {"MADV_DONTNEED": 4, "MADV_FREE": 8, "MADV_REMOVE": 9, "MADV_DONTFORK": 10,
                  "MADV_MERGEABLE": 12, "MADV_HUGEPAGE": 14, "MADV_WIPEONFORK": 18,
                  "MADV_POPULATE_READ": 22, "MADV_POPULATE_WRITE": 23,
                  "MADV_DONTNEED_LOCKED": 24, "MADV_COLLAPSE": 25, "MADV_HWPOISON": 100,
                  "MADV_SOFT_OFFLINE": 101, "MADV_GUARD_INSTALL": 102, "MADV_GUARD_REMOVE": 103}


def test_harmless_advice_keeps_every_byte(purged: vrange.Region) -> None:
    purged.mark_nonvolatile(0, CHUNK)
    purged[0:4] = b"kept"                       # a pinned write must survive every advice
    expected = b"kept" + FULL[4:]
    for name in HARMLESS_ADVICE:
        value = getattr(mmap, name, None)
        if value is None:
            continue
        try:
            purged.madvise(value)
            purged.madvise(value, CHUNK, CHUNK)
        except OSError as error:                 # advice this kernel lacks (EINVAL)
            assert "refused on a vrange.Region" not in str(error)
        assert purged[:] == expected, name


@pytest.mark.parametrize("name", sorted(REFUSED_ADVICE))
def test_destructive_advice_is_refused(backend: str, name: str) -> None:
    """The measured bug: madvise(MADV_DONTNEED) over a pinned chunk of the sigbus memfd trap
    made it read zeros. Every advice that may drop or change pages is refused now."""
    with vrange.Region(SIZE, CountingRegenerator(), backend=backend) as region:
        region.mark_nonvolatile()
        region[0:4] = b"kept"
        value = getattr(mmap, name, REFUSED_ADVICE[name])
        with pytest.raises(vrange.VRangeError, match=f"madvise\\({name}\\) is refused.*purge"):
            region.madvise(value)
        with pytest.raises(vrange.VRangeError, match="refused"):
            region.madvise(value, 0, PAGE)
        assert region[0:4] == b"kept"
        assert region[4:] == FULL[4:]


def test_madvise_checks_its_arguments(backend: str) -> None:
    with vrange.Region(SIZE, CountingRegenerator(), backend=backend) as region:
        with pytest.raises(TypeError):
            region.madvise("MADV_DONTNEED")  # type: ignore[arg-type]
        with pytest.raises(vrange.VRangeError, match="advice 999"):
            region.madvise(999)
        with pytest.raises(ValueError):
            region.madvise(mmap.MADV_NORMAL, SIZE + PAGE)   # mmap's own range check
    with pytest.raises(ValueError, match="closed"):
        region.madvise(mmap.MADV_NORMAL)
    with pytest.raises(ValueError, match="closed"):
        region.size()
