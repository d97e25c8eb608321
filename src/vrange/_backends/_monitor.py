"""The native pressure monitor (``_native/pressure.c``) for ``vrange.policy``: one per process, a
thread that blocks in ``poll()`` without the GIL and purges managed regions in policy order."""

from __future__ import annotations

from typing import Any

from .._native import ffi, lib
from ..errors import check
from ._base import BackendRegion

MAX_GROUPS = int(lib.VR_MAX_GROUPS)
USAGE_KINDS = {"none": lib.VR_USAGE_NONE, "cgroup": lib.VR_USAGE_CGROUP,
               "meminfo": lib.VR_USAGE_MEMINFO}
STATS_FIELDS = ("last_usage", "peak_usage", "wakeups", "signal_events", "pokes", "checks",
                "purges_pressure", "purges_budget", "bytes_pressure", "bytes_budget",
                "throttled_faults", "handler_reinstalls")


class NativeMonitor:
    """The native monitor struct. It lives as long as the process (fault paths may hold a pointer
    to it): it is configured again, never replaced. Every method returns or raises at once; none
    runs Python on the monitor's thread."""

    def __init__(self) -> None:
        out = ffi.new("vr_monitor **")
        check(lib.vr_monitor_new(out), "create the pressure monitor (eventfd)")
        self.pointer: Any = out[0]

    def configure(self, usage_fd: int, usage_kind: str, high_water: int, low_water: int,
                  interval_ms: int) -> int:
        """0 or -errno (the caller closes ``usage_fd`` on failure; the monitor owns it after)."""
        return int(lib.vr_monitor_configure(self.pointer, usage_fd, USAGE_KINDS[usage_kind],
                                            high_water, low_water, interval_ms))

    def add_signal(self, fd: int, poll_events: int, rearm: int) -> int:
        """Watch ``fd`` (owned by the monitor on success); 0 or -errno."""
        return int(lib.vr_monitor_add_signal(self.pointer, fd, poll_events, rearm))

    def set_budget(self, group_id: int, budget: int) -> None:
        check(lib.vr_monitor_set_budget(self.pointer, group_id, budget), "set a budget")

    def attach(self, core: BackendRegion) -> None:
        check(lib.vr_monitor_attach(self.pointer, core.pointer), "put the region under the policy")

    def detach(self, core: BackendRegion) -> None:
        """Waits for a purge of the region in progress."""
        if core.pointer != ffi.NULL:
            lib.vr_monitor_detach(self.pointer, core.pointer)

    def start(self) -> None:
        check(lib.vr_monitor_start(self.pointer), "start the pressure monitor thread")

    def stop(self) -> None:
        lib.vr_monitor_stop(self.pointer)

    def reset(self) -> None:
        """Forget the configuration and close the watched descriptors (the thread is stopped)."""
        lib.vr_monitor_reset(self.pointer)

    def after_fork(self) -> None:
        """In a forked child: the thread does not exist; the descriptors are the parent's."""
        lib.vr_monitor_after_fork(self.pointer)

    def check(self) -> int:
        """One check now (usage, then budgets); bytes given back."""
        return int(lib.vr_monitor_check(self.pointer))

    def enforce_budgets(self) -> int:
        return int(lib.vr_monitor_enforce_budgets(self.pointer))

    def resident_volatile(self, group_id: int) -> int:
        return int(lib.vr_monitor_resident_volatile(self.pointer, group_id))

    def stats(self) -> dict[str, int]:
        native = ffi.new("struct vr_monitor_stats *")
        lib.vr_monitor_stats(self.pointer, native)
        return {name: int(getattr(native, name)) for name in STATS_FIELDS}
