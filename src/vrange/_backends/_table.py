"""The backend table: which backends exist, and the order ``auto`` tries them in.

Backend choice is data: a backend is one ``BackendRegion`` subclass that states its requirements
(``assess``, evaluated by :func:`vrange.features`), why ``auto`` picks it, its variants and its
geometry. Adding a backend is adding a row here.
"""

from __future__ import annotations

from ._base import BackendRegion
from .sigbus import SigbusRegion
from .uffd import UffdRegion

BACKENDS: dict[str, type[BackendRegion]] = {
    UffdRegion.name: UffdRegion,
    SigbusRegion.name: SigbusRegion,
}
"""Every backend by name, in the order the feature report lists them."""

AUTO_ORDER: tuple[str, ...] = ("uffd", "sigbus")
"""``auto`` uses the first usable backend of this order: the uffd backend serves faults inside
system calls (they block and succeed); the sigbus backend runs where no full userfaultfd opens."""

KNOWN_SPECS: tuple[str, ...] = ("auto", *BACKENDS, *(f"{name}:{variant}"
                                                     for name, backend in BACKENDS.items()
                                                     for variant in backend.variants))
"""Every backend spec a region or ``$VRANGE_BACKEND`` accepts."""
