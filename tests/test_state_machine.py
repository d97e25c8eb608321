"""Stateful property test: random sequences of public Region calls, on several regions at once, agree
with a pure-Python model of every region's bytes, chunk states and counters, on every backend.

The model is exact. The one choice the kernel makes (which pages MADV_PAGEOUT discards) is read back
from /proc/self/pagemap right after ``vrange.testing.page_out`` and checked against the contract (only
pages of volatile chunks in the range may go); from then on the model knows which pages are missing.
After every step each open region's page presence (pagemap), the bytes of its present pages, its
``stats()`` and its regenerator's call count must equal the model's.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import CHUNK, PAGE, dropped_open, kernel_reclaims
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)
from isolated_regenerators import seeded_bytes

import vrange
from vrange import sources
from vrange.testing import page_out

# Each backend runs in a child of its own: a crash in the native core fails one test, not the run,
# and the sigbus backend's process-wide SIGBUS handler does not outlive the test.
pytestmark = [pytest.mark.forked, pytest.mark.hang_timeout(120)]

# About 6,000 steps per backend, 5 to 10 s each on 2 CPUs (every step checks every open region).
SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])

MAX_OPEN_REGIONS = 2
FILE_LENGTH = 5 * CHUNK // 2 + 123  # a File source shorter than some regions: its tail reads as zeros
PAGEMAP_PRESENT, PAGEMAP_SWAPPED = 1 << 63, 1 << 62


def _swap_configured() -> bool:
    with open("/proc/swaps") as swaps:
        return len(swaps.read().splitlines()) > 1


SWAP = _swap_configured()


def say(text: str) -> None:
    """Each call the machine makes, in the report of a failing example ($VRANGE_TRACE: as it runs)."""
    note(text)
    if os.environ.get("VRANGE_TRACE"):
        print(text, file=sys.stderr)


def mapped_pages(address: int, count: int) -> list[bool]:
    """For each page: does it hold data (present in memory, or swapped out)? A page the kernel or
    vrange discarded, or never filled, holds none: its next access is a fault vrange serves."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, 8 * count, address // PAGE * 8)
    finally:
        os.close(fd)
    return [bool(entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED))
            for entry in struct.unpack(f"<{count}Q", raw)]


class SeededRegenerator:
    """A deterministic Python regenerator (a different pattern per seed) that counts its calls."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.calls = 0

    def __call__(self, offset: int, buf: memoryview) -> None:
        self.calls += 1
        buf[:] = seeded_bytes(self.seed, offset, len(buf))


def file_bytes(data: bytes, file_offset: int, offset: int, length: int) -> bytes:
    """What a File source over ``data`` from ``file_offset`` holds at ``offset``: zeros past its end."""
    part = data[file_offset + offset:file_offset + offset + length]
    return part + bytes(length - len(part))


PURGE_REASONS = ("explicit", "pressure", "budget", "kernel")
COUNTERS = ("faults_served", "faults_on_handler_thread", "faults_on_faulting_thread",
            "faults_on_worker_thread", "bytes_regenerated", "regeneration_errors", "purges",
            "volatile_refills")


class RegionModel:
    """What one region must hold and report."""

    def __init__(self, number: int, region: vrange.Region, source_kind: str,
                 source_bytes: Callable[[int, int], bytes],
                 regenerator: SeededRegenerator | None) -> None:
        self.number = number
        self.region: vrange.Region | None = region
        self.closed = False
        self.source_kind = source_kind
        self.source_bytes = source_bytes
        self.regenerator = regenerator
        self.size = len(region)
        self.chunk = region.chunk_size
        self.kernel_reclaims = region.kernel_reclaims
        self.pages = self.size // PAGE
        self.chunks = -(-self.size // self.chunk)
        self.pages_per_chunk = self.chunk // PAGE
        self.content = bytearray(self.size)  # meaningful for present pages only
        self.present = [False] * self.pages
        self.volatile = [False] * self.chunks
        self.pins = [0] * self.chunks  # mark_nonvolatile's pins not yet released (docs/pins.md)
        self.wants_volatile = [False] * self.chunks  # volatile once no pin holds it
        self.materialized = [False] * self.chunks
        self.purged = [False] * self.chunks   # since it was last pinned (the report)
        self.counted = [False] * self.chunks  # discarded by purge(): its refill is no kernel purge
        self.held = [0] * self.chunks
        self.fills = 0
        self.bytes_regenerated = 0
        self.volatile_refills = 0
        self.purges = dict.fromkeys(PURGE_REASONS, 0)
        self.bytes_purged = dict.fromkeys(PURGE_REASONS, 0)
        self.last_stats: vrange.RegionStats | None = None

    def __repr__(self) -> str:
        return f"<region {self.number}: {self.size // PAGE} pages, chunk {self.chunk // PAGE} " \
               f"pages, {self.source_kind}{', closed' if self.closed else ''}>"

    # --- geometry ---

    def chunk_length(self, chunk: int) -> int:
        return min(self.chunk, self.size - chunk * self.chunk)

    def chunk_pages(self, chunk: int) -> range:
        first = chunk * self.pages_per_chunk
        return range(first, first + self.chunk_length(chunk) // PAGE)

    def touching(self, offset: int, length: int) -> range:
        """Chunks a range touches (mark_nonvolatile, prefault, purge, held_for_io widen to these)."""
        if length == 0:
            return range(0)
        return range(offset // self.chunk, -(-(offset + length) // self.chunk))

    def inside(self, offset: int, length: int) -> range:
        """Chunks a range covers whole (mark_volatile rounds inward); the tail chunk counts as
        whole when the range reaches the region's end."""
        end_offset = offset + length
        end = self.chunks if end_offset == self.size else end_offset // self.chunk
        return range(-(-offset // self.chunk), max(end, -(-offset // self.chunk)))

    def merged(self, chunks: list[int]) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        for chunk in chunks:
            start, length = chunk * self.chunk, self.chunk_length(chunk)
            if ranges and sum(ranges[-1]) == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
        return ranges

    # --- transitions ---

    def fill(self, chunk: int, held: bool = False) -> None:
        """A chunk with a missing page is regenerated whole; only its missing pages are written."""
        if self.materialized[chunk]:  # filled before: somebody discarded it
            self.purged[chunk] = True
            if not self.counted[chunk]:
                self.purges["kernel"] += 1
            self.counted[chunk] = False
        for page in self.chunk_pages(chunk):
            if not self.present[page]:
                self.content[page * PAGE:(page + 1) * PAGE] = self.source_bytes(page * PAGE, PAGE)
                self.present[page] = True
        self.materialized[chunk] = True
        self.fills += 1
        self.bytes_regenerated += self.chunk_length(chunk)
        # A refill of a volatile chunk makes it lazy-free again (unless held for a system call).
        if self.volatile[chunk] and self.kernel_reclaims and not held:
            self.volatile_refills += 1

    def fill_missing(self, chunks: range, held: bool = False) -> None:
        for chunk in chunks:
            if not all(self.present[page] for page in self.chunk_pages(chunk)):
                self.fill(chunk, held)

    def pin(self, chunks: range, populate: bool) -> list[int]:
        """A pin (mark_nonvolatile, or entering a pinned() block) of the chunks: not volatile
        from now on, filled (populate) or only kept; returns the chunks it reports purged."""
        for chunk in chunks:  # unpinned first: no refill below makes them lazy-free again
            self.volatile[chunk] = False
        if populate:
            self.fill_missing(chunks)
        purged = []
        for chunk in chunks:
            missing = not all(self.present[page] for page in self.chunk_pages(chunk))
            if self.materialized[chunk] and (self.purged[chunk] or missing):
                purged.append(chunk)
            if not populate and self.materialized[chunk] and missing:
                # Reported now; its refill on access is a first touch, not a second purge.
                if not self.counted[chunk]:
                    self.purges["kernel"] += 1
                self.materialized[chunk] = self.counted[chunk] = False
            self.purged[chunk] = False
        return purged

    def access(self, start: int, end: int) -> None:
        """A load or store on bytes [start, end): each missing page faults in its chunk."""
        for page in range(start // PAGE, -(-end // PAGE) if end > start else 0):
            if not self.present[page]:
                self.fill(page // self.pages_per_chunk)

    def purge(self, chunks: range) -> int:
        freed = 0
        for chunk in chunks:
            if not (self.volatile[chunk] and self.materialized[chunk]) or self.held[chunk]:
                continue
            present = sum(self.present[page] for page in self.chunk_pages(chunk))
            if not present:
                continue  # nothing left to give back (the kernel took it all): not a purge
            for page in self.chunk_pages(chunk):
                self.present[page] = False
            self.purged[chunk] = self.counted[chunk] = True
            self.purges["explicit"] += 1
            self.bytes_purged["explicit"] += present * PAGE
            freed += present * PAGE
        return freed

    def expected_stats(self) -> dict[str, Any]:
        resident = sum(self.present) * PAGE
        purged = sum(PAGE for chunk in range(self.chunks) if self.materialized[chunk]
                     for page in self.chunk_pages(chunk) if not self.present[page])
        volatile = sum(self.chunk_length(chunk) for chunk in range(self.chunks)
                       if self.volatile[chunk])
        return {
            "faults_served": self.fills,
            "bytes_regenerated": self.bytes_regenerated,
            "regeneration_errors": 0,
            "purges": sum(self.purges.values()),
            "purges_by_reason": dict(self.purges),
            "bytes_purged_by_reason": dict(self.bytes_purged),
            "volatile_refills": self.volatile_refills,
            "volatile_bytes": volatile,
            "nonvolatile_bytes": self.size - volatile,
            "resident_bytes": resident,
            "purged_bytes": purged,
        }


def page_args(data: st.DataObject, model: RegionModel, *, required: bool = False
              ) -> tuple[tuple[int, ...], int, int]:
    """Arguments for a range call and the range they mean: none (the whole region), an offset
    only (to the end), or both, in pages or (more often, as programs do) in whole chunks."""
    form = data.draw(st.sampled_from(["both", "chunks", "chunks"] if required else
                                      ["none", "none", "offset", "both", "chunks", "chunks"]))
    if form == "none":
        return (), 0, model.size
    if form == "chunks":
        offset = data.draw(st.integers(0, model.chunks - 1)) * model.chunk
        length = min(data.draw(st.integers(0, model.chunks)) * model.chunk, model.size - offset)
        return (offset, length), offset, length
    offset = data.draw(st.integers(0, model.pages)) * PAGE
    if form == "offset":
        return (offset,), offset, model.size - offset
    length = data.draw(st.integers(0, model.pages - offset // PAGE)) * PAGE
    return (offset, length), offset, length


def bad_range_args(model: RegionModel) -> list[tuple[tuple[object, ...], type[Exception]]]:
    size = model.size
    return [
        ((1, PAGE), ValueError), ((0, 1), ValueError), ((PAGE + 7,), ValueError),
        ((-PAGE, PAGE), ValueError), ((0, -PAGE), ValueError),
        ((size, PAGE), ValueError), ((0, size + PAGE), ValueError), ((size + PAGE,), ValueError),
        ((PAGE, size), ValueError),
        ((0.0, PAGE), TypeError), ((0, float(PAGE)), TypeError), (("0", PAGE), TypeError),
        ((True, PAGE), TypeError), ((0, False), TypeError), ((None, PAGE), TypeError),
    ]


def build_machine(backend: str, file_path: str, file_data: bytes,
                  isolated: sources.Isolated) -> type[RuleBasedStateMachine]:
    """The machine for one backend; the File source's file and the Isolated source (one helper
    process for the whole run) are shared by every example."""

    class RegionMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.models: list[RegionModel] = []
            self.numbers = itertools.count()
            self.seeds = itertools.count(1)

        def open_models(self) -> list[RegionModel]:
            return [model for model in self.models if not model.closed]

        def pick(self, data: st.DataObject) -> RegionModel:
            return data.draw(st.sampled_from(self.open_models()))

        # --- lifetime ---------------------------------------------------------------------------

        @initialize(data=st.data())
        def first_region(self, data: st.DataObject) -> None:
            self.create(data)

        @precondition(lambda self: len(self.open_models()) < MAX_OPEN_REGIONS)
        @rule(data=st.data())
        def create(self, data: st.DataObject) -> None:
            pages = data.draw(st.integers(1, 40), label="pages")
            short = data.draw(st.sampled_from([0, 0, 1, PAGE - 1]), label="bytes short of pages")
            chunk_size = data.draw(st.sampled_from([None, PAGE, 2 * PAGE, 8 * PAGE, CHUNK]),
                                   label="chunk_size")
            kind = data.draw(st.sampled_from(["python", "python", "zeros", "file", "file-fd",
                                              "isolated"]), label="source")
            regenerator: SeededRegenerator | None = None
            regenerate: Any
            if kind == "python":
                regenerator = SeededRegenerator(next(self.seeds))
                regenerate = regenerator
                source_bytes = (lambda seed: lambda offset, length:
                                seeded_bytes(seed, offset, length))(regenerator.seed)
            elif kind == "zeros":
                regenerate, source_bytes = sources.Zeros(), lambda offset, length: bytes(length)
            elif kind in ("file", "file-fd"):
                file_offset = data.draw(st.integers(0, FILE_LENGTH + PAGE), label="file offset")
                if kind == "file":
                    regenerate = sources.File(file_path, file_offset)
                else:
                    fd = os.open(file_path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        regenerate = sources.File(fd, file_offset)  # duplicated: ours may go
                    finally:
                        os.close(fd)
                source_bytes = (lambda at: lambda offset, length:
                                file_bytes(file_data, at, offset, length))(file_offset)
            else:
                regenerate = isolated  # serves chunks of up to CHUNK bytes (see the test)
                source_bytes = lambda offset, length: seeded_bytes(0, offset, length)  # noqa: E731
            # managed=False: vrange's pressure monitor purges at moments no model can foresee
            # (tests/test_policy.py covers it); every other purge here is the test's own.
            region = vrange.Region(pages * PAGE - short, regenerate, backend=backend,
                                   chunk_size=chunk_size, managed=False)
            assert len(region) == pages * PAGE
            assert region.chunk_size == (chunk_size or vrange.DEFAULT_CHUNK_SIZE)
            assert region.backend == backend.partition(":")[0]
            assert region.kernel_reclaims == kernel_reclaims(backend)
            assert not region.managed and not region.closed
            self.models.append(RegionModel(next(self.numbers), region, kind, source_bytes,
                                           regenerator))
            say(f"{self.models[-1]!r} = Region({pages * PAGE - short}, {regenerate!r}, "
                f"chunk_size={chunk_size})")
            if data.draw(st.booleans(), label="a cache, volatile from the start"):
                say(f"{self.models[-1]!r}.mark_volatile()")
                region.mark_volatile()
                self.models[-1].volatile = [True] * self.models[-1].chunks
                self.models[-1].wants_volatile = [True] * self.models[-1].chunks

        # One region stays open (the first is made by first_region): every step has a region to act
        # on, and the regions left open at the end are checked whole by teardown.
        @precondition(lambda self: len(self.open_models()) > 1)
        @rule(data=st.data())
        def close(self, data: st.DataObject) -> None:
            model = self.pick(data)
            assert model.region is not None
            say(f"{model!r}.close()")
            model.region.close()
            assert model.region.closed
            model.region.close()  # closing twice is allowed
            model.closed = True

        @precondition(lambda self: len(self.open_models()) > 1)
        @rule(data=st.data())
        def drop_without_close(self, data: st.DataObject) -> None:
            """Reference counting alone frees (and unmaps) a region nobody closed."""
            model = self.pick(data)
            say(f"del {model!r}")
            reference = weakref.ref(model.region)
            with dropped_open():
                model.region = None
            self.models.remove(model)
            assert reference() is None, "the region outlived its last reference"

        # --- content ----------------------------------------------------------------------------

        @rule(data=st.data())
        def read(self, data: st.DataObject) -> None:
            model = self.pick(data)
            region = model.region
            assert region is not None
            if data.draw(st.booleans(), label="all of it"):
                start, length = 0, model.size
            else:
                start = data.draw(st.integers(0, model.size - 1), label="start")
                length = data.draw(st.integers(0, min(model.size - start, 3 * model.chunk)),
                                   label="length")
            how = data.draw(st.sampled_from(["slice", "memoryview", "index", "numpy"]))
            if how == "index":
                length = 1
            say(f"{model!r}: read [{start}, {start + length}) by {how}")
            if how == "index":
                got = bytes([region[start]])
            elif how == "slice":
                got = region[start:start + length]
            elif how == "memoryview":
                with memoryview(region) as view:
                    got = bytes(view[start:start + length])
            else:
                array = np.frombuffer(region, dtype=np.uint8, count=length, offset=start)
                got = array.tobytes()
                del array
            model.access(start, start + length)
            assert got == model.content[start:start + length]

        @rule(data=st.data())
        def write(self, data: st.DataObject) -> None:
            """Writes to pinned pages are kept; writes to volatile pages are kept until the page is
            discarded (purge, the kernel), after which the page is the regenerator's again."""
            model = self.pick(data)
            region = model.region
            assert region is not None
            start = data.draw(st.integers(0, model.size - 1), label="start")
            payload = data.draw(st.binary(min_size=1, max_size=min(model.size - start, 2 * PAGE)),
                                label="payload")
            end = start + len(payload)
            say(f"{model!r}: write [{start}, {end})")
            if data.draw(st.booleans(), label="through a memoryview"):
                with memoryview(region) as view:
                    view[start:end] = payload
            else:
                region[start:end] = payload
            model.access(start, end)
            model.content[start:end] = payload

        # --- volatility -------------------------------------------------------------------------

        @rule(data=st.data())
        def mark_volatile(self, data: st.DataObject) -> None:
            model = self.pick(data)
            args, offset, length = page_args(data, model)
            assert model.region is not None
            say(f"{model!r}.mark_volatile{args}")
            assert model.region.mark_volatile(*args) is None
            for chunk in model.inside(offset, length):  # one pin released; volatile at none
                model.pins[chunk] = max(model.pins[chunk] - 1, 0)
                model.wants_volatile[chunk] = True
                model.volatile[chunk] = model.pins[chunk] == 0

        @rule(data=st.data())
        def mark_nonvolatile(self, data: st.DataObject) -> None:
            model = self.pick(data)
            args, offset, length = page_args(data, model)
            report = data.draw(st.booleans(), label="report")
            populate = data.draw(st.booleans(), label="populate")
            assert model.region is not None
            say(f"{model!r}.mark_nonvolatile{args}, report={report}, populate={populate}")
            result = model.region.mark_nonvolatile(*args, report=report, populate=populate)
            chunks = model.touching(offset, length)
            purged = model.pin(chunks, populate)
            for chunk in chunks:
                model.pins[chunk] += 1
                model.wants_volatile[chunk] = False
            event(f"mark_nonvolatile reported {'some' if purged else 'no'} purged chunks")
            if report:
                assert result == model.merged(purged)
            else:
                assert result is bool(purged)

        @rule(data=st.data())
        def pinned_block(self, data: st.DataObject) -> None:
            """A pinned() block: pinned while it runs (a purge inside it takes none of its chunks),
            its view reads the model's bytes, and each chunk gets its volatility back at the end."""
            model = self.pick(data)
            args, offset, length = page_args(data, model)
            populate = data.draw(st.booleans(), label="populate")
            region = model.region
            assert region is not None
            chunks = model.touching(offset, length)
            start, stop = offset, offset + length
            say(f"{model!r}: with pinned{args}, populate={populate}")
            with region.pinned(*args, populate=populate) as pin:
                purged = model.pin(chunks, populate)
                assert pin.purged_ranges == model.merged(purged)
                assert pin.purged is bool(purged)
                assert len(pin.view) == stop - start
                for chunk in chunks:
                    assert region.pin_count(chunk * model.chunk) == model.pins[chunk] + 1
                if data.draw(st.booleans(), label="purge inside"):
                    say(f"{model!r}.purge() inside the block")
                    assert region.purge() == model.purge(range(model.chunks))
                if stop > start:
                    low = data.draw(st.integers(start, stop - 1), label="read from")
                    high = data.draw(st.integers(low, min(stop, low + 2 * model.chunk)),
                                     label="read to")
                    got = bytes(pin.view[low - start:high - start])
                    model.access(low, high)
                    assert got == model.content[low:high]
            for chunk in chunks:
                model.volatile[chunk] = model.wants_volatile[chunk] and not model.pins[chunk]
            with pytest.raises(ValueError):
                pin.view

        @rule(data=st.data())
        def prefault(self, data: st.DataObject) -> None:
            model = self.pick(data)
            args, offset, length = page_args(data, model)
            assert model.region is not None
            say(f"{model!r}.prefault{args}")
            assert model.region.prefault(*args) is None
            model.fill_missing(model.touching(offset, length))

        @rule(data=st.data())
        def purge(self, data: st.DataObject) -> None:
            model = self.pick(data)
            args, offset, length = page_args(data, model)
            assert model.region is not None
            say(f"{model!r}.purge{args}")
            freed = model.region.purge(*args)
            event(f"purge gave back {'some' if freed else 'no'} bytes")
            assert freed == model.purge(model.touching(offset, length))

        @rule(data=st.data())
        def kernel_discard(self, data: st.DataObject) -> None:
            """vrange.testing.page_out: the kernel reclaims what it may. Only pages of volatile
            chunks inside the range may go; nothing else changes."""
            model = self.pick(data)
            args, offset, length = page_args(data, model)
            region = model.region
            assert region is not None
            say(f"page_out({model!r}, *{args})")
            if not model.kernel_reclaims:
                with pytest.raises(ValueError, match="page_out needs a region the kernel reclaims"):
                    page_out(region, *args)
                return
            candidates = sum(model.present[page] and model.volatile[page // model.pages_per_chunk]
                             for page in range(offset // PAGE, (offset + length) // PAGE))
            event(f"page_out over {'some' if candidates else 'no'} volatile present pages")
            page_out(region, *args)
            now = mapped_pages(region.address, model.pages)
            event(f"page_out discarded {'some' if model.present != now else 'no'} pages")
            for page, (before, after) in enumerate(zip(model.present, now)):
                assert before or not after, f"page {page} appeared without an access"
                if before and not after:
                    chunk = page // model.pages_per_chunk
                    assert model.volatile[chunk], f"page {page} of a pinned chunk was discarded"
                    assert offset <= page * PAGE < offset + length, \
                        f"page {page} outside the paged-out range was discarded"
                    model.present[page] = False

        @rule(data=st.data())
        def held_for_io(self, data: st.DataObject) -> None:
            """While a system call holds chunks: purge() skips them and close() refuses."""
            model = self.pick(data)
            region = model.region
            assert region is not None
            (offset, length), _, _ = page_args(data, model, required=True)
            held = model.touching(offset, length)
            purge_args, purge_offset, purge_length = page_args(data, model)
            say(f"with {model!r}.held_for_io({offset}, {length}): purge{purge_args}, close()")
            with region.held_for_io(offset, length):
                for chunk in held:
                    model.held[chunk] += 1
                if region.trap == "uffd":  # the sigbus uffd trap makes held chunks present, dirty
                    model.fill_missing(held, held=True)
                assert region.purge(*purge_args) == \
                    model.purge(model.touching(purge_offset, purge_length))
                if held:
                    with pytest.raises(BufferError, match="holds part of it"):
                        region.close()
                    assert not region.closed
            for chunk in held:
                model.held[chunk] -= 1
                # The last hold's release makes a volatile chunk lazy-free again.
                if model.kernel_reclaims and model.volatile[chunk] and model.materialized[chunk]:
                    model.volatile_refills += 1

        # --- misuse: each raises the documented exception and changes nothing -------------------

        @rule(data=st.data())
        def misuse(self, data: st.DataObject) -> None:
            kinds = ["constructor", "range", "range", "exported", "resize"]
            if any(model.closed for model in self.models):
                kinds += ["closed", "closed"]
            getattr(self, f"misuse_{data.draw(st.sampled_from(kinds))}")(data)

        def misuse_constructor(self, data: st.DataObject) -> None:
            arguments, error = data.draw(st.sampled_from([
                ((0, sources.Zeros()), ValueError), ((-PAGE, sources.Zeros()), ValueError),
                (("4096", sources.Zeros()), TypeError), ((4096.0, sources.Zeros()), TypeError),
                ((True, sources.Zeros()), TypeError), ((PAGE, 42), TypeError),
                ((PAGE, sources.Zeros(), "nope"), ValueError),
                ((PAGE, sources.Zeros(), backend, 3 * PAGE), ValueError),
                ((PAGE, sources.Zeros(), backend, PAGE // 2), ValueError),
                ((PAGE, sources.Zeros(), backend, 1 << 31), ValueError),
                ((PAGE, sources.Zeros(), backend, None, "ignore"), ValueError),
            ]), label="bad constructor arguments")
            say(f"Region{arguments}: {error.__name__}")
            with pytest.raises(error):
                vrange.Region(*arguments)

        def misuse_range(self, data: st.DataObject) -> None:
            model = self.pick(data)
            region = model.region
            assert region is not None
            args, error = data.draw(st.sampled_from(bad_range_args(model)), label="bad args")
            calls = {
                "mark_volatile": region.mark_volatile,
                "mark_nonvolatile": region.mark_nonvolatile,
                "mark_nonvolatile(report)":
                    lambda *a: region.mark_nonvolatile(*a, report=True),  # type: ignore[call-overload]
                "purge": region.purge, "prefault": region.prefault,
                "page_out": lambda *a: page_out(region, *a),
                "held_for_io": lambda *a: region.held_for_io(*a).__enter__(),
            }
            name = data.draw(st.sampled_from(sorted(calls)), label="method")
            if name == "held_for_io" and len(args) == 1:
                args = (*args, PAGE)
            say(f"{model!r}.{name}{args}: {error.__name__}")
            with pytest.raises(error):
                calls[name](*args)

        def misuse_exported(self, data: st.DataObject) -> None:
            """Like mmap.close: BufferError while a buffer exports the region, which stays open."""
            model = self.pick(data)
            region = model.region
            assert region is not None
            exporter: Any = data.draw(st.sampled_from(["memoryview", "numpy"]))
            exporter = memoryview(region) if exporter == "memoryview" else \
                np.frombuffer(region, dtype=np.uint8)
            say(f"{model!r}.close() while a {type(exporter).__name__} exports it")
            with pytest.raises(BufferError):
                region.close()
            assert not region.closed
            del exporter

        def misuse_resize(self, data: st.DataObject) -> None:
            model = self.pick(data)
            assert model.region is not None
            say(f"{model!r}.resize()")
            with pytest.raises(OSError, match="cannot be resized"):
                model.region.resize(data.draw(st.integers(1, 64)) * PAGE)
            assert len(model.region) == model.size

        def misuse_closed(self, data: st.DataObject) -> None:
            """Closing again is allowed; any other call on a closed region raises ValueError."""
            model = data.draw(st.sampled_from([model for model in self.models if model.closed]))
            region = model.region
            assert region is not None and region.closed
            calls: dict[str, Callable[[], object]] = {
                "mark_volatile()": region.mark_volatile,
                "mark_nonvolatile()": region.mark_nonvolatile,
                "purge()": region.purge, "prefault()": region.prefault, "stats()": region.stats,
                "mark_volatile(0, PAGE)": lambda: region.mark_volatile(0, PAGE),
                "mark_nonvolatile(0, PAGE, report=True)":
                    lambda: region.mark_nonvolatile(0, PAGE, report=True),
                "purge(0, PAGE)": lambda: region.purge(0, PAGE),
                "prefault(0, PAGE)": lambda: region.prefault(0, PAGE),
                "held_for_io(0, PAGE)": lambda: region.held_for_io(0, PAGE).__enter__(),
                "address": lambda: region.address, "__enter__()": region.__enter__,
                "page_out(region)": lambda: page_out(region), "len(region)": lambda: len(region),
                "region[0]": lambda: region[0], "region[0:PAGE]": lambda: region[0:PAGE],
                "memoryview(region)": lambda: memoryview(region),
                "resize(2 * PAGE)": lambda: region.resize(2 * PAGE),
            }
            name = data.draw(st.sampled_from(sorted(calls)))
            say(f"{model!r}.{name}: ValueError")
            with pytest.raises(ValueError):
                calls[name]()
            region.close()  # still allowed
            assert "closed" in repr(region)

        # --- invariants -------------------------------------------------------------------------

        @invariant()
        def regions_match_the_model(self) -> None:
            for model in self.open_models():
                self.check(model)

        def check(self, model: RegionModel) -> None:
            region = model.region
            assert region is not None
            # Presence first: reading the present pages below must not fault anything in.
            mapped = mapped_pages(region.address, model.pages)
            assert mapped == model.present, f"{model}: pages present (mapped, model): " + repr(
                {page: (mapped[page], model.present[page]) for page in range(model.pages)
                 if mapped[page] != model.present[page]}) + f"; {region.stats()}"
            with memoryview(region) as view:
                for present, run in itertools.groupby(range(model.pages),
                                                      key=model.present.__getitem__):
                    if present:
                        pages = list(run)
                        start, end = pages[0] * PAGE, (pages[-1] + 1) * PAGE
                        assert bytes(view[start:end]) == model.content[start:end], \
                            f"{model}: bytes of pages {pages[0]}..{pages[-1]} differ"
            # The uffd backend wakes the faulting thread first and finishes the refill of a volatile
            # chunk right after, on its own thread (docs/backends.md, "Order against the wake-up"):
            # it makes the chunk lazy-free, counts it (volatile_refills), then releases it; until
            # then purge() skips the chunk. The model has no "still finishing" state: wait for the
            # end (the chunk states are not public: the one private call of this test).
            deadline = time.monotonic() + 5
            while region._core.any_in_flight() and time.monotonic() < deadline:
                time.sleep(0.001)
            stats = region.stats()
            expected = model.expected_stats()
            got = {name: getattr(stats, name) for name in expected}
            if SWAP:  # mincore counts a swapped-out page as absent; pagemap (above) does not
                for name in ("resident_bytes", "purged_bytes"):
                    got.pop(name), expected.pop(name)
            assert got == expected, f"{model}: stats differ (got, model): " + repr(
                {name: (got[name], expected[name]) for name in got if got[name] != expected[name]})
            assert stats.faults_served == stats.faults_on_handler_thread + \
                stats.faults_on_faulting_thread + stats.faults_on_worker_thread
            assert stats.trap == region.trap and stats.kernel_reclaims == model.kernel_reclaims
            if model.last_stats is not None:
                for name in COUNTERS:
                    assert getattr(stats, name) >= getattr(model.last_stats, name), name
            model.last_stats = stats
            if model.regenerator is not None:  # one call per chunk regenerated, no more
                assert model.regenerator.calls == model.fills
            assert region.regeneration_failures == []

        def teardown(self) -> None:
            try:
                for model in self.open_models():
                    region = model.region
                    assert region is not None
                    got = bytes(region[:])  # every page, faulting in whatever is missing
                    model.access(0, model.size)
                    assert got == model.content, f"{model}: final bytes differ"
                    self.check(model)
            finally:
                for model in self.models:
                    if model.region is not None:
                        model.region.close()

    return RegionMachine


def test_regions_match_a_model(backend: str) -> None:
    # The model knows which pages each access makes present; fill-ahead (which fills chunks after a
    # forward walk's fault, before they are touched) has its own tests in test_fill_ahead.py. This
    # test runs in a forked child: the setting ends with it.
    os.environ["VRANGE_FILL_AHEAD_KIB"] = "0"
    data = random.Random(FILE_LENGTH).randbytes(FILE_LENGTH)  # the same in every run: replayable
    with tempfile.NamedTemporaryFile(prefix="vrange-state-machine-") as file:
        file.write(data)
        file.flush()
        isolated = sources.Isolated("isolated_regenerators:seeded_pattern", 0)
        # An Isolated source serves the chunk size of its first region, at most: make that CHUNK.
        with vrange.Region(CHUNK, isolated, backend=backend) as first:
            assert first[0:PAGE] == seeded_bytes(0, 0, PAGE)
        run_state_machine_as_test(build_machine(backend, file.name, data, isolated),
                                  settings=SETTINGS)
