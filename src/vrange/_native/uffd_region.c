/* Regions of the uffd backend: registration, chunk state, resolving faults, volatility.
 *
 * Functions called from Python run with the GIL released (cffi). vr_resolve_chunk, vr_fail_chunk
 * and vr_fill_native also run on the handler thread, on worker threads and inside the fault signal
 * handler: they use only syscalls, atomics and memory the caller owns (async-signal-safe). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "uffd_backend.h"
#include "pressure.h"
#include "userfaultfd.h"

static int table_add(vr_handler *handler, vr_region *region)
{
    pthread_mutex_lock(&handler->lock);
    if (handler->region_count == handler->region_capacity) {
        size_t capacity = handler->region_capacity ? 2 * handler->region_capacity : 8;
        vr_region **grown = realloc(handler->regions, capacity * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&handler->lock);
            return -ENOMEM;
        }
        handler->regions = grown;
        handler->region_capacity = capacity;
    }
    vr_region_ref(region);
    handler->regions[handler->region_count++] = region;
    pthread_mutex_unlock(&handler->lock);
    return 0;
}

static void table_remove(vr_handler *handler, vr_region *region)
{
    int found = 0;
    pthread_mutex_lock(&handler->lock);
    for (size_t i = 0; i < handler->region_count; i++) {
        if (handler->regions[i] == region) {
            handler->regions[i] = handler->regions[--handler->region_count];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&handler->lock);
    if (found)
        vr_region_unref(region);
}

static void wake_after_purge(vr_region *region, size_t chunk);

int vr_region_register(vr_region *region)
{
    region->after_purge = wake_after_purge;
    region->kernel_reclaims = 1;
    /* In the table first: a fault can arrive as soon as the range is registered. */
    int rc = table_add(region->handler, region);
    if (rc < 0)
        return rc;
    rc = vr_userfaultfd_register_missing(region->handler->uffd, region->base, region->size, NULL);
    if (rc < 0) {
        table_remove(region->handler, region);
        return rc;
    }
    region->registered = 1;
    return 0;
}

static void wake_range(int uffd, uintptr_t start, size_t length)
{
    vr_userfaultfd_wake(uffd, start, length);
}

/* After vrange purged a chunk (vr_region_purge_chunk): a fault that arrived while the purge held the
 * chunk was left asleep; wake it, so it faults again and is served. */
static void wake_after_purge(vr_region *region, size_t chunk)
{
    wake_range(region->handler->uffd, vr_chunk_address(region, chunk),
               vr_region_chunk_length(region, chunk));
}

/* Called after Python unmapped the region (mmap.close succeeded): drop it from the table and wake
 * anyone still waiting on it (they re-fault on an unmapped address: SIGSEGV, as for any closed
 * mapping, never a hang). Jobs in flight keep the struct alive until they finish; Python keeps its
 * reference (and the handle the jobs call back with) until vr_region_references says 1. */
int vr_region_close(vr_region *region)
{
    vr_handler *handler = region->handler;
    __atomic_store_n(&region->closing, VR_CLOSED, __ATOMIC_RELEASE);
    table_remove(handler, region);
    wake_range(handler->uffd, region->base, region->size);
    return 0;
}

/* close() found the region still exported: open it again and wake the faults set aside. */
int vr_region_resume(vr_region *region)
{
    /* Threads found not to hold the GIL while it closed may hold it at the next close(). */
    pthread_mutex_lock(&region->handler->lock);
    memset(region->gil_free_waiters, 0, region->chunk_count * sizeof *region->gil_free_waiters);
    pthread_mutex_unlock(&region->handler->lock);
    __atomic_store_n(&region->closing, VR_OPEN, __ATOMIC_RELEASE);
    wake_range(region->handler->uffd, region->base, region->size);
    return 0;
}

static int fill_missing_pages(const vr_region *region, uintptr_t start, size_t length,
                              const char *source, enum vr_fill_kind kind)
{
    return vr_userfaultfd_fill_missing(region->handler->uffd, region->page_size, start, length, source, kind);
}

static void apply_error_policy(vr_region *region, uintptr_t start, size_t length, size_t chunk);

int vr_resolve_chunk(vr_region *region, size_t chunk_index, const char *source)
{
    size_t length = vr_region_chunk_length(region, chunk_index);
    uintptr_t start = vr_chunk_address(region, chunk_index);
    /* The handler thread and workers never wait for the monitor: other faults depend on them. */
    vr_monitor_note_refill(region, length, 0);
    int rc = fill_missing_pages(region, start, length, source, VR_FILL_COPY);
    if (rc == 0) {
        vr_chunk_clear(region, chunk_index, VR_CHUNK_FAILED);
        vr_chunk_set(region, chunk_index, VR_CHUNK_MATERIALIZED);
        vr_stat_add(&region->stats.bytes_regenerated, length);
        /* A chunk refilled while volatile must stay as discardable as it was: UFFDIO_COPY installs
         * ordinary dirty pages. Wake the faulting thread first, so that its access restarts on a
         * present page before the chunk becomes lazy-free again (see vr_region_keep_volatile for
         * why it cannot refault for ever); IN_FLIGHT is held until then, which is what a
         * concurrent mark_nonvolatile waits for (vr_region_begin_pin). */
        if (vr_chunk_load(region, chunk_index) & VR_CHUNK_VOLATILE) {
            wake_range(region->handler->uffd, start, length);
            vr_region_keep_volatile(region, chunk_index);
        }
    } else {
        /* The copy itself failed (ENOMEM, ...): by policy, or the access would refault for ever. */
        apply_error_policy(region, start, length, chunk_index);
    }
    region->gil_free_waiters[chunk_index] = 0;
    vr_chunk_clear(region, chunk_index, VR_CHUNK_IN_FLIGHT);
    wake_range(region->handler->uffd, start, length); /* EEXIST and failures do not wake */
    return rc;
}

static void apply_error_policy(vr_region *region, uintptr_t start, size_t length, size_t chunk)
{
    vr_stat_add(&region->stats.regeneration_errors, 1);
    vr_chunk_set(region, chunk, VR_CHUNK_FAILED);
    switch (region->on_error) {
    case VR_ON_ERROR_ZEROS:
        if (fill_missing_pages(region, start, length, NULL, VR_FILL_ZEROPAGE) == 0)
            vr_chunk_set(region, chunk, VR_CHUNK_MATERIALIZED);
        break;
    case VR_ON_ERROR_POISON:
        vr_chunk_set(region, chunk, VR_CHUNK_POISONED);
        (void)fill_missing_pages(region, start, length, NULL, VR_FILL_POISON);
        break;
    default:
        vr_abort_for_policy();
    }
}

/* A regenerator touched the chunk it is regenerating: fail that one page by the region's policy
 * (its access then raises SIGBUS, or its syscall EFAULT) instead of letting it wait for itself. */
void vr_fail_page(vr_region *region, uintptr_t address)
{
    uintptr_t page = address & ~(uintptr_t)(region->page_size - 1);
    apply_error_policy(region, page, region->page_size, (page - region->base) / region->chunk_size);
    wake_range(region->handler->uffd, page, region->page_size);
}

/* Regeneration failed: resolve the fault without handing out wrong bytes (see docs/design.md). */
int vr_fail_chunk(vr_region *region, size_t chunk_index)
{
    size_t length = vr_region_chunk_length(region, chunk_index);
    uintptr_t start = vr_chunk_address(region, chunk_index);
    apply_error_policy(region, start, length, chunk_index);
    region->gil_free_waiters[chunk_index] = 0;
    vr_chunk_clear(region, chunk_index, VR_CHUNK_IN_FLIGHT);
    wake_range(region->handler->uffd, start, length);
    return 0;
}

/* Make every page of the range present and dirty (so no longer discardable): lazy-free pages are
 * re-dirtied, missing ones fault through the handler. The caller does not hold the GIL (cffi), so
 * Python regenerators can run on a worker while this waits. */
static int populate_range(vr_region *region, size_t first_chunk, size_t end_chunk, int advice)
{
    uintptr_t start;
    size_t length;
    vr_region_span(region, first_chunk, end_chunk, &start, &length);
    while (madvise((void *)start, length, advice) < 0) {
        if (errno != EINTR && errno != EAGAIN)
            return -errno;
    }
    return 0;
}

int vr_region_populate(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    return populate_range(region, first_chunk, end_chunk, MADV_POPULATE_WRITE);
}

/* Make missing pages present without dirtying lazy-free ones (they stay discardable). */
int vr_region_prefault(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    return populate_range(region, first_chunk, end_chunk, MADV_POPULATE_READ);
}

/* In a forked child: the child's mapping is not registered (no UFFD_FEATURE_EVENT_FORK) and the
 * parent's threads are gone. Register it with the child's own handler; jobs that were in flight in
 * the parent will never finish here, so their chunks are simply missing-or-present again. */
int vr_region_rebind_after_fork(vr_region *region, vr_handler *handler)
{
    for (size_t chunk = 0; chunk < region->chunk_count; chunk++)
        vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
    region->handler = handler;
    region->refcount = 1;
    region->registered = 0;
    return vr_region_register(region);
}
