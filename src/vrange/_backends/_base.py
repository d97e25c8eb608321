"""The interface every backend implements for one region (chunk indices, already validated)."""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class RegionStats:
    """Counters and current sizes of one region (``Region.stats()``)."""

    faults_served: int
    """Faults resolved by regenerating a chunk (first touches and refills after purges)."""
    faults_on_handler_thread: int
    """Served by the backend's own thread (native sources)."""
    faults_on_faulting_thread: int
    """Served on the thread that faulted (a Python regenerator run while it held the GIL)."""
    faults_on_worker_thread: int
    """Served by a worker that took the GIL (faults inside syscalls, threads without the GIL)."""
    bytes_regenerated: int
    regeneration_errors: int
    purges: int
    """Chunks discarded: by ``purge()`` or found discarded by the kernel."""
    volatile_bytes: int
    nonvolatile_bytes: int
    resident_bytes: int
    """Pages present in memory now (lazy-free pages count until the kernel takes them)."""
    purged_bytes: int
    """Bytes that were filled once and are missing now (purged and not yet refilled)."""


class BackendRegion(abc.ABC):
    """One region's native state in one backend."""

    name: str

    @abc.abstractmethod
    def mark_volatile(self, first_chunk: int, end_chunk: int) -> None: ...

    @abc.abstractmethod
    def discard(self, first_chunk: int, end_chunk: int, only_failed: bool) -> None:
        """Make the chunks missing again (all, or only those whose regeneration failed)."""

    @abc.abstractmethod
    def populate(self, first_chunk: int, end_chunk: int) -> int:
        """Make every page present; 0 or -errno (a regeneration may have failed)."""

    @abc.abstractmethod
    def finish_nonvolatile(self, first_chunk: int, end_chunk: int) -> list[bool]:
        """Pin the chunks; for each, whether it was purged since marked volatile."""

    @abc.abstractmethod
    def purge(self, first_chunk: int, end_chunk: int) -> int: ...

    @abc.abstractmethod
    def chunk_states(self) -> bytes: ...

    @abc.abstractmethod
    def residency(self) -> bytes: ...

    @abc.abstractmethod
    def counters(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Called after the mapping is gone."""
