"""The one registry of live regions, and the one at-fork hook of the library.

Every backend region registers itself here while it is open; code handed a raw buffer (``vrange.io``)
finds its region by address here. After ``fork()`` the child runs :func:`_after_fork_in_child` only:

1. the library's own locks are made anew (a lock another thread held at fork() stays held for ever in
   the child): the registry's, then those registered with :func:`on_fork_reset_lock`;
2. each backend class resets its process-wide state (``BackendRegion.reset_after_fork``: the uffd
   handler thread, the sigbus trap descriptor), in the order the backends were defined;
3. each live region is made to work in the child (``BackendRegion.after_fork_in_child``); a region
   another thread had unmapped but not yet unregistered when the process forked (it was closing) is
   given up instead (``BackendRegion.gone_in_child``): its address may be another mapping's by now;
4. the listeners of layers above the backends run (:func:`on_fork_in_child`: the pressure policy,
   ``vrange.Region``'s own locks, the helpers of isolated regenerators), in registration order.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

logger = logging.getLogger("vrange")



class LiveRegion(Protocol):
    """What the registry needs of a region (``BackendRegion`` implements it)."""

    base: int
    size: int

    def mapped(self) -> bool: ...

    def after_fork_in_child(self) -> None: ...

    def gone_in_child(self) -> None: ...


R = TypeVar("R")

_lock = threading.Lock()
_regions_by_base: weakref.WeakValueDictionary[int, LiveRegion] = weakref.WeakValueDictionary()
_backend_classes: list[Any] = []  # BackendRegion subclasses
_lock_resets: list[Callable[[], None]] = []
_child_listeners: list[Callable[[], None]] = []


def add_backend_class(backend: Any) -> None:
    """Called for every concrete backend class as it is defined (``BackendRegion.__init_subclass__``)."""
    _backend_classes.append(backend)


def register(region: LiveRegion) -> None:
    """A region that is open from now on (its native state exists and serves faults)."""
    with _lock:
        _regions_by_base[region.base] = region


def unregister(region: LiveRegion) -> None:
    with _lock:
        if _regions_by_base.get(region.base) is region:
            del _regions_by_base[region.base]


def live_regions(backend: type[R] | None = None) -> list[Any]:
    """The open regions (of one backend class: a ``BackendRegion`` subclass; all by default)."""
    with _lock:
        regions = list(_regions_by_base.values())
    return [region for region in regions if backend is None or isinstance(region, backend)]


def find(address: int) -> Any:
    """The open region whose mapping contains ``address``, if any. A region another thread has
    unmapped but not unregistered yet (it is closing) is passed over: a new region may already have
    the address, or part of its range."""
    for region in live_regions():
        if region.base <= address < region.base + region.size and region.mapped():
            return region
    return None


def on_fork_reset_lock(reset: Callable[[], None]) -> None:
    """Run ``reset`` first in a forked child: it makes a module's lock anew."""
    _lock_resets.append(reset)


def on_fork_in_child(listener: Callable[[], None]) -> None:
    """Run ``listener`` in a forked child once every backend and live region works there."""
    _child_listeners.append(listener)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for reset in _lock_resets:
        reset()
    regions = [region for region in live_regions() if region.mapped()]
    for region in live_regions():
        if not region.mapped():
            region.gone_in_child()
    for backend in _backend_classes:
        backend.reset_after_fork([region for region in regions if isinstance(region, backend)])
    for region in regions:
        region.after_fork_in_child()
    for listener in _child_listeners:
        try:
            listener()
        except Exception:  # noqa: BLE001 - one layer's failure must not leave the others undone
            logger.exception("an after-fork step failed in the child")


os.register_at_fork(after_in_child=_after_fork_in_child)
