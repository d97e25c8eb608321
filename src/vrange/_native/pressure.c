/* The pressure monitor and the purge policy: see pressure.h.
 *
 * GIL: never taken. The thread runs C only; Python configures it (opening the cgroup and PSI files
 * is easier there) and hands it the descriptors. Signals: the thread blocks every signal, so Ctrl-C
 * and vrange's own fault signal always go to Python threads.
 *
 * Locking: `lock` guards the region list and the configuration, and is held while the monitor scans
 * and purges, so a region leaving the list (close) waits for a purge in progress. A purge claims each
 * chunk (vr_region_purge_chunk), so faults, pins and close() on that chunk wait for it, never the
 * other way round: the monitor never waits for anything a Python thread holds. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "pressure.h"

#define THROTTLE_LIMIT_NS (250LL * 1000 * 1000) /* a fault never waits longer for the monitor */
#define DEFAULT_POKE_BYTES (16ULL << 20)

enum rearm { REARM_NONE = 0, REARM_READ_EVENTFD = 1, REARM_PREAD_FILE = 2 };

struct vr_signal {
    int fd;
    short events;
    int rearm;
};

struct candidate;

struct vr_monitor {
    pthread_mutex_t lock;
    /* collect()'s buffers, kept and grown under the lock: the periodic check allocates nothing in
     * steady state (a malloc in this thread while another forks is unsafe under some allocators). */
    unsigned char *residency;
    size_t residency_size;
    struct candidate *candidates;
    size_t candidate_capacity;
    vr_region **regions;
    size_t region_count, region_capacity;
    pthread_t thread;
    int running;
    int stop;
    int wake_fd; /* eventfd: pokes from the fault path, configuration changes, stop */
    struct vr_signal signals[VR_MAX_SIGNAL_FDS];
    int signal_count;
    int usage_fd;
    int usage_kind;
    int64_t high_water, low_water; /* usage in bytes; 0: no pressure purges */
    int interval_ms;               /* proactive usage check; -1: none */
    int64_t budget;                /* resident volatile bytes of all managed regions; -1: none */
    int64_t group_budgets[VR_MAX_GROUPS];
    uint64_t refilled;   /* bytes refilled since the last poke (atomic) */
    uint64_t poke_bytes; /* poke the thread every this many refilled bytes */
    int throttle;        /* atomic: usage is over the high-water mark and a purge is under way */
    struct vr_monitor_stats stats;
};

struct candidate {
    vr_region *region;
    size_t chunk;
    int priority;
    int64_t since;
};

int vr_monitor_new(vr_monitor **out)
{
    vr_monitor *monitor = calloc(1, sizeof *monitor);
    if (!monitor)
        return -ENOMEM;
    monitor->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (monitor->wake_fd < 0) {
        int saved = errno;
        free(monitor);
        return -saved;
    }
    pthread_mutex_init(&monitor->lock, NULL);
    monitor->usage_fd = -1;
    monitor->interval_ms = -1;
    monitor->budget = -1;
    for (int group = 0; group < VR_MAX_GROUPS; group++)
        monitor->group_budgets[group] = -1;
    monitor->poke_bytes = DEFAULT_POKE_BYTES;
    *out = monitor;
    return 0;
}

static void poke(vr_monitor *monitor)
{
    uint64_t one = 1;
    /* Fails only when the counter would overflow: it is readable then anyway. */
    (void)!write(monitor->wake_fd, &one, sizeof one);
}

/* Takes ownership of usage_fd (-1: none). high_water 0: no pressure purges. */
int vr_monitor_configure(vr_monitor *monitor, int usage_fd, int usage_kind, int64_t high_water,
                         int64_t low_water, int interval_ms)
{
    if (low_water > high_water || (usage_kind != VR_USAGE_NONE && usage_fd < 0))
        return -EINVAL;
    pthread_mutex_lock(&monitor->lock);
    if (monitor->usage_fd >= 0)
        close(monitor->usage_fd);
    monitor->usage_fd = usage_fd;
    monitor->usage_kind = usage_kind;
    monitor->high_water = high_water;
    monitor->low_water = low_water;
    monitor->interval_ms = interval_ms;
    uint64_t headroom = high_water > low_water ? (uint64_t)(high_water - low_water) : 0;
    monitor->poke_bytes = headroom ? headroom / 4 : DEFAULT_POKE_BYTES;
    if (monitor->poke_bytes < (256u << 10))
        monitor->poke_bytes = 256u << 10;
    pthread_mutex_unlock(&monitor->lock);
    poke(monitor);
    return 0;
}

/* Takes ownership of fd. rearm: 0 (a PSI trigger), 1 (an eventfd: read it), 2 (a cgroup file whose
 * changes poll reports: read it again). */
int vr_monitor_add_signal(vr_monitor *monitor, int fd, int poll_events, int rearm_by_reading)
{
    pthread_mutex_lock(&monitor->lock);
    if (monitor->signal_count == VR_MAX_SIGNAL_FDS) {
        pthread_mutex_unlock(&monitor->lock);
        return -ENOSPC;
    }
    monitor->signals[monitor->signal_count++] =
        (struct vr_signal){ .fd = fd, .events = (short)poll_events, .rearm = rearm_by_reading };
    pthread_mutex_unlock(&monitor->lock);
    poke(monitor);
    return 0;
}

int vr_monitor_set_budget(vr_monitor *monitor, int group, int64_t bytes)
{
    if (group < -1 || group >= VR_MAX_GROUPS)
        return -EINVAL;
    pthread_mutex_lock(&monitor->lock);
    if (group < 0)
        monitor->budget = bytes;
    else
        monitor->group_budgets[group] = bytes;
    pthread_mutex_unlock(&monitor->lock);
    poke(monitor);
    return 0;
}

int vr_monitor_attach(vr_monitor *monitor, vr_region *region)
{
    pthread_mutex_lock(&monitor->lock);
    int rc = vr_region_list_append(&monitor->regions, &monitor->region_count,
                                   &monitor->region_capacity, region);
    if (rc == 0)
        __atomic_store_n(&region->monitor, monitor, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&monitor->lock);
    return rc;
}

void vr_monitor_detach(vr_monitor *monitor, vr_region *region)
{
    pthread_mutex_lock(&monitor->lock); /* waits for a purge in progress */
    int found = vr_region_list_remove(monitor->regions, &monitor->region_count, region);
    __atomic_store_n(&region->monitor, NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&monitor->lock);
    if (found)
        vr_region_unref(region);
}

/* --- usage -------------------------------------------------------------------------------------- */

static int64_t meminfo_field(const char *text, const char *name)
{
    const char *line = strstr(text, name);
    if (!line)
        return -1;
    return strtoll(line + strlen(name), NULL, 10) * 1024; /* "MemTotal:   24567 kB" */
}

/* The usage the limit applies to, in bytes; -1 when unknown. Called with the lock held. */
static int64_t read_usage_locked(vr_monitor *monitor)
{
    if (monitor->usage_fd < 0 || monitor->usage_kind == VR_USAGE_NONE)
        return -1;
    char text[4096];
    ssize_t n = pread(monitor->usage_fd, text, sizeof text - 1, 0);
    if (n <= 0)
        return -1;
    text[n] = '\0';
    if (monitor->usage_kind == VR_USAGE_CGROUP)
        return strtoll(text, NULL, 10);
    int64_t total = meminfo_field(text, "MemTotal:"), available = meminfo_field(text, "MemAvailable:");
    return total < 0 || available < 0 ? -1 : total - available;
}

int64_t vr_monitor_read_usage(vr_monitor *monitor)
{
    pthread_mutex_lock(&monitor->lock);
    int64_t usage = read_usage_locked(monitor);
    pthread_mutex_unlock(&monitor->lock);
    return usage;
}

/* --- choosing and purging chunks ------------------------------------------------------------------ */

static int by_priority_then_age(const void *left, const void *right)
{
    const struct candidate *a = left, *b = right;
    if (a->priority != b->priority)
        return a->priority < b->priority ? -1 : 1;
    return (a->since > b->since) - (a->since < b->since);
}

/* The purgeable chunks of the managed regions in `group` (-1: all) and their resident volatile
 * bytes. Called with the lock held. *out is the monitor's own array, valid until the next call. */
static size_t collect(vr_monitor *monitor, int group, struct candidate **out, int64_t *resident_out)
{
    size_t count = 0, capacity = monitor->candidate_capacity;
    struct candidate *candidates = monitor->candidates;
    int64_t resident = 0;
    for (size_t i = 0; i < monitor->region_count; i++) {
        vr_region *region = monitor->regions[i];
        if ((group >= 0 && region->group != group) ||
            __atomic_load_n(&region->closing, __ATOMIC_ACQUIRE) != VR_OPEN)
            continue;
        size_t pages = region->size / region->page_size;
        /* The memfd trap's chunks are whole or trapped: their state says what is resident, and
         * mincore over its many file mappings would cost a page-cache lookup per page. */
        unsigned char *vector = NULL;
        if (region->trap_kind != VR_TRAP_MEMFD) {
            if (monitor->residency_size < pages) {
                unsigned char *grown = realloc(monitor->residency, pages);
                if (!grown)
                    continue; /* out of memory: skip it this time */
                monitor->residency = grown;
                monitor->residency_size = pages;
            }
            vector = monitor->residency;
            if (mincore((void *)region->base, region->size, vector) < 0)
                continue; /* unmapped by a close in progress: skip it */
        }
        size_t pages_per_chunk = region->chunk_size / region->page_size;
        for (size_t chunk = 0; chunk < region->chunk_count; chunk++) {
            uint8_t state = vr_chunk_load(region, chunk);
            if ((state & (VR_CHUNK_VOLATILE | VR_CHUNK_MATERIALIZED)) !=
                    (VR_CHUNK_VOLATILE | VR_CHUNK_MATERIALIZED) ||
                (state & VR_CHUNK_TRAPPED))
                continue;
            size_t present = 0, first = chunk * pages_per_chunk;
            for (size_t page = first; page < first + pages_per_chunk && page < pages; page++)
                present += vector ? vector[page] & 1 : 1;
            if (!present)
                continue;
            resident += (int64_t)(present * region->page_size);
            if ((state & VR_CHUNK_IN_FLIGHT) || __atomic_load_n(&region->holds[chunk], __ATOMIC_ACQUIRE))
                continue;
            if (count == capacity) {
                capacity = capacity ? 2 * capacity : 256;
                struct candidate *grown = realloc(candidates, capacity * sizeof *grown);
                if (!grown)
                    break;
                candidates = monitor->candidates = grown;
                monitor->candidate_capacity = capacity;
            }
            candidates[count++] = (struct candidate){
                .region = region, .chunk = chunk, .priority = region->priority,
                .since = __atomic_load_n(&region->volatile_since[chunk], __ATOMIC_RELAXED) };
        }
    }
    *out = candidates;
    *resident_out = resident;
    return count;
}

/* Purge chunks of `group` in policy order until `need` bytes are given back. Lock held. */
static int64_t purge_for(vr_monitor *monitor, int group, int64_t need, int reason)
{
    struct candidate *candidates;
    int64_t resident;
    size_t count = collect(monitor, group, &candidates, &resident);
    if (count > 0) /* with none, candidates is NULL: UB for qsort even with 0 */
        qsort(candidates, count, sizeof *candidates, by_priority_then_age);
    int64_t freed = 0;
    for (size_t i = 0; i < count && freed < need; i++) {
        int64_t bytes = vr_region_purge_chunk(candidates[i].region, candidates[i].chunk, reason);
        if (bytes <= 0)
            continue;
        freed += bytes;
        if (reason == VR_PURGE_PRESSURE) {
            vr_stat_add(&monitor->stats.purges_pressure, 1);
            vr_stat_add(&monitor->stats.bytes_pressure, (uint64_t)bytes);
        } else {
            vr_stat_add(&monitor->stats.purges_budget, 1);
            vr_stat_add(&monitor->stats.bytes_budget, (uint64_t)bytes);
        }
    }
    return freed;
}

static int64_t enforce_budgets_locked(vr_monitor *monitor)
{
    int64_t freed = 0;
    for (int group = -1; group < VR_MAX_GROUPS; group++) {
        int64_t budget = group < 0 ? monitor->budget : monitor->group_budgets[group];
        if (budget < 0)
            continue;
        struct candidate *candidates;
        int64_t resident;
        collect(monitor, group, &candidates, &resident);
        if (resident > budget)
            freed += purge_for(monitor, group, resident - budget, VR_PURGE_BUDGET);
    }
    return freed;
}

/* One check: usage against the water marks, then the budgets. Lock held. */
static int64_t check_locked(vr_monitor *monitor)
{
    vr_stat_add(&monitor->stats.checks, 1);
    int64_t freed = 0;
    int64_t usage = read_usage_locked(monitor);
    if (usage >= 0) {
        __atomic_store_n(&monitor->stats.last_usage, usage, __ATOMIC_RELAXED);
        if (usage > monitor->stats.peak_usage)
            __atomic_store_n(&monitor->stats.peak_usage, usage, __ATOMIC_RELAXED);
    }
    if (usage >= 0 && monitor->high_water > 0 && usage > monitor->high_water) {
        __atomic_store_n(&monitor->throttle, 1, __ATOMIC_RELEASE);
        freed += purge_for(monitor, -1, usage - monitor->low_water, VR_PURGE_PRESSURE);
        __atomic_store_n(&monitor->throttle, 0, __ATOMIC_RELEASE);
    }
    return freed + enforce_budgets_locked(monitor);
}

int64_t vr_monitor_check(vr_monitor *monitor)
{
    pthread_mutex_lock(&monitor->lock);
    int64_t freed = check_locked(monitor);
    pthread_mutex_unlock(&monitor->lock);
    return freed;
}

int64_t vr_monitor_enforce_budgets(vr_monitor *monitor)
{
    pthread_mutex_lock(&monitor->lock);
    int64_t freed = enforce_budgets_locked(monitor);
    pthread_mutex_unlock(&monitor->lock);
    return freed;
}

int64_t vr_monitor_resident_volatile(vr_monitor *monitor, int group)
{
    struct candidate *candidates;
    int64_t resident;
    pthread_mutex_lock(&monitor->lock);
    collect(monitor, group, &candidates, &resident);
    pthread_mutex_unlock(&monitor->lock);
    return resident;
}

/* --- the thread ------------------------------------------------------------------------------------ */

static void rearm(const struct vr_signal *signal)
{
    char buffer[512];
    if (signal->rearm == REARM_READ_EVENTFD)
        (void)!read(signal->fd, buffer, sizeof(uint64_t));
    else if (signal->rearm == REARM_PREAD_FILE)
        (void)!pread(signal->fd, buffer, sizeof buffer, 0); /* kernfs re-arms poll on read */
}

/* See vr_monitor_set_watchdog. */
static vr_monitor_watchdog registered_watchdog;

void vr_monitor_set_watchdog(vr_monitor_watchdog watchdog)
{
    __atomic_store_n(&registered_watchdog, watchdog, __ATOMIC_RELEASE);
}

static void *monitor_main(void *arg)
{
    vr_monitor *monitor = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        struct pollfd fds[1 + VR_MAX_SIGNAL_FDS];
        pthread_mutex_lock(&monitor->lock);
        int count = 1, timeout = monitor->interval_ms;
        fds[0] = (struct pollfd){ .fd = monitor->wake_fd, .events = POLLIN };
        for (int i = 0; i < monitor->signal_count; i++)
            fds[count++] = (struct pollfd){ .fd = monitor->signals[i].fd,
                                            .events = monitor->signals[i].events };
        pthread_mutex_unlock(&monitor->lock);
        int ready = poll(fds, (nfds_t)count, timeout);
        if (__atomic_load_n(&monitor->stop, __ATOMIC_ACQUIRE))
            break;
        if (ready < 0) {
            if (errno != EINTR) {
                struct timespec pause = { .tv_sec = 0, .tv_nsec = 10 * 1000 * 1000 };
                nanosleep(&pause, NULL); /* should not happen with valid descriptors */
            }
            continue;
        }
        vr_stat_add(&monitor->stats.wakeups, 1);
        if (fds[0].revents & POLLIN) {
            uint64_t pokes;
            if (read(monitor->wake_fd, &pokes, sizeof pokes) == sizeof pokes)
                vr_stat_add(&monitor->stats.pokes, 1);
        }
        pthread_mutex_lock(&monitor->lock);
        for (int i = 1; i < count; i++) {
            if (!fds[i].revents)
                continue;
            struct vr_signal *signal = &monitor->signals[i - 1];
            vr_stat_add(&monitor->stats.signal_events, 1);
            if (signal->rearm == REARM_NONE && (fds[i].revents & (POLLERR | POLLNVAL))) {
                /* A PSI trigger whose cgroup went away: it would report POLLERR for ever. */
                close(signal->fd);
                monitor->signals[i - 1] = monitor->signals[--monitor->signal_count];
                break; /* the indices moved: the next round polls the rest */
            }
            rearm(signal);
        }
        check_locked(monitor);
        pthread_mutex_unlock(&monitor->lock);
        vr_monitor_watchdog watchdog = __atomic_load_n(&registered_watchdog, __ATOMIC_ACQUIRE);
        if (watchdog && watchdog() == 1)
            vr_stat_add(&monitor->stats.handler_reinstalls, 1);
    }
    return NULL;
}

int vr_monitor_start(vr_monitor *monitor)
{
    if (monitor->running)
        return 0;
    __atomic_store_n(&monitor->stop, 0, __ATOMIC_RELEASE);
    int rc = pthread_create(&monitor->thread, NULL, monitor_main, monitor);
    if (rc != 0)
        return -rc;
    monitor->running = 1;
    return 0;
}

/* Stop the thread and wait for it (called with the GIL released: it never needs it). */
int vr_monitor_stop(vr_monitor *monitor)
{
    if (!monitor->running)
        return 0;
    __atomic_store_n(&monitor->stop, 1, __ATOMIC_RELEASE);
    poke(monitor);
    int rc = pthread_join(monitor->thread, NULL);
    monitor->running = 0;
    return -rc;
}

void vr_monitor_stats(vr_monitor *monitor, struct vr_monitor_stats *out)
{
    uint64_t *source = (uint64_t *)&monitor->stats, *target = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        target[i] = __atomic_load_n(&source[i], __ATOMIC_RELAXED);
}

static void close_descriptors_locked(vr_monitor *monitor)
{
    for (int i = 0; i < monitor->signal_count; i++)
        close(monitor->signals[i].fd);
    monitor->signal_count = 0;
    if (monitor->usage_fd >= 0)
        close(monitor->usage_fd);
    monitor->usage_fd = -1;
    monitor->usage_kind = VR_USAGE_NONE;
    monitor->high_water = monitor->low_water = 0;
    monitor->interval_ms = -1;
}

/* Before configuring again (the thread is stopped): forget the signals and the usage file. The
 * regions, budgets and counters stay. The struct lives as long as the process: fault paths may hold a
 * pointer to it at any time, so it is reconfigured, never freed. */
void vr_monitor_reset(vr_monitor *monitor)
{
    pthread_mutex_lock(&monitor->lock);
    close_descriptors_locked(monitor);
    pthread_mutex_unlock(&monitor->lock);
}

/* In a forked child (single-threaded, called from the at-fork hook): the thread does not exist here,
 * and its lock may have been held by it. The managed regions are the child's own copies, so they
 * stay listed; the descriptors are the parent's (a shared eventfd would wake the parent's monitor):
 * close them and make a wake-up eventfd of the child's own. Python configures it again. */
void vr_monitor_after_fork(vr_monitor *monitor)
{
    pthread_mutex_init(&monitor->lock, NULL);
    monitor->running = 0;
    monitor->stop = 0;
    monitor->throttle = 0;
    monitor->refilled = 0;
    close_descriptors_locked(monitor);
    close(monitor->wake_fd);
    monitor->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    /* -1 on failure: poke() then fails silently and the thread relies on its timer. */
}

/* --- the fault path --------------------------------------------------------------------------------- */

/* A managed region is about to take `bytes` more (a refill): every poke_bytes, wake the monitor so it
 * checks usage and budgets; while it purges above the high-water mark, wait for it (at most
 * THROTTLE_LIMIT_NS), so that refills cannot outrun the purges into the OOM killer. Async-signal-safe:
 * atomics, write(2), nanosleep(2). */
void vr_monitor_note_refill(vr_region *region, size_t bytes, int may_wait)
{
    vr_monitor *monitor = __atomic_load_n(&region->monitor, __ATOMIC_ACQUIRE);
    if (!monitor)
        return;
    if (__atomic_add_fetch(&monitor->refilled, bytes, __ATOMIC_RELAXED) >= monitor->poke_bytes) {
        __atomic_store_n(&monitor->refilled, 0, __ATOMIC_RELAXED);
        poke(monitor);
    }
    if (!may_wait || !__atomic_load_n(&monitor->throttle, __ATOMIC_ACQUIRE))
        return;
    vr_stat_add(&monitor->stats.throttled_faults, 1);
    int64_t deadline = vr_monotonic_ns() + THROTTLE_LIMIT_NS;
    while (__atomic_load_n(&monitor->throttle, __ATOMIC_ACQUIRE) && vr_monotonic_ns() < deadline)
        vr_pause_briefly();
}
