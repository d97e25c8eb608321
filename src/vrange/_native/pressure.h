/* The pressure monitor and the purge policy shared by regions (pressure.c).
 *
 * One monitor per process (made by Python, never a C global): a thread that blocks in poll() on the
 * signals Python set up for it (a PSI trigger, a cgroup v1 usage threshold eventfd, cgroup v2
 * memory.events) and on an eventfd poked by the fault path, reads the memory usage that matters
 * (the limiting cgroup's, or MemTotal - MemAvailable), and when usage passes the high-water mark
 * purges volatile chunks of the regions it manages, lowest priority first and then the ones marked
 * volatile longest ago, until usage is back under the low-water mark. It also enforces byte budgets
 * for resident volatile memory (process-wide and per group). It never takes the GIL: purging is
 * native state only (vr_region_purge_chunk). */
#ifndef VRANGE_PRESSURE_H
#define VRANGE_PRESSURE_H

#include "region.h"

#define VR_MAX_GROUPS 64
#define VR_MAX_SIGNAL_FDS 2

/* cffi: begin (exported to Python; build.py reads these blocks) */
enum vr_usage_kind { VR_USAGE_NONE = 0, VR_USAGE_CGROUP = 1, VR_USAGE_MEMINFO = 2 };

struct vr_monitor_stats {
    uint64_t wakeups;        /* times the thread woke up */
    uint64_t signal_events;  /* of those, by a kernel pressure signal */
    uint64_t pokes;          /* of those, by the fault path (vrange's own refills) */
    uint64_t checks;         /* usage and budget checks */
    uint64_t purges_pressure, bytes_pressure;
    uint64_t purges_budget, bytes_budget;
    uint64_t throttled_faults; /* faults that waited for the monitor to catch up */
    uint64_t handler_reinstalls; /* vrange's SIGBUS handler put back after other code replaced it */
    int64_t last_usage, peak_usage;
};

int vr_monitor_new(vr_monitor **out);
int vr_monitor_configure(vr_monitor *monitor, int usage_fd, int usage_kind, int64_t high_water,
                         int64_t low_water, int interval_ms);
int vr_monitor_add_signal(vr_monitor *monitor, int fd, int poll_events, int rearm_by_reading);
int vr_monitor_set_budget(vr_monitor *monitor, int group, int64_t bytes);
int vr_monitor_start(vr_monitor *monitor);
int vr_monitor_stop(vr_monitor *monitor);
int vr_monitor_attach(vr_monitor *monitor, vr_region *region);
void vr_monitor_detach(vr_monitor *monitor, vr_region *region);
int64_t vr_monitor_check(vr_monitor *monitor);
int64_t vr_monitor_enforce_budgets(vr_monitor *monitor);
int64_t vr_monitor_resident_volatile(vr_monitor *monitor, int group);
int64_t vr_monitor_read_usage(vr_monitor *monitor);
void vr_monitor_stats(vr_monitor *monitor, struct vr_monitor_stats *out);
void vr_monitor_reset(vr_monitor *monitor);
void vr_monitor_after_fork(vr_monitor *monitor);
/* cffi: end */

/* The fault path: a managed region is about to take `bytes` more. With `may_wait`, waits (bounded)
 * while the monitor purges above the high-water mark. Async-signal-safe. */
void vr_monitor_note_refill(vr_region *region, size_t bytes, int may_wait);

/* The watchdog the monitor's thread runs at every wake-up: 1 if it had something to put right (the
 * monitor counts it in handler_reinstalls), 0 if not, or -errno. The sigbus backend registers its
 * handler check here when it attaches a region (vr_sigbus_reinstall_if_replaced): the pressure
 * monitor sits below the backends and calls them only through this pointer. Process-wide, like the
 * signal disposition it guards; registering again replaces it. */
typedef int (*vr_monitor_watchdog)(void);
void vr_monitor_set_watchdog(vr_monitor_watchdog watchdog);

#endif /* VRANGE_PRESSURE_H */
