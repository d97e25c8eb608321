"""vrange's own pressure policy: purge volatile memory before the OOM killer, where the kernel cannot.

The kernel takes back volatile pages of regions it can reclaim (the uffd backend, the sigbus
backend's userfaultfd trap) by itself. Pages behind the sigbus backend's memfd trap (where no
userfaultfd opens at all, e.g. under a container's default seccomp profile) are never reclaimed by
the kernel: without a policy a cache larger than its memory limit is OOM-killed. So vrange runs one
**pressure monitor** per process, a native thread that blocks in ``poll()`` (never holding the GIL),
and purges volatile chunks of the regions it **manages**:

- when memory usage passes the high-water mark (the limiting cgroup's usage, or MemTotal -
  MemAvailable without a limit), until usage is back under the low-water mark; see
  :attr:`vrange.Features.pressure` for which signal wakes it here and why;
- when the resident volatile memory of the managed regions exceeds a byte budget
  (:func:`set_budget`, process-wide or per group).

It purges the lowest ``priority`` first, then the chunks marked volatile longest ago, whole chunks
only, never a pinned chunk nor one held for a system call. Purges are counted by reason in
``Region.stats().purges_by_reason`` and in :func:`stats`.

Which regions are managed: ``Region(..., managed=None)`` (the default) manages the regions the kernel
cannot reclaim and the regions given a ``group``; ``managed=True`` or ``False`` decides it for one
region. The monitor starts with the first managed region; :func:`configure` tunes or disables it.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from ._backends import BackendRegion, features, on_fork_in_child, on_fork_reset_lock
from ._backends._monitor import MAX_GROUPS, NativeMonitor
from ._backends._registry import live_regions
from ._feature_report import PressurePlan
from .errors import VRangeError, check

__all__ = ["PolicyStats", "configure", "enforce", "set_budget", "stats", "stop"]

logger = logging.getLogger("vrange")

_lock = threading.RLock()
_managed: weakref.WeakSet[BackendRegion] = weakref.WeakSet()
_groups: dict[str, int] = {}
_budgets: dict[str | None, int] = {}
_overrides: dict[str, Any] = {"monitor": True, "high_water": None, "low_water": None}


@dataclass(frozen=True)
class PolicyStats:
    """What the pressure monitor and the budgets did in this process (:func:`stats`)."""

    signal: str
    """What wakes the monitor: ``cgroup-v2``, ``cgroup-v1``, ``psi``, ``meminfo`` or ``off``."""
    reason: str
    running: bool
    managed_regions: int
    limit_bytes: int
    high_water_bytes: int
    low_water_bytes: int
    usage_bytes: int
    """The usage the limit applies to, at the last check (-1: unknown)."""
    peak_usage_bytes: int
    resident_volatile_bytes: int
    """Resident volatile memory of the managed regions now."""
    budget_bytes: int | None
    group_budgets: dict[str, int] = field(default_factory=dict)
    wakeups: int = 0
    signal_events: int = 0
    pokes: int = 0
    """Wake-ups by vrange's own refills (every quarter of the headroom refilled)."""
    checks: int = 0
    purges_by_reason: dict[str, int] = field(default_factory=dict)
    """Chunks purged by the policy: ``pressure`` and ``budget``."""
    bytes_by_reason: dict[str, int] = field(default_factory=dict)
    throttled_faults: int = 0
    """Refills that waited for a purge under way above the high-water mark."""
    handler_reinstalls: int = 0
    """Times the monitor's thread put vrange's SIGBUS handler back after other code replaced it."""


def _effective_marks(plan: PressurePlan, high: int | None, low: int | None) -> tuple[int, int]:
    """The water marks from the plan and the overrides; ValueError if low would exceed high."""
    plan_headroom = plan.high_water_bytes - plan.low_water_bytes
    high_water = plan.high_water_bytes if high is None else high
    low_water = low if low is not None else max(high_water - plan_headroom, 0)
    if low_water > high_water:
        raise ValueError(f"low_water ({low_water}) must not exceed high_water ({high_water})")
    return high_water, low_water


class _Monitor:
    """The native monitor of this process and what it watches. The native struct lives as long as
    the process (fault paths may hold a pointer to it): it is configured again, never replaced."""

    def __init__(self) -> None:
        self.native = NativeMonitor()
        self.running = False
        self.signal, self.reason = "off", "not configured yet"
        self.limit = self.high_water = self.low_water = 0

    def apply(self) -> None:
        """(Re)configure from the feature report and the settings, and (re)start the thread."""
        plan = features().pressure
        high_water, low_water = _effective_marks(plan, _overrides["high_water"],
                                                 _overrides["low_water"])
        if self.running:
            self.native.stop()
            self.running = False
        self.native.reset()
        self.plan, self.limit = plan, plan.limit_bytes
        self.high_water, self.low_water = high_water, low_water
        self._configure_usage()
        if _overrides["monitor"]:
            self.signal, self.reason = self._watch()
            self.native.start()
            self.running = True
        else:
            self.signal = "off"
            self.reason = "the monitor thread is stopped (vrange.policy.configure(monitor=False))"
        for group, budget in _budgets.items():
            self.set_budget(group, budget)

    def _configure_usage(self) -> None:
        plan = self.plan
        try:
            usage_fd = os.open(plan.usage_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            logger.warning("the pressure monitor cannot read %s (%s): no pressure purges",
                           plan.usage_file, error)
            check(self.native.configure(-1, "none", 0, 0, -1), "configure the pressure monitor")
            self.high_water = self.low_water = 0
            return
        result = self.native.configure(usage_fd, plan.usage_kind, self.high_water, self.low_water,
                                       plan.interval_ms)
        if result < 0:
            os.close(usage_fd)
        check(result, "configure the pressure monitor")

    def _add_signal(self, fd: int, events: int, rearm: int) -> None:
        result = self.native.add_signal(fd, events, rearm)
        if result < 0:
            os.close(fd)
        check(result, "watch a memory-pressure signal")

    def _psi_trigger(self, path: str) -> int:
        """A PSI trigger: 100 ms of stall in 1 s, or in 2 s where unprivileged users need that."""
        refused: tuple[int, str] = (0, "")
        for trigger in (b"some 100000 1000000\0", b"some 150000 2000000\0"):
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(fd, trigger)
                return fd
            except OSError as error:
                os.close(fd)
                # Keep no exception: its traceback would keep the callers' frames (and the region
                # being made) alive.
                refused = (error.errno or 0, error.strerror or "")
        raise OSError(*refused)

    def _watch(self) -> tuple[str, str]:
        """Open the kernel's pressure signals for the plan; falls back to polling with the reason."""
        plan = self.plan
        notes = []
        if plan.threshold_control is not None and self.high_water > 0:
            try:
                event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                usage_fd = os.open(plan.usage_file, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    with open(plan.threshold_control, "w") as control:
                        control.write(f"{event_fd} {usage_fd} {self.high_water}")
                finally:
                    os.close(usage_fd)  # the registration keeps its own reference
                self._add_signal(event_fd, select.POLLIN, 1)
            except OSError as error:
                notes.append(f"no usage threshold ({error.strerror})")
        if plan.psi_file is not None:
            try:
                self._add_signal(self._psi_trigger(plan.psi_file), select.POLLPRI, 0)
            except OSError as error:
                notes.append(f"no PSI trigger on {plan.psi_file} ({error.strerror})")
        if plan.events_file is not None:
            try:
                fd = os.open(plan.events_file, os.O_RDONLY | os.O_CLOEXEC)
                self._add_signal(fd, select.POLLPRI, 2)
            except OSError as error:
                notes.append(f"no memory.events ({error.strerror})")
        reason = plan.reason + ("" if not notes else "; " + "; ".join(notes)
                                + ": the periodic usage check remains")
        return plan.signal, reason

    def set_budget(self, group: str | None, budget: int) -> None:
        group_id = -1 if group is None else _group_id(group)
        self.native.set_budget(group_id, budget)


_monitor: _Monitor | None = None


def _get_monitor() -> _Monitor:
    global _monitor
    with _lock:
        if _monitor is None:
            monitor = _Monitor()
            monitor.apply()
            _monitor = monitor
        return _monitor


def _group_id(name: str) -> int:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a group is named by a non-empty str, not {name!r}")
    with _lock:
        if name not in _groups:
            if len(_groups) >= MAX_GROUPS:
                raise VRangeError(f"at most {MAX_GROUPS} groups")
            _groups[name] = len(_groups)
        return _groups[name]


def manage(core: BackendRegion, priority: int, group: str | None) -> None:
    """Put a region under the policy (called by Region)."""
    core.set_policy(priority, -1 if group is None else _group_id(group))
    core.priority, core.group = priority, group
    monitor = _get_monitor()
    monitor.native.attach(core)
    with _lock:
        _managed.add(core)
    core.managed = True


def release(core: BackendRegion) -> None:
    """Take a region out of the policy (close); waits for a purge of it in progress."""
    if not getattr(core, "managed", False):
        return
    core.managed = False
    with _lock:
        _managed.discard(core)
        monitor = _monitor
    if monitor is not None:
        monitor.native.detach(core)


def start_watchdog() -> None:
    """Make sure the monitor's thread runs: it also puts vrange's SIGBUS handler back in front when
    other code replaced it while userfaultfd-trap regions are open."""
    _get_monitor()


def after_mark_volatile(core: BackendRegion) -> None:
    """Budgets are enforced as soon as more memory becomes volatile."""
    if getattr(core, "managed", False) and _budgets and _monitor is not None:
        _monitor.native.enforce_budgets()


def set_budget(nbytes: int | None, group: str | None = None) -> None:
    """Keep the resident volatile memory of the managed regions (of ``group``, or all) under
    ``nbytes``: beyond it, vrange purges (reason ``budget``) in policy order. ``None`` removes the
    budget. Enforced when memory is marked volatile and whenever the monitor checks."""
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)
                               or nbytes < 0):
        raise ValueError(f"a budget is a non-negative int of bytes or None, not {nbytes!r}")
    if group is not None:
        _group_id(group)
    with _lock:
        if nbytes is None:
            _budgets.pop(group, None)
        else:
            _budgets[group] = nbytes
        monitor = _get_monitor()
    monitor.set_budget(group, -1 if nbytes is None else nbytes)
    if nbytes is not None:
        monitor.native.enforce_budgets()


def enforce() -> int:
    """Run one check now (usage against the water marks, then the budgets), as the monitor does
    when it wakes; returns the bytes given back."""
    return _get_monitor().native.check()


def configure(*, monitor: bool | None = None, high_water: int | None = None,
              low_water: int | None = None) -> None:
    """Tune the policy of this process.

    - ``monitor=False`` stops the monitor thread (budgets are still enforced when memory is marked
      volatile; nothing purges under pressure), ``True`` starts it again;
    - ``high_water`` / ``low_water`` (bytes of usage) replace the marks derived from the limit
      (purge when usage passes an eighth of the limit below it, down to a quarter below). A mark
      not given keeps its setting; ``low_water`` defaults to ``high_water`` minus the plan's gap.
      ValueError when ``low_water`` would exceed ``high_water``: nothing is changed then.
    """
    for name, value in (("high_water", high_water), ("low_water", low_water)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int of bytes, not {value!r}")
    if monitor is not None and not isinstance(monitor, bool):
        raise ValueError(f"monitor must be True or False, not {monitor!r}")
    with _lock:
        new_high = high_water if high_water is not None else _overrides["high_water"]
        new_low = low_water if low_water is not None else _overrides["low_water"]
        _effective_marks(features().pressure, new_high, new_low)  # refuse before changing anything
        if monitor is not None:
            _overrides["monitor"] = monitor
        _overrides["high_water"], _overrides["low_water"] = new_high, new_low
        if _monitor is not None:
            _monitor.apply()


def stop() -> None:
    """Stop the monitor thread (``configure(monitor=False)``)."""
    configure(monitor=False)


def stats() -> PolicyStats:
    """What the policy did in this process, and what it watches (before the first managed region,
    what it would watch)."""
    monitor = _monitor
    if monitor is None:
        plan = features().pressure
        return PolicyStats(
            signal=plan.signal, reason=plan.reason, running=False, managed_regions=0,
            limit_bytes=plan.limit_bytes, high_water_bytes=plan.high_water_bytes,
            low_water_bytes=plan.low_water_bytes, usage_bytes=-1, peak_usage_bytes=-1,
            resident_volatile_bytes=0, budget_bytes=_budgets.get(None),
            group_budgets={name: value for name, value in _budgets.items() if name is not None},
            purges_by_reason={"pressure": 0, "budget": 0}, bytes_by_reason={"pressure": 0, "budget": 0})
    native = monitor.native.stats()
    with _lock:
        managed = sum(1 for core in _managed if core.managed)
        group_budgets = {name: _budgets[name] for name in _groups if name in _budgets}
        budget = _budgets.get(None)
    return PolicyStats(
        signal=monitor.signal, reason=monitor.reason, running=monitor.running,
        managed_regions=managed, limit_bytes=monitor.limit,
        high_water_bytes=monitor.high_water, low_water_bytes=monitor.low_water,
        usage_bytes=native["last_usage"], peak_usage_bytes=native["peak_usage"],
        resident_volatile_bytes=monitor.native.resident_volatile(-1),
        budget_bytes=budget, group_budgets=group_budgets,
        wakeups=native["wakeups"], signal_events=native["signal_events"],
        pokes=native["pokes"], checks=native["checks"],
        purges_by_reason={"pressure": native["purges_pressure"],
                          "budget": native["purges_budget"]},
        bytes_by_reason={"pressure": native["bytes_pressure"], "budget": native["bytes_budget"]},
        throttled_faults=native["throttled_faults"],
        handler_reinstalls=native["handler_reinstalls"],
    )


def should_manage(core: BackendRegion) -> bool:
    """Whether a region is put under the policy: as asked (``Region(managed=...)``), or, when not
    asked, if the kernel cannot reclaim it or it belongs to a group."""
    if core.management is not None:
        return core.management
    return not core.kernel_reclaims or core.group is not None


def _new_lock_after_fork() -> None:
    """First in a forked child: the policy's lock, and the native monitor's (its thread does not
    exist here and its descriptors are the parent's)."""
    global _lock
    _lock = threading.RLock()
    if _monitor is not None:
        _monitor.native.after_fork()
        _monitor.running = False


def _after_fork_in_child() -> None:
    """Once the backends work in the forked child: configure the child's monitor again and start
    its thread, and take on the regions the child's backends can no longer leave to the kernel (a
    sigbus region moved to the memfd trap)."""
    for core in live_regions():
        if not core.mapped():  # closed by another thread as the process forked: never purge it
            core.managed = False
            with _lock:
                _managed.discard(core)
            if _monitor is not None:  # before its thread starts again
                _monitor.native.detach(core)
    if _monitor is not None:
        try:
            _monitor.apply()
        except (OSError, ValueError) as error:
            logger.error("the forked child has no pressure monitor: %s", error)
    for core in live_regions():
        if core.managed or core.unusable or not should_manage(core):
            continue
        try:
            manage(core, core.priority, core.group)
        except (OSError, VRangeError) as error:
            logger.error("a region of the forked child has no pressure policy: %s", error)


on_fork_reset_lock(_new_lock_after_fork)
on_fork_in_child(_after_fork_in_child)
