"""Backend selection: which backends exist, which can run here, and what ``auto`` picks."""

from __future__ import annotations

import os

from ..errors import BackendUnavailable

# Backends whose implementation ships in this version. The feature report combines this with what
# the kernel and process allow.
IMPLEMENTED_BACKENDS: frozenset[str] = frozenset({"uffd", "sigbus"})

KNOWN_BACKENDS = ("uffd", "sigbus")
BACKEND_ENVIRONMENT_VARIABLE = "VRANGE_BACKEND"


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run in this process, best first."""
    from .._features import features

    return tuple(support.name for support in features().backends if support.usable)


def resolve_backend(requested: str | None) -> str:
    """The backend a new region uses: ``requested``, else ``$VRANGE_BACKEND``, else ``auto``.

    Unknown name: ValueError. A known backend that cannot run here: BackendUnavailable with the
    reason from the feature report.
    """
    from .._features import features

    name = requested
    if name is None:
        name = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) or "auto"
        source = f" (from ${BACKEND_ENVIRONMENT_VARIABLE})" if requested is None and \
            os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) else ""
    else:
        source = ""
    if not isinstance(name, str) or name not in ("auto", *KNOWN_BACKENDS):
        raise ValueError(f"unknown backend {name!r}{source}; choose one of "
                         f"{', '.join(repr(n) for n in ('auto', *KNOWN_BACKENDS))}")
    report = features()
    if name == "auto":
        if report.auto_backend is None:
            raise BackendUnavailable(report.auto_reason)
        return report.auto_backend
    support = report.backend(name)
    if not support.usable:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {support.reason}")
    return name
