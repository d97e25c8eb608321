/* The sigbus backend's userfaultfd trap: the kernel reclaims volatile pages by itself, and an access
 * to a reclaimed page raises SIGBUS on the faulting thread.
 *
 * The process opens one userfaultfd with UFFD_FEATURE_SIGBUS (user-mode-only: any process may open
 * that on Linux >= 5.11, whatever vm.unprivileged_userfaultfd says) and registers each region's
 * private anonymous mapping with it in MISSING mode. Volatile = MADV_FREE, so under pressure the
 * kernel discards volatile pages one by one; the next user-mode access to a missing page raises
 * SIGBUS (BUS_ADRERR) instead of queueing an event: no handler thread. The SIGBUS handler regenerates
 * the whole chunk into a scratch buffer and fills only the pages that are missing (UFFDIO_COPY answers
 * EEXIST for present ones, so a program's write is never overwritten); the access then restarts. A
 * refilled chunk that is volatile is made lazy-free again (vr_region_keep_volatile). No mremap: no
 * mapping per chunk, so no vm.max_map_count pressure and no cap on the number of chunks.
 *
 * A system call that touches a missing page fails with EFAULT, as with the memfd trap; vrange.io
 * prefaults and retries. A regeneration that fails needs no poison marker: a missing page already
 * raises SIGBUS (user access) or EFAULT (syscall), and the chunk is marked POISONED so that later
 * faults chain to the previous handler without running the regenerator again.
 *
 * Async-signal-safety: the fault path uses ioctls, madvise, mincore, atomics, the region's scratch
 * buffers; a Python regenerator is reached through cffi (see sigbus.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pressure.h"
#include "sigbus_backend.h"
#include "userfaultfd.h"

/* Open the process's trap descriptor: user-mode-only first (least privilege, and all an
 * unprivileged process may have), then a full one (kernels before 5.11 reject the flag), then
 * /dev/userfaultfd. The first refusal is the one reported. */
int vr_sigbus_uffd_trap_open(int *fd_out)
{
    int fd = -1;
    int flags = O_CLOEXEC | O_NONBLOCK;
    int rc = vr_userfaultfd_open_syscall(flags | UFFD_USER_MODE_ONLY, &fd);
    if (rc == -EINVAL)
        rc = vr_userfaultfd_open_syscall(flags, &fd);
    if (rc < 0 && vr_userfaultfd_open_dev(flags | UFFD_USER_MODE_ONLY, &fd) < 0 &&
        vr_userfaultfd_open_dev(flags, &fd) < 0)
        return rc;
    uint64_t features = 0, ioctls = 0;
    rc = vr_userfaultfd_api(fd, UFFD_FEATURE_SIGBUS, &features, &ioctls);
    if (rc == 0 && !(features & UFFD_FEATURE_SIGBUS))
        rc = -EOPNOTSUPP;
    if (rc < 0) {
        close(fd);
        return rc;
    }
    *fd_out = fd;
    return 0;
}

/* Register in MISSING mode a range the trap can fill (UFFDIO_COPY and UFFDIO_ZEROPAGE allowed). */
static int register_range(int uffd, uintptr_t start, size_t length)
{
    uint64_t ioctls = 0;
    int rc = vr_userfaultfd_register_missing(uffd, start, length, &ioctls);
    if (rc < 0)
        return rc;
    if (!(ioctls & (1ULL << _UFFDIO_COPY)) || !(ioctls & (1ULL << _UFFDIO_ZEROPAGE)))
        return -EOPNOTSUPP;
    return 0;
}

/* Does the trap work here? Register a scratch page, fill it with UFFDIO_COPY, read it back. */
int vr_sigbus_uffd_trap_probe(int uffd)
{
    size_t page_size = (size_t)sysconf(_SC_PAGESIZE);
    char *page = mmap(NULL, page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return -errno;
    char source[64];
    memset(source, 0x5a, sizeof source);
    int rc = register_range(uffd, (uintptr_t)page, page_size);
    char *copy_source = mmap(NULL, page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
    if (copy_source == MAP_FAILED && rc == 0)
        rc = -errno;
    if (rc == 0) {
        memcpy(copy_source, source, sizeof source);
        rc = vr_userfaultfd_fill_missing(uffd, page_size, (uintptr_t)page, page_size, copy_source,
                                  VR_FILL_COPY);
        if (rc == 0 && memcmp(page, source, sizeof source) != 0)
            rc = -EIO;
    }
    if (copy_source != MAP_FAILED)
        munmap(copy_source, page_size);
    if (munmap(page, page_size) < 0 && rc == 0) /* unmapping also unregisters */
        rc = -errno;
    return rc;
}

static int attach(vr_region *region, int trap_uffd)
{
    if (!region->drain_page)
        region->drain_page = vr_drain_page_new(region->page_size);
    if (!region->drain_page)
        return -errno;
    int rc = register_range(trap_uffd, region->base, region->size);
    if (rc == 0) {
        region->trap_uffd = trap_uffd;
        region->kernel_reclaims = 1;
    }
    return rc;
}

/* In a forked child: the child's copy of the mapping is not registered (no UFFD_FEATURE_EVENT_FORK),
 * so a missing page would read as zeros. Register it with the child's own descriptor (the inherited
 * one belongs to the parent's address space and must never be used here). */
int vr_sigbus_uffd_rebind(vr_region *region, int trap_uffd)
{
    region->trap_uffd = -1;
    return attach(region, trap_uffd);
}

/* --- scratch buffers for faults served on the faulting thread ---------------------------------- */

/* A chunk-sized buffer for one fault; `*slot_out` is -1 when it was mapped for this fault alone.
 * NULL if no memory can be mapped. Async-signal-safe (atomics and mmap). */
static char *take_scratch(vr_region *region, int *slot_out)
{
    for (int slot = 0; slot < VR_SCRATCH_SLOTS; slot++) {
        if (__atomic_exchange_n(&region->scratch_busy[slot], 1, __ATOMIC_ACQUIRE))
            continue;
        char *buffer = __atomic_load_n(&region->scratch[slot], __ATOMIC_ACQUIRE);
        if (!buffer) {
            buffer = mmap(NULL, region->chunk_size, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (buffer == MAP_FAILED) {
                __atomic_store_n(&region->scratch_busy[slot], 0, __ATOMIC_RELEASE);
                return NULL;
            }
            __atomic_store_n(&region->scratch[slot], buffer, __ATOMIC_RELEASE);
        }
        *slot_out = slot;
        return buffer;
    }
    char *buffer = mmap(NULL, region->chunk_size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    *slot_out = -1;
    return buffer == MAP_FAILED ? NULL : buffer;
}

/* Scratch buffers of chunks at least this large are made lazy-free after each use. */
#define LAZY_FREE_SCRATCH_BYTES (256 * 1024)

/* Return a scratch buffer. A large one's pages are made lazy-free, so an idle region's scratch costs
 * the process nothing under pressure (reusing a lazy-free page that was not reclaimed costs no
 * fault). A small one stays as it is: the madvise, with its TLB flush, cost about as much as a
 * whole 64 KiB fill, and a region keeps at most VR_SCRATCH_SLOTS of them (256 KiB at 64 KiB). */
static void give_scratch(vr_region *region, char *scratch, int slot)
{
    if (slot < 0) {
        munmap(scratch, region->chunk_size);
        return;
    }
    if (region->chunk_size >= LAZY_FREE_SCRATCH_BYTES)
        (void)madvise(scratch, region->chunk_size, MADV_FREE); /* only an optimisation */
    __atomic_store_n(&region->scratch_busy[slot], 0, __ATOMIC_RELEASE);
}

/* After filling chunks [first, end) (`rc` 0) or failing to (`rc`, returned): record them filled and
 * make the volatile ones lazy-free again (the access restarts right after the handler returns).
 *
 * With `drain`, then drain this CPU's LRU batches (vr_drain_cpu_lru): the pages UFFDIO_COPY added
 * there (a thread on another CPU may mark them volatile later), and those MADV_FREE queued to become
 * lazy-free (until that batch moves they stay swap-backed; a page_out or compaction that finds them
 * meanwhile, e.g. after this thread moved to another CPU, leaves them unreclaimable for good). A run
 * filled ahead chunk by chunk passes 0 and drains once at its end. */
static int finish_refill(vr_region *region, size_t first, size_t end, int rc, int drain)
{
    if (rc != 0)
        return rc;
    for (size_t chunk = first; chunk < end; chunk++) {
        vr_chunk_set(region, chunk, VR_CHUNK_MATERIALIZED);
        vr_chunk_clear(region, chunk, VR_CHUNK_FAILED);
        vr_stat_add(&region->stats.bytes_regenerated, vr_region_chunk_length(region, chunk));
        vr_region_keep_volatile(region, chunk);
    }
    if (drain)
        vr_drain_cpu_lru(region->drain_page, region->page_size);
    return 0;
}

/* Fill the missing pages of a chunk the caller holds (IN_FLIGHT): regenerated, or zeros for the
 * explicit on_error="zeros" policy (`regenerate` NULL). */
static int refill_chunk(vr_region *region, size_t chunk, vr_sigbus_regenerator regenerate)
{
    size_t length = vr_region_chunk_length(region, chunk);
    uintptr_t start = vr_chunk_address(region, chunk);
    int rc;
    if (!regenerate) {
        rc = vr_userfaultfd_fill_missing(region->trap_uffd, region->page_size, start, length, NULL,
                                  VR_FILL_ZEROPAGE);
    } else {
        vr_monitor_note_refill(region, length, 1);
        if (region->source_kind == VR_SOURCE_ZEROS) /* copied from zeros: no buffer, no memset */
            return finish_refill(region, chunk, chunk + 1,
                                 vr_userfaultfd_fill_missing(region->trap_uffd, region->page_size,
                                                             start, length, NULL, VR_FILL_ZEROS),
                                 1);
        int slot;
        char *scratch = take_scratch(region, &slot);
        if (!scratch)
            return -ENOMEM;
        /* A reused buffer needs no clearing: a native source and a successful Python regenerator
         * write all `length` bytes (the Python side copies its own zeroed buffer), and a failed
         * one's bytes are never copied. */
        rc = regenerate(region, chunk, scratch);
        if (rc == 0)
            rc = vr_userfaultfd_fill_missing(region->trap_uffd, region->page_size, start, length, scratch,
                                      VR_FILL_COPY);
        give_scratch(region, scratch, slot);
    }
    return finish_refill(region, chunk, chunk + 1, rc, 1);
}

/* Chunks [first, end) filled ahead of a fault (see the trap op): zeros in one copy; other sources
 * chunk by chunk through a scratch buffer. Async-signal-safe (a Python regenerator: see sigbus.c). */
static int fill_ahead(vr_region *region, size_t first, size_t end, vr_sigbus_regenerator regenerate)
{
    uintptr_t start = vr_chunk_address(region, first);
    size_t length = vr_chunk_address(region, end - 1) + vr_region_chunk_length(region, end - 1) -
                    start;
    vr_monitor_note_refill(region, length, 1);
    if (region->source_kind == VR_SOURCE_ZEROS) {
        int rc = vr_userfaultfd_fill_missing(region->trap_uffd, region->page_size, start, length,
                                             NULL, VR_FILL_ZEROS);
        if (rc == 0) {
            vr_stat_add(&region->stats.chunks_filled_ahead, end - first);
            vr_stat_add(&region->stats.faults_on_faulting_thread, end - first); /* this thread's */
        }
        return finish_refill(region, first, end, rc, 1);
    }
    int slot;
    char *scratch = take_scratch(region, &slot);
    if (!scratch)
        return -ENOMEM;
    int rc = 0, filled = 0;
    size_t chunk = first;
    for (; rc == 0 && chunk < end; chunk++) {
        rc = regenerate(region, chunk, scratch);
        if (rc == 0)
            rc = vr_userfaultfd_fill_missing(region->trap_uffd, region->page_size,
                                             vr_chunk_address(region, chunk),
                                             vr_region_chunk_length(region, chunk), scratch,
                                             VR_FILL_COPY);
        if (rc == 0) {
            vr_stat_add(&region->stats.chunks_filled_ahead, 1);
            vr_stat_add(&region->stats.faults_on_faulting_thread, 1); /* served on this thread */
            finish_refill(region, chunk, chunk + 1, 0, 0);
            filled = 1;
        }
    }
    give_scratch(region, scratch, slot);
    if (filled)
        vr_drain_cpu_lru(region->drain_page, region->page_size);
    return rc;
}

static int chunk_missing_pages(vr_region *region, size_t chunk)
{
    size_t length = vr_region_chunk_length(region, chunk);
    int64_t present = vr_region_resident_pages(region, vr_chunk_address(region, chunk),
                                               length);
    return present < 0 || (size_t)present * region->page_size < length;
}

static int page_missing(vr_region *region, size_t chunk, uintptr_t address)
{
    (void)chunk;
    return !vr_region_page_present(region, address);
}

/* Dirty every page of a chunk, so the kernel may no longer discard it; 0, -EFAULT when a page was
 * reclaimed meanwhile (the caller refills and tries again), or another -errno. */
static int dirty_chunk(vr_region *region, size_t chunk)
{
    size_t length = vr_region_chunk_length(region, chunk);
    uintptr_t start = vr_chunk_address(region, chunk);
    for (;;) {
        if (madvise((void *)start, length, MADV_POPULATE_WRITE) == 0)
            return 0;
        if (errno == EINTR || errno == EAGAIN)
            continue;
        if (errno != EINVAL)
            return -errno; /* EFAULT: a missing page (SIGBUS mode fails the populate) */
        break;
    }
    /* No MADV_POPULATE_WRITE (Linux < 5.14): an atomic no-op write dirties each page without
     * changing it, whatever another thread writes at the same time (vr_dirty_page). A page reclaimed
     * between the refill and this write raises SIGBUS on this thread, which the handler serves like
     * any fault (and, should that refill fail, passes on like a failed raw access). */
    for (size_t offset = 0; offset < length; offset += region->page_size)
        vr_dirty_page(start + offset);
    return 0;
}

const struct vr_sigbus_trap vr_sigbus_uffd_trap = {
    .page_missing = page_missing,
    .chunk_missing = chunk_missing_pages,
    .refill = refill_chunk,
    .dirty = dirty_chunk,
    .attach = attach,
    .fill_ahead = fill_ahead,
};
