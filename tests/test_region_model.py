"""Property test: any sequence of region operations agrees with a simple model of its bytes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vrange
from conftest import CHUNK, PAGE, CountingRegenerator, pattern

CHUNKS = 6
SIZE = CHUNKS * CHUNK

chunk_ranges = st.tuples(st.integers(0, CHUNKS - 1), st.integers(1, CHUNKS)).map(
    lambda pair: (pair[0], min(pair[1], CHUNKS - pair[0])))
operations = st.lists(st.one_of(
    st.tuples(st.just("volatile"), chunk_ranges),
    st.tuples(st.just("nonvolatile"), chunk_ranges),
    st.tuples(st.just("purge"), chunk_ranges),
    st.tuples(st.just("write"), st.integers(0, SIZE // PAGE - 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("read"), st.integers(0, SIZE // PAGE - 1)),
), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
def test_region_matches_model(backend: str, steps: list[tuple]) -> None:
    model = bytearray(pattern(0, SIZE))
    volatile = [False] * CHUNKS
    purged_since_volatile = [False] * CHUNKS
    materialized = [False] * CHUNKS  # purging a never-filled chunk discards nothing: no purge
    with vrange.Region(SIZE, CountingRegenerator(), backend=backend) as region:
        for step in steps:
            kind = step[0]
            if kind in ("volatile", "nonvolatile", "purge"):
                first, count = step[1]
                offset, length = first * CHUNK, count * CHUNK
                chunks = range(first, first + count)
                if kind == "volatile":
                    region.mark_volatile(offset, length)
                    for chunk in chunks:
                        volatile[chunk] = True
                elif kind == "nonvolatile":
                    expected = [(c * CHUNK, CHUNK) for c in chunks if purged_since_volatile[c]]
                    got = region.mark_nonvolatile(offset, length, report=True)
                    merged = sum(l for _, l in got)
                    assert merged == sum(l for _, l in expected)
                    for chunk in chunks:
                        volatile[chunk] = purged_since_volatile[chunk] = False
                        materialized[chunk] = True
                else:
                    region.purge(offset, length)
                    for chunk in chunks:
                        if volatile[chunk] and materialized[chunk]:
                            model[chunk * CHUNK:(chunk + 1) * CHUNK] = pattern(chunk * CHUNK, CHUNK)
                            purged_since_volatile[chunk] = True
            elif kind == "write":
                _, page, data = step
                materialized[page * PAGE // CHUNK] = True
                region[page * PAGE:page * PAGE + len(data)] = data
                model[page * PAGE:page * PAGE + len(data)] = data
            else:
                page = step[1]
                materialized[page * PAGE // CHUNK] = True
                assert bytes(region[page * PAGE:(page + 1) * PAGE]) == model[page * PAGE:(page + 1) * PAGE]
        assert bytes(region[:]) == bytes(model)
