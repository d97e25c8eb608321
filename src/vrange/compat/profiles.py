"""Profiles: the ways a process can be restricted, each applied for good to the process it runs in.

A profile's ``apply`` changes the calling process (a seccomp filter cannot be removed, a dropped
privilege cannot be taken back): the runner calls it in a process of the profile's own. Adding a
profile is adding one entry to :data:`PROFILES`; the simulated older kernels of
:mod:`vrange.testing` (``KERNEL_PROFILES``, applied by ``simulate_kernel``) join the table by
themselves.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from .. import testing

__all__ = ["NOBODY", "PROFILES", "Profile", "profile_names"]

logger = logging.getLogger(__name__)

NOBODY = 65534
"""The uid (and gid) of the unprivileged profile."""


@dataclass(frozen=True)
class Profile:
    """One way to restrict a process.

    ``apply`` restricts the calling process and returns None, or returns why the profile cannot be
    applied here (then every cell of the profile is ``n/a`` with that reason).
    """

    name: str
    description: str
    apply: Callable[[], str | None]
    kind: str = "process"
    """``process`` (this kernel, a restricted process) or ``kernel`` (an older kernel, simulated)."""


def _native() -> str | None:
    return None


def _deny_userfaultfd(error_number: int) -> Callable[[], str | None]:
    def apply() -> str | None:
        testing.deny_userfaultfd(error_number)
        return None

    return apply


def _unprivileged() -> str | None:
    if os.geteuid() != 0:
        return f"needs root to drop privileges to uid {NOBODY} (this process runs as uid " \
               f"{os.geteuid()})"
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return None


def _simulated_kernel(name: str) -> Callable[[], str | None]:
    def apply() -> str | None:
        try:
            testing.simulate_kernel(name)  # type: ignore[attr-defined]
        except (OSError, ValueError) as error:
            return f"cannot simulate this kernel here: {error}"
        return None

    return apply


def _profiles() -> dict[str, Profile]:
    table = [
        Profile("native", "this process as it is", _native),
        Profile("seccomp-eperm", "userfaultfd denied with EPERM (Docker's default seccomp profile)",
                _deny_userfaultfd(errno.EPERM)),
        Profile("seccomp-enosys", "userfaultfd denied with ENOSYS (other container runtimes)",
                _deny_userfaultfd(errno.ENOSYS)),
        Profile("unprivileged", f"uid {NOBODY}, no capabilities (a user-mode-only userfaultfd "
                "at most)", _unprivileged),
    ]
    table += [Profile(name, description, _simulated_kernel(name), kind="kernel")
              for name, description in testing.KERNEL_PROFILES.items()]
    return {profile.name: profile for profile in table}


PROFILES: dict[str, Profile] = _profiles()
"""Every profile, by name, in the order the matrix shows them."""


def profile_names() -> list[str]:
    """The names of every profile, in matrix order."""
    return list(PROFILES)
