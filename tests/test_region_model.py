"""Property test: any sequence of region operations agrees with a simple model of its bytes."""

from __future__ import annotations

from contextlib import ExitStack

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vrange
from conftest import CHUNK, PAGE, CountingRegenerator, pattern

CHUNKS = 6
SIZE = (CHUNKS - 1) * CHUNK + 3 * PAGE  # the last chunk is a short tail
PAGES = SIZE // PAGE

page_ranges = st.tuples(st.integers(0, PAGES), st.integers(0, PAGES)).map(
    lambda pair: (min(pair), max(pair) - min(pair)))
operations = st.lists(st.one_of(
    st.tuples(st.just("volatile"), page_ranges),
    st.tuples(st.just("nonvolatile"), page_ranges, st.booleans()),
    st.tuples(st.just("enter"), page_ranges, st.booleans()),
    st.tuples(st.just("exit"), st.integers(0, 7)),
    st.tuples(st.just("purge"), page_ranges),
    st.tuples(st.just("write"), st.integers(0, PAGES - 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("read"), st.integers(0, PAGES - 1)),
), max_size=25)


def chunk_length(chunk: int) -> int:
    return min(CHUNK, SIZE - chunk * CHUNK)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
def test_region_matches_model(backend: str, steps: list[tuple]) -> None:
    """Pins are counted (docs/pins.md): mark_nonvolatile adds one to each chunk it touches,
    mark_volatile takes one from each whole chunk, a pinned() block holds one while it runs; a
    chunk is volatile when no pin holds it and mark_volatile released it last."""
    model = bytearray(pattern(0, SIZE))
    explicit = [0] * CHUNKS
    scoped = [0] * CHUNKS
    wants_volatile = [False] * CHUNKS
    purged_since_volatile = [False] * CHUNKS
    resident = [False] * CHUNKS  # filled and not discarded since
    blocks: list[tuple[ExitStack, range]] = []

    def volatile(chunk: int) -> bool:
        return wants_volatile[chunk] and not explicit[chunk] and not scoped[chunk]

    def expected_report(touching: range) -> list[tuple[int, int]]:
        expected: list[tuple[int, int]] = []
        for chunk in touching:
            if purged_since_volatile[chunk]:
                start = chunk * CHUNK
                if expected and sum(expected[-1]) == start:
                    expected[-1] = (expected[-1][0], expected[-1][1] + chunk_length(chunk))
                else:
                    expected.append((start, chunk_length(chunk)))
        return expected

    def pinned(touching: range, populate: bool) -> None:
        for chunk in touching:
            purged_since_volatile[chunk] = False
            if populate:
                resident[chunk] = True

    with vrange.Region(SIZE, CountingRegenerator(), backend=backend) as region:
        try:
            for step in steps:
                kind = step[0]
                if kind == "exit":
                    if blocks:
                        stack, touching = blocks.pop(step[1] % len(blocks))
                        stack.close()
                        for chunk in touching:
                            scoped[chunk] -= 1
                    continue
                if kind not in ("volatile", "nonvolatile", "enter", "purge"):
                    page = step[1]
                    resident[page * PAGE // CHUNK] = True
                    if kind == "write":
                        data = step[2]
                        region[page * PAGE:page * PAGE + len(data)] = data
                        model[page * PAGE:page * PAGE + len(data)] = data
                    else:
                        assert bytes(region[page * PAGE:(page + 1) * PAGE]) == \
                            model[page * PAGE:(page + 1) * PAGE]
                    continue
                first_page, pages = step[1]
                offset, length = first_page * PAGE, pages * PAGE
                end = offset + length
                touching = range(offset // CHUNK, -(-end // CHUNK)) if length else range(0)
                if kind == "volatile":
                    region.mark_volatile(offset, length)
                    for chunk in touching:  # whole chunks only (rounded inward)
                        whole_end = chunk * CHUNK + chunk_length(chunk)
                        if offset <= chunk * CHUNK and whole_end <= end:
                            explicit[chunk] = max(explicit[chunk] - 1, 0)
                            wants_volatile[chunk] = True
                elif kind == "nonvolatile":
                    populate = step[2]
                    assert region.mark_nonvolatile(offset, length, report=True,
                                                   populate=populate) == expected_report(touching)
                    pinned(touching, populate)
                    for chunk in touching:
                        explicit[chunk] += 1
                        wants_volatile[chunk] = False
                elif kind == "enter":
                    populate = step[2]
                    stack = ExitStack()
                    pin = stack.enter_context(region.pinned(offset, length, populate=populate))
                    assert pin.purged_ranges == expected_report(touching)
                    assert pin.purged == bool(pin.purged_ranges)
                    assert len(pin.view) == length
                    pinned(touching, populate)
                    for chunk in touching:
                        scoped[chunk] += 1
                    blocks.append((stack, touching))
                else:
                    discarded = sum(chunk_length(chunk) for chunk in touching
                                    if volatile(chunk) and resident[chunk])
                    assert region.purge(offset, length) == discarded
                    for chunk in touching:
                        if volatile(chunk) and resident[chunk]:
                            start = chunk * CHUNK
                            model[start:start + chunk_length(chunk)] = pattern(start, chunk_length(chunk))
                            purged_since_volatile[chunk] = True
                            resident[chunk] = False
                for chunk in range(CHUNKS):
                    assert region.pin_count(chunk * CHUNK) == explicit[chunk] + scoped[chunk]
            assert bytes(region[:]) == bytes(model)
        finally:
            for stack, _ in blocks:
                stack.close()
