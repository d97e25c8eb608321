"""Backends: the layer between vrange's public API and its native core.

Everything that calls the native core lives under this package; the public modules (``region``,
``io``, ``sources``, ``policy``, ``testing``, ``bench``) call it only through here.

A backend is named by a *spec*: ``"auto"``, ``"uffd"``, ``"sigbus"`` (with the trap the feature report
prefers here), or ``"sigbus:uffd"`` / ``"sigbus:memfd"`` to force one trap of the sigbus backend (for
tests and compatibility runs). ``$VRANGE_BACKEND`` takes the same specs. Which backends exist, and
the order ``auto`` tries them in, is the table in ``_table``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

from .._feature_report import Features
from ..errors import BackendUnavailable
from ._base import (ERROR_POLICIES, PURGE_REASONS, BackendRegion, Plan, RegionStats,
                    SourceSpec)
from ._memory import buffer_address
from ._probes import features, invalidate
from ._regeneration import Regeneration, any_regenerating_on_this_thread
from ._registry import find as find_live_region
from ._registry import live_regions, on_fork_in_child, on_fork_reset_lock
from ._table import AUTO_ORDER, BACKENDS, KNOWN_SPECS

__all__ = [
    "AUTO_ORDER", "BACKENDS", "BACKEND_ENVIRONMENT_VARIABLE", "ERROR_POLICIES", "KNOWN_SPECS",
    "PURGE_REASONS", "BackendChoice", "BackendRegion", "DefaultBackend", "Plan", "Regeneration",
    "RegionStats", "SourceSpec", "any_regenerating_on_this_thread", "available_backends",
    "buffer_address", "default_backend", "features", "find_live_region", "invalidate",
    "live_regions", "on_fork_in_child", "on_fork_reset_lock", "resolve_backend", "usable_specs",
]

BACKEND_ENVIRONMENT_VARIABLE = "VRANGE_BACKEND"


class BackendChoice(NamedTuple):
    """The backend a region uses, and its variant (the sigbus backend's trap)."""

    name: str
    trap: str | None
    backend: type[BackendRegion]

    def default_error_policy(self, report: Features) -> str:
        return self.backend.default_error_policy(report)

    def error_policy_problem(self, policy: str, report: Features) -> str | None:
        return self.backend.error_policy_problem(policy, report)


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run in this process, best first."""
    report = features()
    return tuple(name for name in AUTO_ORDER if report.backend(name).usable)


def usable_specs() -> list[str]:
    """Every explicit backend spec this process can run (``uffd``, ``sigbus:uffd``,
    ``sigbus:memfd``), for tools that run something on each backend (demo, stress, bench)."""
    report = features()
    specs = []
    for name, backend in BACKENDS.items():
        if not report.backend(name).usable:
            continue
        if not backend.variants:
            specs.append(name)
        specs += [f"{name}:{variant}" for variant in backend.variants
                  if report.trap(variant).usable]
    return specs


def resolve_backend(requested: str | None) -> BackendChoice:
    """The backend a new region uses: ``requested``, else ``$VRANGE_BACKEND``, else ``auto``.

    Unknown spec: ValueError. A known backend or variant that cannot run here: BackendUnavailable
    with the reason from the feature report.
    """
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
    name, _, variant = spec.partition(":")
    if name == "auto":
        if report.auto_backend is None:
            raise BackendUnavailable(report.auto_reason)
        name = report.auto_backend
    backend = BACKENDS[name]
    support = report.backend(name)
    if not support.usable:
        raise BackendUnavailable(f"backend {name!r} cannot run here{source}: {support.reason}")
    if variant:
        variant_support = report.trap(variant)
        if not variant_support.usable:
            raise BackendUnavailable(f"the {name} backend's {variant} trap cannot run "
                                     f"here{source}: {variant_support.reason}")
        return BackendChoice(name, variant, backend)
    return BackendChoice(name, backend.default_variant(support), backend)


@dataclass(frozen=True)
class DefaultBackend:
    """What a region made without ``backend=`` uses here, and whether ``$VRANGE_BACKEND`` chose it
    instead of ``auto``."""

    spec: str
    """``$VRANGE_BACKEND`` where it is set (and not empty), else ``"auto"``."""
    from_environment: bool
    backend: str | None
    """The backend spec that runs, with its trap (``"uffd"``, ``"sigbus:memfd"``); None where
    ``spec`` cannot run here."""
    problem: str | None
    """Why ``spec`` cannot run here (or is no backend spec at all); None where it runs."""
    auto: str | None
    """What ``auto`` picks here (backend and trap); None where no backend can run."""

    def describe(self) -> str:
        """One line: the backend, and where the choice comes from."""
        auto = f"auto would pick {self.auto}" if self.auto else "auto finds no backend here"
        if not self.from_environment:
            return (f"{self.backend} (auto; ${BACKEND_ENVIRONMENT_VARIABLE} is not set)"
                    if self.backend else f"none: {self.problem}")
        source = f"${BACKEND_ENVIRONMENT_VARIABLE}={self.spec}"
        if self.backend is None:
            return f"none: {source} cannot run here ({self.problem}); {auto}"
        return f"{self.backend} (from {source}; {auto})"

    def as_dict(self) -> dict[str, object]:
        """The fields, and the :meth:`describe` line as ``text``."""
        return {"spec": self.spec, "from_environment": self.from_environment,
                "backend": self.backend, "problem": self.problem, "auto": self.auto,
                "text": self.describe()}


def _spec_of(choice: BackendChoice) -> str:
    return f"{choice.name}:{choice.trap}" if choice.trap else choice.name


def default_backend() -> DefaultBackend:
    """What regions made without ``backend=`` use in this process now (``$VRANGE_BACKEND`` or
    ``auto``), for ``python -m vrange features``."""
    requested = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) or ""
    try:
        auto: str | None = _spec_of(resolve_backend("auto"))
    except BackendUnavailable:
        auto = None
    try:
        chosen: str | None = _spec_of(resolve_backend(requested or "auto"))
        problem = None
    except (ValueError, BackendUnavailable) as error:
        chosen, problem = None, str(error)
    return DefaultBackend(requested or "auto", bool(requested), chosen, problem, auto)
