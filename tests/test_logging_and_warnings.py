"""vrange's logger and warnings: a library's manners. The ``vrange`` logger has a NullHandler and
its messages carry no prefix of their own (the command line's handler adds the logger's name, once);
a Region or Cache the garbage collector finds open is closed with a ResourceWarning, like an
unclosed file."""

from __future__ import annotations

import gc
import logging
import warnings

import pytest
from conftest import CHUNK, run_python

import vrange
import vrange.testing

FAILING_REGENERATION = """
    import vrange

    def broken(offset, buf):
        raise RuntimeError("no source")

    with vrange.Region(4 * 65536, broken) as region:
        try:
            region.mark_nonvolatile()
        except vrange.RegenerationError:
            print("raised", flush=True)
"""


def test_the_logger_has_a_null_handler_and_prints_nothing_unconfigured() -> None:
    assert any(isinstance(handler, logging.NullHandler)
               for handler in logging.getLogger("vrange").handlers)
    result = run_python(FAILING_REGENERATION)
    assert result.returncode == 0 and result.stdout == "raised\n", result.stderr
    assert "regenerator failed" not in result.stderr  # no last-resort handler for a library


def test_messages_carry_no_prefix_of_their_own(caplog: pytest.LogCaptureFixture) -> None:
    def broken(offset: int, buf: memoryview) -> None:
        raise RuntimeError("no source")

    with caplog.at_level(logging.WARNING, logger="vrange"), \
            vrange.Region(4 * CHUNK, broken) as region:
        with pytest.raises(vrange.RegenerationError):
            region.mark_nonvolatile()
    messages = [record.getMessage() for record in caplog.records if record.name == "vrange"]
    assert any(message.startswith("regenerator failed at offset") for message in messages)
    assert not any(message.startswith("vrange:") for message in messages), messages


def test_the_command_line_prefixes_each_message_once() -> None:
    result = run_python(FAILING_REGENERATION, prelude="""
        from vrange._tool import configure_logging  # what python -m vrange does
        configure_logging()
    """)
    assert result.returncode == 0, result.stderr
    assert "vrange: regenerator failed at offset 0: RuntimeError('no source')" in result.stderr
    assert "vrange: vrange:" not in result.stderr


def _collected(make: type) -> list[warnings.WarningMessage]:
    """The warnings of letting the garbage collector find what ``make`` makes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thing = make()
        del thing
        gc.collect()
    return [warning for warning in caught if issubclass(warning.category, ResourceWarning)]


def test_a_region_collected_open_is_closed_with_a_resource_warning() -> None:
    region = vrange.Region(4 * CHUNK, vrange.sources.Zeros())
    region.mark_volatile()
    described = repr(region)
    open_before = len(vrange.testing.live_regions())
    with pytest.warns(ResourceWarning, match=r"^unclosed <vrange\.Region ") as caught:
        del region
        gc.collect()
    assert [str(warning.message) for warning in caught] == [f"unclosed {described}"]
    assert len(vrange.testing.live_regions()) == open_before - 1  # and closed


def test_a_region_in_a_reference_cycle_warns_when_the_cycle_is_collected() -> None:
    class Owner:
        def __init__(self) -> None:
            self.region = vrange.Region(CHUNK, self.regenerate)  # region -> owner -> region

        def regenerate(self, offset: int, buf: memoryview) -> None:
            buf[:] = bytes(len(buf))

    caught = _collected(Owner)
    assert len(caught) == 1 and str(caught[0].message).startswith("unclosed <vrange.Region ")


def test_a_closed_region_emits_no_warning() -> None:
    def closed() -> vrange.Region:
        region = vrange.Region(4 * CHUNK, vrange.sources.Zeros())
        region.close()
        return region

    def with_block() -> None:
        with vrange.Region(4 * CHUNK, vrange.sources.Zeros()) as region:
            region.mark_volatile()

    assert _collected(closed) == []
    assert _collected(with_block) == []


def test_a_cache_collected_open_warns_once_naming_the_cache() -> None:
    def cache() -> vrange.Cache[str]:
        made = vrange.Cache(4 * CHUNK, lambda key: key.encode() * 100)
        assert made["a"] == b"a" * 100
        return made

    caught = _collected(cache)
    assert [str(warning.message).split(" ", 2)[:2] for warning in caught] == \
        [["unclosed", "<vrange.Cache"]]


def test_a_closed_cache_emits_no_warning() -> None:
    def closed() -> vrange.Cache[str]:
        with vrange.Cache[str](4 * CHUNK) as cache:
            cache["a"] = b"value"
        return cache

    assert _collected(closed) == []
