"""Regenerators for tests/test_isolated.py: a helper process imports them by name."""

from __future__ import annotations

import os
import time

from conftest import pattern


def slow_pattern(offset: int, buf: memoryview, delay: float) -> None:
    """Takes ``delay`` seconds (sleeping: it would let the GIL go, were it in-process)."""
    time.sleep(delay)
    buf[:] = pattern(offset, len(buf))


def broken(offset: int, buf: memoryview) -> None:
    raise KeyError("the tile store is gone")


def dies_once(offset: int, buf: memoryview, flag: str) -> None:
    if not os.path.exists(flag):
        with open(flag, "w"):
            pass
        os._exit(3)
    buf[:] = pattern(offset, len(buf))


def hangs(offset: int, buf: memoryview) -> None:
    time.sleep(3600)
