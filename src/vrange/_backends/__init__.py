"""Backend selection: which backends exist, which can run here, and what ``auto`` picks."""

from __future__ import annotations

# Backends whose implementation ships in this version. The feature report combines this with what
# the kernel and process allow.
IMPLEMENTED_BACKENDS: frozenset[str] = frozenset()

KNOWN_BACKENDS = ("uffd", "sigbus")


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run in this process, best first."""
    from .._features import features

    return tuple(support.name for support in features().backends if support.usable)
