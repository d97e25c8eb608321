/* What every backend keeps per region: geometry, source, per-chunk state, counters.
 *
 * The chunk state is one byte per chunk, changed with atomics from Python-calling threads, the
 * uffd handler and workers, and signal handlers (atomics on a byte are async-signal-safe). */
#ifndef VRANGE_REGION_H
#define VRANGE_REGION_H

#include <stdint.h>
#include <sys/types.h>

#include "clock.h"
#include "common.h"

enum vr_source_kind { VR_SOURCE_ZEROS = 0, VR_SOURCE_FILE = 1, VR_SOURCE_PYTHON = 2,
                      VR_SOURCE_ISOLATED = 3 };
enum vr_on_error { VR_ON_ERROR_POISON = 0, VR_ON_ERROR_ZEROS = 1, VR_ON_ERROR_ABORT = 2 };
/* How a sigbus region traps accesses to missing pages (the uffd backend has no trap). */
enum vr_trap_kind { VR_TRAP_NONE = 0, VR_TRAP_MEMFD = 1, VR_TRAP_UFFD = 2 };

/* Scratch buffers a region keeps for faults served on the faulting thread (sigbus userfaultfd
 * trap): a signal handler cannot allocate with malloc, and a fresh mmap per fault would cost a
 * first-touch fault per page. One per concurrent fault; more concurrent faults map their own. */
#define VR_SCRATCH_SLOTS 4

/* Per-chunk state bits (one byte per chunk, updated with atomics from several threads). */
#define VR_CHUNK_VOLATILE 0x01     /* marked volatile: the kernel (or purge) may discard it */
#define VR_CHUNK_MATERIALIZED 0x02 /* filled at least once: a later fault means it was purged */
#define VR_CHUNK_PURGED 0x04       /* purged since it was last marked volatile */
#define VR_CHUNK_POISONED 0x08     /* regeneration failed; missing pages hold poison markers */
#define VR_CHUNK_IN_FLIGHT 0x10    /* being regenerated: more faults on it just wait */
#define VR_CHUNK_TRAPPED 0x20      /* sigbus backend: the empty memfd is mapped over it */
#define VR_CHUNK_COUNTED 0x40      /* vrange's own purge counted this discard: its refill must not */
#define VR_CHUNK_FAILED 0x80       /* its last regeneration failed (even if the policy filled zeros) */

/* Why a chunk was discarded (the purge counters of struct vr_stats). */
enum vr_purge_reason {
    VR_PURGE_EXPLICIT = 0, /* Region.purge() */
    VR_PURGE_PRESSURE = 1, /* the pressure monitor, before the OOM killer */
    VR_PURGE_BUDGET = 2,   /* over a byte budget for resident volatile memory */
    VR_PURGE_KERNEL = 3,   /* found discarded by the kernel (MADV_FREE reclaim, MADV_PAGEOUT) */
};

/* cffi: begin (exported to Python; build.py reads these blocks) */
struct vr_stats {
    uint64_t faults_on_handler_thread;  /* native source, served by the handler thread */
    uint64_t faults_on_faulting_thread; /* Python regenerator run in the signal handler */
    uint64_t faults_on_worker_thread;   /* Python regenerator run by a GIL-taking worker */
    uint64_t bytes_regenerated;
    uint64_t regeneration_errors;
    uint64_t purges; /* chunk discards of every reason (the sum of the four below) */
    uint64_t volatile_refills; /* chunks refilled while volatile and made lazy-free again */
    uint64_t chunks_filled_ahead; /* missing chunks filled past a sequential fault (fill-ahead) */
    uint64_t purges_by_reason[4];       /* indexed by enum vr_purge_reason */
    uint64_t bytes_purged_by_reason[4]; /* bytes vrange gave back (the kernel's are not known) */
};

typedef struct vr_uffd_handler vr_uffd_handler; /* uffd backend only */
typedef struct vr_region vr_region;
typedef struct vr_monitor vr_monitor; /* the pressure monitor and budget policy (pressure.c) */
/* cffi: end */

struct vr_region {
    uintptr_t base;
    size_t size;
    size_t chunk_size;
    size_t chunk_count;
    size_t page_size;
    int source_kind;
    int file_fd;
    int64_t file_offset;
    int64_t file_size;            /* VR_SOURCE_FILE: its size when the source was made (-1: any) */
    struct vr_isolated *isolated; /* VR_SOURCE_ISOLATED: the helper process that regenerates */
    void *python_handle; /* cffi handle of the Python Region, for vr_python_regenerate */
    int on_error;
    uint8_t *chunk_state;
    struct vr_stats stats;
    int refcount; /* Python, the backend's table and every fault in flight hold one */
    int registered;
    vr_uffd_handler *handler; /* uffd backend */
    int trap_kind;       /* sigbus backend: VR_TRAP_MEMFD or VR_TRAP_UFFD */
    int trap_fd;         /* sigbus memfd trap: the empty memfd mapped over missing chunks */
    int trap_uffd;       /* sigbus userfaultfd trap: the process's SIGBUS-mode userfaultfd */
    char *scratch[VR_SCRATCH_SLOTS]; /* chunk-sized, mapped on first use, freed with the region */
    int scratch_busy[VR_SCRATCH_SLOTS];
    pid_t *owners;       /* the thread regenerating each in-flight chunk (Python regenerators) */
    pid_t *gil_free_waiters; /* uffd: a thread known not to hold the GIL, faulting on the chunk */
    int closing;         /* VR_OPEN, VR_CLOSING (draining before unmap), VR_CLOSED */
    int active;          /* sigbus backend: signal handlers inside this region now */
    int last_native_error; /* errno of the last native-source failure, for the Python error */
    int last_map_error;    /* errno of the last failure to map a refilled chunk (memfd trap) */
    int gil_waiters;       /* threads that let the GIL go mid-statement to wait for a chunk */
    /* Purge policy (pressure.c): lower priorities are purged first, then the chunks marked volatile
     * longest ago; a chunk held for a system call (vrange.io) is never purged by vrange. */
    int priority;
    int group;
    int64_t *volatile_since; /* per chunk: monotonic ns of the last mark_volatile */
    uint16_t *holds;         /* per chunk: system calls holding it (atomic) */
    vr_monitor *monitor;     /* set while the policy manages this region */
    int kernel_reclaims;     /* volatile = MADV_FREE (uffd backend, sigbus userfaultfd trap) */
    void *drain_page;        /* a page never touched (vr_drain_cpu_lru), where the kernel reclaims */
    /* Fill-ahead (vr_region_ahead_window): where the next fault of a forward walk would be, how many
     * chunks to fill past it, and the most ever (0: off). A heuristic only: racing threads may
     * update it with relaxed atomics, which at worst fills less or more ahead. */
    size_t ahead_next;
    size_t ahead_streak; /* faults in a row, each on the chunk after the last one filled */
    size_t ahead_window;
    size_t ahead_max_chunks;
    size_t ahead_limit; /* no chunk at or past it is filled ahead (a library call's range end) */
    /* Bumped by every mark_volatile and every purge of vrange's: a fill-ahead decided before a bump
     * is stale (the memory it would fill may have been given up since). */
    uint64_t discard_epoch;
    /* Make one claimed, volatile chunk missing (the backend's way: MADV_DONTNEED or the memfd trap);
     * 0 or -errno. `after_purge`, if set, runs once the chunk is released (the uffd backend wakes
     * faults that arrived meanwhile). */
    int (*discard_chunk)(vr_region *region, size_t chunk);
    void (*after_purge)(vr_region *region, size_t chunk);
    /* Called (if set) just before vr_region_mark_volatile makes a range lazy-free: the uffd backend
     * waits there for its handler thread to put the pages it filled on the LRU lists. */
    void (*before_lazy_free)(vr_region *region);
};

enum vr_closing_state { VR_OPEN = 0, VR_CLOSING = 1, VR_CLOSED = 2 };

static inline uint8_t vr_chunk_load(const vr_region *region, size_t chunk)
{
    return __atomic_load_n(&region->chunk_state[chunk], __ATOMIC_ACQUIRE);
}

static inline uint8_t vr_chunk_set(vr_region *region, size_t chunk, uint8_t bits)
{
    return __atomic_fetch_or(&region->chunk_state[chunk], bits, __ATOMIC_ACQ_REL);
}

static inline void vr_chunk_clear(vr_region *region, size_t chunk, uint8_t bits)
{
    __atomic_fetch_and(&region->chunk_state[chunk], (uint8_t)~bits, __ATOMIC_ACQ_REL);
}

/* Where a chunk starts in memory. */
static inline uintptr_t vr_chunk_address(const vr_region *region, size_t chunk)
{
    return region->base + chunk * region->chunk_size;
}

/* Dirty the page at `address` (page-aligned) without changing it: an atomic no-op write, so a
 * concurrent write by another thread is never lost. A lazy-free (MADV_FREE) page that is written is no
 * longer discarded by reclaim: the write sets the PTE's dirty bit atomically, and reclaim checks that
 * bit after clearing the PTE (it keeps a dirty page). If reclaim took the page first, the write faults
 * like any access to a missing page and is served. How pinning works where the kernel lacks
 * MADV_POPULATE_WRITE (Linux < 5.14). */
static inline void vr_dirty_page(uintptr_t address)
{
    __atomic_fetch_add((uint64_t *)address, 0, __ATOMIC_RELAXED);
}

static inline void vr_stat_add(uint64_t *counter, uint64_t amount)
{
    __atomic_fetch_add(counter, amount, __ATOMIC_RELAXED);
}

/* region.c */
/* cffi: begin (exported to Python; build.py reads these blocks) */
int vr_region_new(vr_uffd_handler *handler, uintptr_t base, size_t size, size_t chunk_size,
                  int source_kind, int file_fd, int64_t file_offset, void *python_handle,
                  int on_error, vr_region **out);
int vr_region_references(vr_region *region);
void vr_region_release(vr_region *region);
void vr_region_set_volatile(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_region_quiesce(vr_region *region, int timeout_ms);
int vr_region_last_native_error(vr_region *region);
int vr_region_last_map_error(vr_region *region);
void vr_region_clear_last_errors(vr_region *region);
int vr_region_finish_nonvolatile(vr_region *region, size_t first_chunk, size_t end_chunk,
                                 uint8_t *purged_out);
int vr_region_chunk_states(vr_region *region, uint8_t *states_out);
int vr_region_residency(vr_region *region, uint8_t *pages_out);
void vr_region_stats(vr_region *region, struct vr_stats *out);
int vr_region_begin_pin(vr_region *region, size_t first_chunk, size_t end_chunk,
                        uint8_t *was_volatile_out);
int vr_region_pin_without_fill(vr_region *region, size_t first_chunk, size_t end_chunk,
                               uint8_t *purged_out);
int vr_region_mark_volatile(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_region_discard(vr_region *region, size_t first_chunk, size_t end_chunk, int only_poisoned);
int vr_pageout(uintptr_t address, size_t length);
int vr_region_wait_for_refills(vr_region *region, size_t first_chunk, size_t end_chunk,
                               int timeout_ms);
int vr_region_count_failed(vr_region *region, size_t first_chunk, size_t end_chunk);
int64_t vr_region_purge_range(vr_region *region, size_t first_chunk, size_t end_chunk, int reason);
void vr_region_hold(vr_region *region, size_t first_chunk, size_t end_chunk, int delta);
void vr_region_set_policy(vr_region *region, int priority, int group);
void vr_region_forget_threads(vr_region *region);
int vr_region_fence(vr_region *region);
int *vr_region_gil_waiters_counter(vr_region *region);
void vr_region_set_isolated(vr_region *region, struct vr_isolated *isolated);
void vr_region_set_file_size(vr_region *region, int64_t file_size);
void vr_region_turn_off_fill_ahead(vr_region *region);
void vr_region_limit_fill_ahead(vr_region *region, size_t end_chunk);
uint8_t *vr_region_chunk_state_array(vr_region *region);
/* cffi: end */
void vr_region_ref(vr_region *region);
void vr_region_unref(vr_region *region);
/* A growable array of regions, each listed with a reference (the uffd handler's table, the pressure
 * monitor's list); the caller holds the lock that guards it. Append: 0 or -ENOMEM. Remove: 1 if the
 * region was listed; the caller then drops its reference (vr_region_unref) after letting go of its
 * lock, since that may free the region. */
int vr_region_list_append(vr_region ***regions, size_t *count, size_t *capacity, vr_region *region);
int vr_region_list_remove(vr_region **regions, size_t *count, vr_region *region);
size_t vr_region_chunk_length(const vr_region *region, size_t chunk_index);
/* The address range of chunks [first_chunk, end_chunk): the last chunk may be short. */
void vr_region_span(const vr_region *region, size_t first_chunk, size_t end_chunk,
                    uintptr_t *start_out, size_t *length_out);
int vr_fill_native(vr_region *region, size_t chunk_index, char *buffer);
void vr_abort_for_policy(void) __attribute__((noreturn));
int vr_region_keep_volatile(vr_region *region, size_t chunk_index);
void *vr_drain_page_new(size_t page_size);
void vr_drain_cpu_lru(void *drain_page, size_t page_size);
void vr_region_note_discard_found(vr_region *region, size_t chunk_index);
int64_t vr_region_purge_chunk(vr_region *region, size_t chunk_index, int reason);
int vr_region_discard_pages(vr_region *region, size_t chunk_index);
int vr_region_page_present(const vr_region *region, uintptr_t address);
size_t vr_region_ahead_window(vr_region *region, size_t chunk);
size_t vr_region_ahead_limit(vr_region *region);
void vr_region_ahead_filled(vr_region *region, size_t next_chunk);
int vr_region_chunk_fillable_ahead(vr_region *region, size_t chunk);
int64_t vr_region_resident_pages(const vr_region *region, uintptr_t start, size_t length);

#endif /* VRANGE_REGION_H */
