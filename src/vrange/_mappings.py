"""The process's mapping count, which the sigbus backend's memfd trap uses up.

The kernel refuses a new mapping (ENOMEM) once a process has ``vm.max_map_count`` of them (65530 by
default); an access that needs one then cannot be served and the process dies with SIGBUS. The memfd
trap keeps every refilled chunk in a mapping of its own, so a memfd-trap region may use up to one
mapping per chunk, plus one. Each such region reserves that worst case from a process-wide budget
(half of ``vm.max_map_count``; the rest stays for the program, its libraries and the interpreter)
when it is created, and gives it back when it is closed: a region that would not fit is refused
with a clear error at creation, never a death later. The uffd backend and the sigbus backend's
userfaultfd trap keep a region in one mapping and reserve nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .errors import VRangeError

DEFAULT_MAX_MAP_COUNT = 65530
BUDGET_SHARE = 2
"""vrange reserves at most 1/BUDGET_SHARE of ``vm.max_map_count``."""
HEADROOM = 1024
"""Mappings left free for others when a region's worst case is checked against today's count."""
COUNT_MAX_AGE_S = 0.5
"""How old a reading of the process's mapping count may be when it is far from the limit."""


def _read_max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count", "rb") as file:  # binary: no codec lookup
            return int(file.read())
    except (OSError, ValueError):
        return DEFAULT_MAX_MAP_COUNT


def process_mapping_count() -> int:
    """How many mappings this process has now (lines of /proc/self/maps)."""
    try:
        with open("/proc/self/maps", "rb") as file:
            return sum(1 for _ in file)
    except OSError:
        return 0


@dataclass(frozen=True)
class MappingUse:
    """The process's mappings and vrange's share of them, at one instant."""

    max_map_count: int
    """The kernel's limit (``vm.max_map_count``)."""
    budget: int
    """How many mappings vrange's memfd-trap regions may reserve in all."""
    reserved: int
    """How many the open memfd-trap regions reserve (their worst case) now."""
    in_use: int
    """How many mappings the whole process has now."""


class MappingBudget:
    """The process-wide budget of mappings for memfd-trap regions (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reserved = 0
        self._count_cache = (0, -COUNT_MAX_AGE_S - 1.0)

    @property
    def max_map_count(self) -> int:
        return _read_max_map_count()

    def reserve(self, count: int, what: str) -> None:
        """Reserve ``count`` mappings for ``what``, or raise VRangeError saying why not."""
        max_map_count = self.max_map_count
        budget = max_map_count // BUDGET_SHARE
        in_use = self._recent_mapping_count(count, max_map_count)
        with self._lock:
            if self._reserved + count > budget:
                raise VRangeError(
                    f"{what} may need up to {count} memory mappings (one per chunk), and the open "
                    f"memfd-trap regions of this process already reserve {self._reserved} of the "
                    f"{budget} vrange may use (half of vm.max_map_count = {max_map_count}): close "
                    "regions, use a larger chunk_size, or a backend that keeps a region in one "
                    "mapping (uffd, or sigbus with the uffd trap)")
            if in_use + count > max_map_count - HEADROOM:
                raise VRangeError(
                    f"{what} may need up to {count} memory mappings (one per chunk), and this "
                    f"process has {in_use} of the {max_map_count} the kernel allows "
                    f"(vm.max_map_count): close regions, or use a larger chunk_size")
            self._reserved += count

    def _recent_mapping_count(self, count: int, max_map_count: int) -> int:
        """The process's mapping count, read again only when the last reading is older than
        COUNT_MAX_AGE_S or this reservation comes near the limit by it (reading /proc/self/maps
        takes milliseconds with many mappings; a program creating regions in a loop would pay
        that every time). Read outside the lock: reading lets the GIL go."""
        now = time.monotonic()
        cached, read_at = self._count_cache
        if now - read_at > COUNT_MAX_AGE_S or cached + count > max_map_count - 4 * HEADROOM:
            cached = process_mapping_count()
            self._count_cache = (cached, now)
        return cached

    def release(self, count: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - count)

    def new_lock_after_fork(self) -> None:
        """In a forked child (the backends' registry calls it first): a lock held by another
        thread at fork() stays held for ever in the child."""
        self._lock = threading.Lock()

    def use(self) -> MappingUse:
        """A snapshot of the process's mappings and vrange's reservations."""
        max_map_count = self.max_map_count
        with self._lock:
            reserved = self._reserved
        return MappingUse(max_map_count=max_map_count, budget=max_map_count // BUDGET_SHARE,
                          reserved=reserved, in_use=process_mapping_count())


mapping_budget = MappingBudget()

