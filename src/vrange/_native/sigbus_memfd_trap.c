/* The sigbus backend's memfd trap: missing chunks have an *empty* memfd mapped over them.
 *
 * MAP_SHARED|MAP_FIXED with file offset = offset in the region, so neighbouring traps merge into one
 * VMA: the anonymous pages are freed at once, and any access beyond the file's end raises SIGBUS
 * (BUS_ADRERR). The handler regenerates the chunk into fresh anonymous memory and moves it over the
 * trap with mremap(MREMAP_FIXED): the chunk appears whole in one step, so another thread can never see
 * it half filled. A system call that touches a trap fails with EFAULT (vrange.io prefaults and
 * retries). The kernel can never discard these pages by itself: purging is vrange's decision.
 *
 * Async-signal-safety: the fault path uses syscalls, atomics and the region's own memory; a Python
 * regenerator is reached through cffi (see sigbus.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pressure.h"
#include "sigbus_backend.h"

static int map_trap(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    uintptr_t start;
    size_t length;
    vr_region_span(region, first_chunk, end_chunk, &start, &length);
    /* TRAPPED first: a fork between the two steps must not leave a child whose chunk is trapped but
     * not marked (its faults would restart for ever). Marked but not yet trapped is harmless: the
     * data is still there, and a refill just replaces it. */
    uint8_t first_before = vr_chunk_set(region, first_chunk, VR_CHUNK_TRAPPED);
    for (size_t chunk = first_chunk + 1; chunk < end_chunk; chunk++)
        vr_chunk_set(region, chunk, VR_CHUNK_TRAPPED);
    void *mapped = mmap((void *)start, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                        region->trap_fd, (off_t)(first_chunk * region->chunk_size));
    if (mapped == MAP_FAILED) {
        int saved = errno;
        /* A purge of one chunk keeps its data and its state; a whole region (attach) is given up. */
        if (end_chunk == first_chunk + 1 && !(first_before & VR_CHUNK_TRAPPED))
            vr_chunk_clear(region, first_chunk, VR_CHUNK_TRAPPED);
        return -saved;
    }
    return 0;
}

/* Remembered for the Python error, which then speaks of mappings rather than of the source. */
static int map_failure(vr_region *region, int error_number)
{
    __atomic_store_n(&region->last_map_error, error_number, __ATOMIC_RELEASE);
    return -error_number;
}

/* Fill fresh anonymous memory for chunks [first, end) and move it over the trap. The caller holds
 * the chunks (IN_FLIGHT). `regenerate` NULL: install zeros (the explicit on_error="zeros" policy;
 * fresh memory is zeros, and so is the Zeros source's). The memory is populated by the mmap itself
 * (MAP_POPULATE: one call instead of a page fault per page while it is filled). */
static int install_run(vr_region *region, size_t first, size_t end, vr_sigbus_regenerator regenerate)
{
    uintptr_t start;
    size_t length;
    vr_region_span(region, first, end, &start, &length);
    vr_monitor_note_refill(region, length, 1); /* memory the kernel cannot take back */
    char *scratch = mmap(NULL, length, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_POPULATE, -1, 0);
    if (scratch == MAP_FAILED)
        return map_failure(region, errno);
    int rc = 0;
    if (regenerate && region->source_kind != VR_SOURCE_ZEROS)
        for (size_t chunk = first; rc == 0 && chunk < end; chunk++)
            rc = regenerate(region, chunk, scratch + (chunk - first) * region->chunk_size);
    /* ENOMEM here is the process's mapping count at vm.max_map_count (the chunk splits the trap's
     * mapping), or no memory for the kernel's own structures. */
    if (rc == 0 && mremap(scratch, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)start) ==
                       MAP_FAILED)
        rc = map_failure(region, errno);
    if (rc != 0) {
        munmap(scratch, length);
        return rc;
    }
    for (size_t chunk = first; chunk < end; chunk++) {
        vr_chunk_set(region, chunk, VR_CHUNK_MATERIALIZED);
        vr_chunk_clear(region, chunk, VR_CHUNK_TRAPPED | VR_CHUNK_FAILED);
    }
    vr_stat_add(&region->stats.bytes_regenerated, length);
    return 0;
}

static int install_chunk(vr_region *region, size_t chunk, vr_sigbus_regenerator regenerate)
{
    return install_run(region, chunk, chunk + 1, regenerate);
}

/* The trap op: chunks filled ahead of a fault, in one mapping. */
static int install_ahead(vr_region *region, size_t first, size_t end,
                         vr_sigbus_regenerator regenerate)
{
    int rc = install_run(region, first, end, regenerate);
    if (rc == 0) {
        vr_stat_add(&region->stats.chunks_filled_ahead, end - first);
        vr_stat_add(&region->stats.faults_on_faulting_thread, end - first); /* served on this thread */
    }
    return rc;
}

static int chunk_trapped(vr_region *region, size_t chunk)
{
    return (vr_chunk_load(region, chunk) & VR_CHUNK_TRAPPED) != 0;
}

static int page_trapped(vr_region *region, size_t chunk, uintptr_t address)
{
    (void)address; /* the whole chunk is trapped or installed: never part of it */
    return chunk_trapped(region, chunk);
}

/* The purge of a memfd-trap chunk (vr_region_purge_chunk): map the trap over it. */
static int trap_one_chunk(vr_region *region, size_t chunk) { return map_trap(region, chunk, chunk + 1); }

static int attach(vr_region *region, int trap_uffd)
{
    (void)trap_uffd; /* the memfd trap makes its own descriptor */
    region->trap_fd = (int)syscall(SYS_memfd_create, "vrange-trap", MFD_CLOEXEC);
    if (region->trap_fd < 0)
        return -errno;
    region->discard_chunk = trap_one_chunk;
    return map_trap(region, 0, region->chunk_count);
}

/* A forked child could not register a uffd-trap region again (no userfaultfd can be opened there):
 * its copy of the mapping is not registered, so a page the kernel discards would read as zeros.
 * Hand the region to the memfd trap instead: every chunk that is volatile (the kernel may discard
 * it) or has a missing page gets the trap; pinned chunks are whole and dirty, so they stay. The
 * child is single-threaded here (called from the at-fork hook). If even that fails, the region is
 * made inaccessible (an access raises SIGSEGV): never zeros handed out silently. */
int vr_sigbus_memfd_take_over(vr_region *region)
{
    int rc = 0;
    region->trap_uffd = -1;
    region->kernel_reclaims = 0;
    region->trap_fd = (int)syscall(SYS_memfd_create, "vrange-trap", MFD_CLOEXEC);
    if (region->trap_fd < 0)
        rc = -errno;
    for (size_t chunk = 0; rc == 0 && chunk < region->chunk_count; chunk++) {
        size_t length = vr_region_chunk_length(region, chunk);
        int64_t present = vr_region_resident_pages(region, vr_chunk_address(region, chunk),
                                                   length);
        if ((vr_chunk_load(region, chunk) & VR_CHUNK_VOLATILE) || present < 0 ||
            (size_t)present * region->page_size < length)
            rc = map_trap(region, chunk, chunk + 1);
    }
    if (rc < 0) {
        (void)mprotect((void *)region->base, region->size, PROT_NONE);
        return rc;
    }
    region->trap_kind = VR_TRAP_MEMFD;
    region->discard_chunk = trap_one_chunk;
    return 0;
}

/* Make chunks missing again: all of them, or only those whose regeneration failed (poisoned). */
int vr_sigbus_memfd_discard(vr_region *region, size_t first_chunk, size_t end_chunk,
                            int only_poisoned)
{
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        uint8_t state = vr_chunk_load(region, chunk);
        if (only_poisoned && !(state & (VR_CHUNK_POISONED | VR_CHUNK_FAILED)))
            continue;
        if (!(state & VR_CHUNK_TRAPPED)) {
            int rc = map_trap(region, chunk, chunk + 1);
            if (rc < 0)
                return rc;
        }
        vr_chunk_clear(region, chunk, VR_CHUNK_POISONED | VR_CHUNK_FAILED);
    }
    return 0;
}

const struct vr_sigbus_trap vr_sigbus_memfd_trap = {
    .page_missing = page_trapped,
    .chunk_missing = chunk_trapped,
    .refill = install_chunk,
    .dirty = NULL, /* the kernel never discards these pages: filled is pinned */
    .attach = attach,
    .fill_ahead = install_ahead,
};
