"""Backend selection: which backends exist, which can run here, and what ``auto`` picks.

A backend is named by a *spec*: ``"auto"``, ``"uffd"``, ``"sigbus"`` (with the trap the feature report
prefers here), or ``"sigbus:uffd"`` / ``"sigbus:memfd"`` to force one trap of the sigbus backend (for
tests and compatibility runs). ``$VRANGE_BACKEND`` takes the same specs.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ..errors import BackendUnavailable

KNOWN_BACKENDS = ("uffd", "sigbus")
SIGBUS_TRAPS = ("uffd", "memfd")
KNOWN_SPECS = ("auto", "uffd", "sigbus", *(f"sigbus:{trap}" for trap in SIGBUS_TRAPS))
BACKEND_ENVIRONMENT_VARIABLE = "VRANGE_BACKEND"


class BackendChoice(NamedTuple):
    """The backend a region uses, and for the sigbus backend its trap."""

    name: str
    trap: str | None


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run in this process, best first."""
    from .._features import features

    return tuple(support.name for support in features().backends if support.usable)


def usable_specs() -> list[str]:
    """Every explicit backend spec this process can run (``uffd``, ``sigbus:uffd``,
    ``sigbus:memfd``), for tools that run something on each backend (demo, stress, bench)."""
    from .._features import features

    report = features()
    specs = []
    for spec in ("uffd", *(f"sigbus:{trap}" for trap in SIGBUS_TRAPS)):
        name, _, trap = spec.partition(":")
        if report.backend(name).usable and (not trap or report.trap(trap).usable):
            specs.append(spec)
    return specs


def resolve_backend(requested: str | None) -> BackendChoice:
    """The backend a new region uses: ``requested``, else ``$VRANGE_BACKEND``, else ``auto``.

    Unknown spec: ValueError. A known backend or trap that cannot run here: BackendUnavailable with
    the reason from the feature report.
    """
    from .._features import features

    spec = requested
    source = ""
    if spec is None:
        spec = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) or "auto"
        if os.environ.get(BACKEND_ENVIRONMENT_VARIABLE):
            source = f" (from ${BACKEND_ENVIRONMENT_VARIABLE})"
    if not isinstance(spec, str) or spec not in KNOWN_SPECS:
        raise ValueError(f"unknown backend {spec!r}{source}; choose one of "
                         f"{', '.join(repr(n) for n in KNOWN_SPECS)}")
    report = features()
    name, _, trap = spec.partition(":")
    if name == "auto":
        if report.auto_backend is None:
            raise BackendUnavailable(report.auto_reason)
        name = report.auto_backend
    support = report.backend(name)
    if not support.usable:
        raise BackendUnavailable(f"backend {name!r} cannot run here{source}: {support.reason}")
    if name == "uffd":
        return BackendChoice("uffd", None)
    if trap:
        trap_support = report.trap(trap)
        if not trap_support.usable:
            raise BackendUnavailable(f"the sigbus backend's {trap} trap cannot run here{source}: "
                                     f"{trap_support.reason}")
        return BackendChoice("sigbus", trap)
    return BackendChoice("sigbus", support.trap)
