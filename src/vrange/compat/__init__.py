"""The compatibility matrix: the same scenarios on every backend under every profile.

``python -m vrange compat`` runs it (see :mod:`vrange.compat.runner`). A *scenario*
(:mod:`vrange.compat.scenarios`) is one thing users rely on, checked by behaviour: bytes read back,
exceptions raised, counters, how a process ends. A *profile* (:mod:`vrange.compat.profiles`)
restricts a process the way real deployments do (a container's seccomp profile, an unprivileged
user, an older kernel simulated by a seccomp filter). Each profile runs in a process of its own,
each cell (scenario × backend) in a forked child with an alarm, so a crash or a hang is one failed
cell. A cell's result is ``pass``, ``fail`` or ``n/a`` (the backend cannot run under the profile,
or the scenario does not apply to it), always with a reason.
"""

from __future__ import annotations

from .profiles import PROFILES, Profile
from .runner import BACKENDS, Cell, run
from .scenarios import SCENARIOS, NotApplicable, Scenario

__all__ = ["BACKENDS", "PROFILES", "SCENARIOS", "Cell", "NotApplicable", "Profile", "Scenario",
           "run"]
