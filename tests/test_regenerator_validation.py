"""A regenerator that can never fill a chunk is refused when the region is made, not answered with
zeros at the first fault: async functions (also behind functools.partial or as ``__call__``), async
generators, non-callables, callables that cannot take ``(offset, buf)``."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import PAGE, pattern

import vrange

SIZE = 4 * PAGE


async def async_regenerator(offset: int, buf: memoryview) -> None:
    buf[:] = pattern(offset, len(buf))


async def async_generator(offset: int, buf: memoryview) -> AsyncIterator[None]:
    yield None


class AsyncCall:
    async def __call__(self, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))


class Fill:
    def __call__(self, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))

    def method(self, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))

    async def async_method(self, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))


def three(offset: int, buf: memoryview, extra: int) -> None:
    buf[:] = pattern(offset, len(buf))


def fill_with(offset: int, buf: memoryview, *, byte: int = 0) -> None:
    buf[:] = bytes([byte]) * len(buf)


REFUSED: dict[str, tuple[object, str]] = {
    "async def": (async_regenerator, "async function"),
    "partial of async def": (functools.partial(async_regenerator), "async function"),
    "async __call__": (AsyncCall(), "async function"),
    "async method": (Fill().async_method, "async function"),
    "async generator": (async_generator, "async function"),
    "lambda async": (lambda: async_regenerator, "two positional arguments"),
    "non-callable": (42, "regenerate must be a callable"),
    "string": ("pkg.mod:fn", "regenerate must be a callable"),
    "three arguments": (three, "two positional arguments"),
    "one argument": (lambda offset: None, "two positional arguments"),
    "partial binding both": (functools.partial(three, 0, memoryview(b"")),
                             "two positional arguments"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_at_construction(backend: str, name: str) -> None:
    regenerate, message = REFUSED[name]
    with pytest.raises(TypeError, match=message):
        vrange.Region(SIZE, regenerate, backend=backend)  # type: ignore[arg-type]


ACCEPTED: dict[str, Any] = {
    "function": lambda offset, buf: buf.__setitem__(slice(None), pattern(offset, len(buf))),
    "callable object": Fill(),
    "bound method": Fill().method,
    "partial": functools.partial(three, extra=1),
    "keyword-only with default": functools.partial(fill_with, byte=0),
    "varargs": lambda *args: args[1].__setitem__(slice(None), pattern(args[0], len(args[1]))),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted(backend: str, name: str) -> None:
    with vrange.Region(SIZE, ACCEPTED[name], backend=backend) as region:
        region.mark_nonvolatile()
        if name == "keyword-only with default":
            assert region[:] == bytes(SIZE)
        else:
            assert region[:] == pattern(0, SIZE)


def test_builtins_without_a_signature_are_accepted() -> None:
    # inspect.signature cannot read every C callable: it must not be refused for that.
    import operator

    vrange.region._check_regenerator(getattr)   # no signature: accepted
    vrange.region._check_regenerator(print)     # (*args, ...): accepted
    with pytest.raises(TypeError, match="two positional arguments"):
        vrange.region._check_regenerator(operator.setitem)   # (a, b, c, /): cannot be called


def test_an_awaitable_returned_at_fault_time_fails_by_policy(backend: str) -> None:
    """A plain function returning a coroutine slips past the check: the fault fails (never zeros)
    and the library call raises."""
    def returns_a_coroutine(offset: int, buf: memoryview) -> Any:
        return async_regenerator(offset, buf)

    with vrange.Region(SIZE, returns_a_coroutine, backend=backend) as region:
        with pytest.raises(vrange.RegenerationError, match="returned an awaitable") as caught:
            region.mark_nonvolatile()
        assert isinstance(caught.value.__cause__, TypeError)


def test_an_async_isolated_regenerator_is_refused() -> None:
    with pytest.raises(TypeError, match="async function"):
        vrange.sources.Isolated("isolated_regenerators:async_fill")


def test_an_isolated_regenerator_returning_an_awaitable_fails(backend: str) -> None:
    source = vrange.sources.Isolated("isolated_regenerators:returns_a_coroutine")
    with vrange.Region(SIZE, source, backend=backend) as region:
        with pytest.raises(vrange.RegenerationError, match="returned an awaitable"):
            region.mark_nonvolatile()
