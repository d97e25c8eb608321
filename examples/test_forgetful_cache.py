"""A bug that only lost pages show: a program that forgets a regenerated chunk can change.

A price list is rendered into a volatile region as sorted fixed-size records. Its regenerator renders
from the catalogue *as it is now*, so once the catalogue has moved on, a purged chunk comes back with
the new records. ``ForgetfulPriceIndex`` reads the region once to learn where each name is, then
trusts those positions for ever: right as long as nothing is purged (always, on a test machine with
memory to spare), wrong after the first purge under pressure.

    pytest examples/test_forgetful_cache.py                          # 2 passed
    pytest examples/test_forgetful_cache.py --vrange-purge=every:1   # test_forgetful_index fails
    python examples/test_forgetful_cache.py --vrange-purge=every:1   # the same, through main()

The fix shown here (``SnapshotPriceCache``) makes the regenerator rebuild the bytes the program saw:
it renders from the catalogue as it was when the cache was built, and a refresh is an explicit new
cache. Another fix is to check what was read (the name in the record) and rebuild the index when it
differs. See docs/testing-with-vrange.md.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Sequence

import vrange

RECORD = struct.Struct("<24sQ")  # name, price in cents: 32 bytes, so no record straddles two chunks
CAPACITY = vrange.DEFAULT_CHUNK_SIZE // RECORD.size


class Catalogue:
    """The source of truth, which moves on (a database table, a file rewritten by another job)."""

    def __init__(self, prices: dict[str, int]) -> None:
        self.prices = dict(prices)

    def set_price(self, name: str, cents: int) -> None:
        self.prices[name] = cents

    def render(self) -> bytes:
        """Every record, sorted by name."""
        return b"".join(RECORD.pack(name.encode(), cents)
                        for name, cents in sorted(self.prices.items()))


class PriceCache:
    """The catalogue's records in a volatile region, regenerated from the catalogue on access."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.region = vrange.Region(CAPACITY * RECORD.size, self._regenerate)
        self.region.mark_volatile()  # the kernel may take it back: it can be rebuilt

    def _rendered(self) -> bytes:
        return self.catalogue.render()

    def _regenerate(self, offset: int, buf: memoryview) -> None:
        records = self._rendered()[offset:offset + len(buf)]
        buf[:len(records)] = records  # the rest stays zero: no record there

    def record(self, position: int) -> tuple[str, int]:
        name, cents = RECORD.unpack_from(self.region, position * RECORD.size)
        return name.rstrip(b"\0").decode(), cents

    def close(self) -> None:
        self.region.close()


class SnapshotPriceCache(PriceCache):
    """The fix: the regenerator rebuilds exactly the bytes the program may already have read."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.snapshot = catalogue.render()
        super().__init__(catalogue)

    def _rendered(self) -> bytes:
        return self.snapshot


class ForgetfulPriceIndex:
    """Where each name's record is, learnt once. The bug: it assumes the region never changes."""

    def __init__(self, cache: PriceCache) -> None:
        self.cache = cache
        self.position: dict[str, int] = {}
        for position in range(CAPACITY):
            name, _ = cache.record(position)
            if not name:
                break
            self.position[name] = position

    def price(self, name: str) -> int:
        return self.cache.record(self.position[name])[1]


def check_prices_survive_an_update(cache_type: type[PriceCache]) -> None:
    catalogue = Catalogue({"apple": 120, "cherry": 450, "damson": 300})
    cache = cache_type(catalogue)
    try:
        index = ForgetfulPriceIndex(cache)
        catalogue.set_price("banana", 90)  # a new record sorts before cherry
        assert index.price("cherry") == 450
        assert index.price("damson") == 300
    finally:
        cache.close()


def test_forgetful_index() -> None:
    """Passes without purges; fails under --vrange-purge: cherry's record position now holds
    banana's, regenerated from the updated catalogue."""
    check_prices_survive_an_update(PriceCache)


def test_snapshot_cache() -> None:
    """Passes with or without purges: a regenerated chunk is the chunk the index was built from."""
    check_prices_survive_an_update(SnapshotPriceCache)


def main(argv: Sequence[str] | None = None) -> int:
    """Run this file's tests in a pytest process with vrange's plugin (``-p vrange``), passing
    ``argv`` on (``--vrange-purge=...``, ``-k ...``); pytest's exit status."""
    options = sys.argv[1:] if argv is None else list(argv)
    return subprocess.call([sys.executable, "-m", "pytest", "-p", "vrange", __file__, *options])


if __name__ == "__main__":
    sys.exit(main())
