"""Regenerators for Isolated sources in the tests: a helper process imports them by name (and only
what they use: a helper starts faster without pytest and numpy)."""

from __future__ import annotations

import os
import time


def slow_pattern(offset: int, buf: memoryview, delay: float) -> None:
    """Takes ``delay`` seconds (sleeping: it would let the GIL go, were it in-process)."""
    from conftest import pattern

    time.sleep(delay)
    buf[:] = pattern(offset, len(buf))


def announced_slow_pattern(offset: int, buf: memoryview, flag: str, delay: float) -> None:
    """Like ``slow_pattern``, creating the file ``flag`` first: the test sees the regeneration begin."""
    with open(flag, "w"):
        pass
    slow_pattern(offset, buf, delay)


def broken(offset: int, buf: memoryview) -> None:
    raise KeyError("the tile store is gone")


def dies_once(offset: int, buf: memoryview, flag: str) -> None:
    if not os.path.exists(flag):
        with open(flag, "w"):
            pass
        os._exit(3)
    from conftest import pattern

    buf[:] = pattern(offset, len(buf))


def hangs(offset: int, buf: memoryview) -> None:
    time.sleep(3600)


def seeded_bytes(seed: int, offset: int, length: int) -> bytes:
    """A pattern like conftest's, a different one for every seed (tests/test_state_machine.py)."""
    import numpy as np

    positions = np.arange(offset, offset + length, dtype=np.uint64)
    values = (positions * np.uint64(2654435761) >> np.uint64(13)) + np.uint64(seed)
    return (values % np.uint64(251)).astype(np.uint8).tobytes()


def seeded_pattern(offset: int, buf: memoryview, seed: int) -> None:
    buf[:] = seeded_bytes(seed, offset, len(buf))


def filled(offset: int, buf: memoryview, value: int) -> None:
    """Every byte ``value`` (no numpy: the quickest helper to start, tests/test_leaks.py)."""
    buf[:] = bytes([value]) * len(buf)


async def async_fill(offset: int, buf: memoryview) -> None:
    buf[:] = bytes(len(buf))


def returns_a_coroutine(offset: int, buf: memoryview) -> object:
    return async_fill(offset, buf)


def generator_fill(offset: int, buf: memoryview) -> object:
    buf[:] = bytes([1]) * len(buf)
    yield None


def returns_a_generator(offset: int, buf: memoryview) -> object:
    return generator_fill(offset, buf)
