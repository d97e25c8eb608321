"""Property test: any sequence of region operations agrees with a simple model of its bytes."""

from __future__ import annotations

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
    st.tuples(st.just("nonvolatile"), page_ranges),
    st.tuples(st.just("purge"), page_ranges),
    st.tuples(st.just("write"), st.integers(0, PAGES - 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("read"), st.integers(0, PAGES - 1)),
), max_size=25)


def chunk_length(chunk: int) -> int:
    return min(CHUNK, SIZE - chunk * CHUNK)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
def test_region_matches_model(backend: str, steps: list[tuple]) -> None:
    model = bytearray(pattern(0, SIZE))
    volatile = [False] * CHUNKS
    purged_since_volatile = [False] * CHUNKS
    resident = [False] * CHUNKS  # filled and not discarded since
    with vrange.Region(SIZE, CountingRegenerator(), backend=backend) as region:
        for step in steps:
            kind = step[0]
            if kind in ("volatile", "nonvolatile", "purge"):
                first_page, pages = step[1]
                offset, length = first_page * PAGE, pages * PAGE
                end = offset + length
                touching = range(offset // CHUNK, -(-end // CHUNK)) if length else range(0)
                if kind == "volatile":
                    region.mark_volatile(offset, length)
                    for chunk in touching:  # whole chunks only (rounded inward)
                        whole_end = chunk * CHUNK + chunk_length(chunk)
                        if offset <= chunk * CHUNK and whole_end <= end:
                            volatile[chunk] = True
                elif kind == "nonvolatile":
                    expected = []
                    for chunk in touching:
                        if purged_since_volatile[chunk]:
                            start = chunk * CHUNK
                            if expected and sum(expected[-1]) == start:
                                expected[-1] = (expected[-1][0], expected[-1][1] + chunk_length(chunk))
                            else:
                                expected.append((start, chunk_length(chunk)))
                    assert region.mark_nonvolatile(offset, length, report=True) == expected
                    for chunk in touching:
                        volatile[chunk] = purged_since_volatile[chunk] = False
                        resident[chunk] = True
                else:
                    discarded = sum(chunk_length(chunk) for chunk in touching
                                    if volatile[chunk] and resident[chunk])
                    assert region.purge(offset, length) == discarded
                    for chunk in touching:
                        if volatile[chunk] and resident[chunk]:
                            start = chunk * CHUNK
                            model[start:start + chunk_length(chunk)] = pattern(start, chunk_length(chunk))
                            purged_since_volatile[chunk] = True
                            resident[chunk] = False
            elif kind == "write":
                _, page, data = step
                resident[page * PAGE // CHUNK] = True
                region[page * PAGE:page * PAGE + len(data)] = data
                model[page * PAGE:page * PAGE + len(data)] = data
            else:
                page = step[1]
                resident[page * PAGE // CHUNK] = True
                assert bytes(region[page * PAGE:(page + 1) * PAGE]) == model[page * PAGE:(page + 1) * PAGE]
        assert bytes(region[:]) == bytes(model)
