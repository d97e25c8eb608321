/* Region state shared by both backends: creation, references, chunk bookkeeping, native fills,
 * introspection. Called from Python with the GIL released (cffi); vr_fill_native also runs on the
 * uffd handler thread and inside signal handlers: it uses only syscalls and memory it is handed. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "isolated.h"
#include "kernel_defs.h"
#include "region.h"

size_t vr_region_chunk_length(const vr_region *region, size_t chunk_index)
{
    size_t start = chunk_index * region->chunk_size;
    size_t rest = region->size - start;
    return rest < region->chunk_size ? rest : region->chunk_size;
}

void vr_region_span(const vr_region *region, size_t first_chunk, size_t end_chunk,
                    uintptr_t *start_out, size_t *length_out)
{
    size_t end = end_chunk * region->chunk_size;
    if (end > region->size)
        end = region->size;
    *start_out = vr_chunk_address(region, first_chunk);
    *length_out = end - first_chunk * region->chunk_size;
}

void vr_region_ref(vr_region *region)
{
    __atomic_fetch_add(&region->refcount, 1, __ATOMIC_RELAXED);
}

void vr_region_unref(vr_region *region)
{
    if (__atomic_sub_fetch(&region->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        for (int slot = 0; slot < VR_SCRATCH_SLOTS; slot++)
            if (region->scratch[slot])
                munmap(region->scratch[slot], region->chunk_size);
        if (region->drain_page)
            munmap(region->drain_page, region->page_size);
        free(region->chunk_state);
        free(region->owners);
        free(region->gil_free_waiters);
        free(region->volatile_since);
        free(region->holds);
        free(region);
    }
}

int vr_region_list_append(vr_region ***regions, size_t *count, size_t *capacity, vr_region *region)
{
    if (*count == *capacity) {
        size_t grown_capacity = *capacity ? 2 * *capacity : 8;
        vr_region **grown = realloc(*regions, grown_capacity * sizeof *grown);
        if (!grown)
            return -ENOMEM;
        *regions = grown;
        *capacity = grown_capacity;
    }
    vr_region_ref(region);
    (*regions)[(*count)++] = region;
    return 0;
}

int vr_region_list_remove(vr_region **regions, size_t *count, vr_region *region)
{
    for (size_t i = 0; i < *count; i++) {
        if (regions[i] == region) {
            regions[i] = regions[--*count];
            return 1;
        }
    }
    return 0;
}

/* Fill-ahead: at most this many bytes past a fault ($VRANGE_FILL_AHEAD_KIB; 0 turns it off), and
 * only once this many faults in a row walked forward. */
#define DEFAULT_FILL_AHEAD_KIB 1024
#define AHEAD_AFTER_FAULTS 4

/* How many chunks a fault may fill ahead of itself: not for an isolated source (its helper process
 * may be slow, and a worker waits for it; a fault never waits for chunks it did not touch). */
static size_t ahead_max_chunks(int source_kind, size_t chunk_size)
{
    if (source_kind == VR_SOURCE_ISOLATED)
        return 0;
    long kib = DEFAULT_FILL_AHEAD_KIB;
    const char *setting = getenv("VRANGE_FILL_AHEAD_KIB"); /* not in a signal handler: at creation */
    if (setting && *setting)
        kib = atol(setting) > 0 ? atol(setting) : 0;
    return (size_t)kib * 1024 / chunk_size;
}

int vr_region_new(vr_uffd_handler *handler, uintptr_t base, size_t size, size_t chunk_size,
                  int source_kind, int file_fd, int64_t file_offset, void *python_handle,
                  int on_error, vr_region **out)
{
    long page_size = sysconf(_SC_PAGESIZE);
    if (size == 0 || chunk_size == 0 || base % (uintptr_t)page_size || size % (size_t)page_size ||
        chunk_size % (size_t)page_size)
        return -EINVAL;
    vr_region *region = calloc(1, sizeof *region);
    if (!region)
        return -ENOMEM;
    region->chunk_count = (size + chunk_size - 1) / chunk_size;
    region->chunk_state = calloc(region->chunk_count, 1);
    region->owners = calloc(region->chunk_count, sizeof *region->owners);
    region->gil_free_waiters = calloc(region->chunk_count, sizeof *region->gil_free_waiters);
    region->volatile_since = calloc(region->chunk_count, sizeof *region->volatile_since);
    region->holds = calloc(region->chunk_count, sizeof *region->holds);
    region->refcount = 1; /* the caller's (Python's) reference, dropped by vr_region_release */
    if (!region->chunk_state || !region->owners || !region->gil_free_waiters ||
        !region->volatile_since || !region->holds) {
        vr_region_unref(region);
        return -ENOMEM;
    }
    region->base = base;
    region->size = size;
    region->chunk_size = chunk_size;
    region->page_size = (size_t)page_size;
    region->source_kind = source_kind;
    region->file_fd = file_fd;
    region->file_offset = file_offset;
    region->python_handle = python_handle;
    region->on_error = on_error;
    region->handler = handler;
    region->trap_fd = -1;
    region->trap_uffd = -1;
    region->file_size = -1;
    region->discard_chunk = vr_region_discard_pages;
    region->ahead_max_chunks = ahead_max_chunks(source_kind, chunk_size);
    region->ahead_limit = region->chunk_count;
    /* Huge pages would bypass the per-chunk accounting and UFFDIO_COPY works in base pages. */
    if (madvise((void *)base, size, MADV_NOHUGEPAGE) < 0 && errno != EINVAL) {
        int saved = errno;
        vr_region_unref(region);
        return -saved;
    }
    *out = region;
    return 0;
}

int vr_region_references(vr_region *region)
{
    return __atomic_load_n(&region->refcount, __ATOMIC_ACQUIRE);
}

void vr_region_release(vr_region *region) { vr_region_unref(region); }

int vr_region_last_native_error(vr_region *region)
{
    return __atomic_load_n(&region->last_native_error, __ATOMIC_ACQUIRE);
}

int vr_region_last_map_error(vr_region *region)
{
    return __atomic_load_n(&region->last_map_error, __ATOMIC_ACQUIRE);
}

/* Before a populate whose failure Python explains: forget the errors of earlier faults. */
void vr_region_clear_last_errors(vr_region *region)
{
    __atomic_store_n(&region->last_native_error, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&region->last_map_error, 0, __ATOMIC_RELEASE);
}

static int native_failure(vr_region *region, int error_number)
{
    __atomic_store_n(&region->last_native_error, error_number, __ATOMIC_RELEASE);
    return -error_number;
}

/* Fill `buffer` (one chunk) from a native source. Async-signal-safe, no GIL. */
int vr_fill_native(vr_region *region, size_t chunk_index, char *buffer)
{
    size_t length = vr_region_chunk_length(region, chunk_index);
    if (region->source_kind == VR_SOURCE_ZEROS) {
        memset(buffer, 0, length);
        return 0;
    }
    if (region->source_kind == VR_SOURCE_ISOLATED) {
        int rc = vr_isolated_fill(region->isolated, (uint64_t)(chunk_index * region->chunk_size),
                                  buffer, length);
        return rc < 0 ? native_failure(region, -rc) : 0;
    }
    if (region->source_kind != VR_SOURCE_FILE)
        return native_failure(region, EINVAL);
    size_t done = 0;
    off_t position = (off_t)(region->file_offset + (int64_t)(chunk_index * region->chunk_size));
    while (done < length) {
        ssize_t n = pread(region->file_fd, buffer + done, length - done, position + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return native_failure(region, errno);
        if (n == 0) {
            /* Past the end of the file as it was when the source was made: zeros. Before it, the
             * file has shrunk since: that data is gone, and zeros would be wrong bytes. */
            if (region->file_size >= 0 && position + (off_t)done < region->file_size)
                return native_failure(region, ENODATA);
            memset(buffer + done, 0, length - done);
            break;
        }
        done += (size_t)n;
    }
    return 0;
}

/* The 'abort' error policy: say why on stderr (write(2) is async-signal-safe), then abort. */
void vr_abort_for_policy(void)
{
    static const char message[] =
        "vrange: a regenerator failed and the region's error policy is 'abort'\n";
    (void)!write(STDERR_FILENO, message, sizeof message - 1);
    abort();
}

/* Before unmapping: stop starting regenerations of this region and wait until none is running,
 * so nothing is ever written at this address once the mapping is gone (another mapping may take
 * the address at once). Called with the GIL released. -ETIMEDOUT: one is still running (it may be
 * the caller's own regenerator); the region is then open again. */
int vr_region_quiesce(vr_region *region, int timeout_ms)
{
    __atomic_store_n(&region->closing, VR_CLOSING, __ATOMIC_SEQ_CST);
    /* Pairs with the fence after a fault handler claims a chunk: either we see its IN_FLIGHT, or
     * it sees CLOSING and backs off (a store-then-load on both sides needs a full fence). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int64_t deadline = vr_deadline_ns(timeout_ms);
    for (size_t chunk = 0; chunk < region->chunk_count;) {
        if (!(vr_chunk_load(region, chunk) & VR_CHUNK_IN_FLIGHT)) {
            chunk++;
            continue;
        }
        if (vr_monotonic_ns() > deadline) {
            __atomic_store_n(&region->closing, VR_OPEN, __ATOMIC_RELEASE);
            return -ETIMEDOUT;
        }
        vr_pause_briefly();
    }
    return 0;
}

void vr_region_set_volatile(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    int64_t now = vr_monotonic_ns();
    /* Chunks that may be discarded from now on (by vrange or the kernel): see python_fill_ahead. */
    __atomic_fetch_add(&region->discard_epoch, 1, __ATOMIC_SEQ_CST);
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        __atomic_store_n(&region->volatile_since[chunk], now, __ATOMIC_RELAXED);
        vr_chunk_set(region, chunk, VR_CHUNK_VOLATILE);
    }
}

/* After populating: report which chunks were purged since marked volatile, and pin them. */
int vr_region_finish_nonvolatile(vr_region *region, size_t first_chunk, size_t end_chunk,
                                 uint8_t *purged_out)
{
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        uint8_t before = vr_chunk_load(region, chunk);
        purged_out[chunk - first_chunk] = (before & VR_CHUNK_PURGED) ? 1 : 0;
        vr_chunk_clear(region, chunk, VR_CHUNK_VOLATILE | VR_CHUNK_PURGED);
    }
    return 0;
}

int vr_region_chunk_states(vr_region *region, uint8_t *states_out)
{
    for (size_t chunk = 0; chunk < region->chunk_count; chunk++)
        states_out[chunk] = vr_chunk_load(region, chunk);
    return 0;
}

/* One byte per page of the region: bit 0 set when the page is resident (mincore). */
int vr_region_residency(vr_region *region, uint8_t *pages_out)
{
    if (mincore((void *)region->base, region->size, pages_out) < 0)
        return -errno;
    return 0;
}

void vr_region_stats(vr_region *region, struct vr_stats *out)
{
    out->faults_on_handler_thread = __atomic_load_n(&region->stats.faults_on_handler_thread, __ATOMIC_RELAXED);
    out->faults_on_faulting_thread = __atomic_load_n(&region->stats.faults_on_faulting_thread, __ATOMIC_RELAXED);
    out->faults_on_worker_thread = __atomic_load_n(&region->stats.faults_on_worker_thread, __ATOMIC_RELAXED);
    out->bytes_regenerated = __atomic_load_n(&region->stats.bytes_regenerated, __ATOMIC_RELAXED);
    out->regeneration_errors = __atomic_load_n(&region->stats.regeneration_errors, __ATOMIC_RELAXED);
    out->purges = __atomic_load_n(&region->stats.purges, __ATOMIC_RELAXED);
    out->volatile_refills = __atomic_load_n(&region->stats.volatile_refills, __ATOMIC_RELAXED);
    out->chunks_filled_ahead = __atomic_load_n(&region->stats.chunks_filled_ahead, __ATOMIC_RELAXED);
    for (int reason = 0; reason < 4; reason++) {
        out->purges_by_reason[reason] =
            __atomic_load_n(&region->stats.purges_by_reason[reason], __ATOMIC_RELAXED);
        out->bytes_purged_by_reason[reason] =
            __atomic_load_n(&region->stats.bytes_purged_by_reason[reason], __ATOMIC_RELAXED);
    }
}


/* --- volatility shared by the uffd backend and the sigbus userfaultfd trap ----------------------- */


/* Volatile = MADV_FREE: the kernel discards these pages by itself under pressure. */
int vr_region_mark_volatile(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    vr_region_set_volatile(region, first_chunk, end_chunk);
    uintptr_t start;
    size_t length;
    vr_region_span(region, first_chunk, end_chunk, &start, &length);
    if (region->before_lazy_free)
        region->before_lazy_free(region);
    if (madvise((void *)start, length, MADV_FREE) < 0)
        return -errno;
    /* MADV_FREE only queues the pages on this CPU's lazy-free batch: they stay swap-backed until
     * the batch moves them, and a batch move that finds a page isolated meanwhile (reclaim,
     * compaction or a MADV_PAGEOUT from another CPU) skips it for good, leaving it unreclaimable
     * though volatile. Move the batch now. */
    vr_drain_cpu_lru(region->drain_page, region->page_size);
    return 0;
}

/* A chunk was just refilled (UFFDIO_COPY installs ordinary dirty pages) by a thread that still holds
 * it IN_FLIGHT: if the chunk is volatile, make it lazy-free again, so that a cache marked volatile
 * once stays reclaimable however often it is refilled. Async-signal-safe (one madvise).
 *
 * Against mark_nonvolatile: vr_region_begin_pin clears VOLATILE and then waits for IN_FLIGHT, so
 * either this load sees VOLATILE cleared (and frees nothing), or the pin waits until this madvise is
 * done and then dirties the chunk: a pinned chunk is never left lazy-free. Both sides use seq_cst.
 *
 * Why the faulting access cannot refault for ever: the access restarts as soon as it is woken (the
 * uffd backend wakes it before this call; the sigbus trap returns from the handler right after), and
 * MADV_FREE puts the chunk at the young end of the inactive list, so reclaim takes every older
 * lazy-free page first. If reclaim takes it anyway, the access faults again and is served again:
 * extra work, never wrong bytes. */
int vr_region_keep_volatile(vr_region *region, size_t chunk_index)
{
    if (!(__atomic_load_n(&region->chunk_state[chunk_index], __ATOMIC_SEQ_CST) & VR_CHUNK_VOLATILE))
        return 0;
    /* Held for a system call (vrange.io): it must stay present until the call is done; the hold's
     * release makes it lazy-free again (vr_region_hold). */
    if (__atomic_load_n(&region->holds[chunk_index], __ATOMIC_SEQ_CST))
        return 0;
    uintptr_t start;
    size_t length;
    vr_region_span(region, chunk_index, chunk_index + 1, &start, &length);
    /* A failure leaves the chunk pinned (still correct, only not reclaimable): nothing to report
     * from a fault handler. */
    if (madvise((void *)start, length, MADV_FREE) != 0)
        return 0;
    vr_stat_add(&region->stats.volatile_refills, 1);
    return 1;
}

/* --- lazy-free and the per-CPU LRU batches (docs/design.md#lazy-free-and-the-lru-batches) ------ */

/* A page a fill installs (UFFDIO_COPY) waits in its CPU's LRU batch before it joins an LRU list (up
 * to 31 pages, until the batch fills or that CPU drains it). MADV_FREE drains only its caller's CPU
 * and skips a page that is not on a list yet: such a page is never made lazy-free, so with no swap
 * the kernel can never take it back though vrange counts it volatile. A thread that fills pages
 * another thread may mark volatile therefore drains its own CPU's batches first: MADV_FREE on a
 * page that was never touched does exactly that (lru_add_drain) and nothing else, about 0.5 us.
 * Async-signal-safe (one madvise); a failure changes nothing but when the batch drains. */
void vr_drain_cpu_lru(void *drain_page, size_t page_size)
{
    if (drain_page)
        (void)madvise(drain_page, page_size, MADV_FREE);
}

/* A page for vr_drain_cpu_lru (never touched, so it never costs memory), or NULL. */
void *vr_drain_page_new(size_t page_size)
{
    void *page = mmap(NULL, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return page == MAP_FAILED ? NULL : page;
}

/* First step of mark_nonvolatile: the chunks stop being volatile now, before they are populated, and
 * any refill in flight on them finishes first (see vr_region_keep_volatile). `was_volatile_out[i]`
 * tells the caller which chunks to make volatile again should populating fail. Called with the GIL
 * released; the refills waited for may need it (Python regenerators on workers or other threads). */
int vr_region_begin_pin(vr_region *region, size_t first_chunk, size_t end_chunk,
                        uint8_t *was_volatile_out)
{
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        uint8_t before = __atomic_fetch_and(&region->chunk_state[chunk], (uint8_t)~VR_CHUNK_VOLATILE,
                                            __ATOMIC_SEQ_CST);
        was_volatile_out[chunk - first_chunk] = (before & VR_CHUNK_VOLATILE) ? 1 : 0;
    }
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++)
        while (__atomic_load_n(&region->chunk_state[chunk], __ATOMIC_SEQ_CST) & VR_CHUNK_IN_FLIGHT)
            vr_pause_briefly();
    return 0;
}

#define MINCORE_BATCH 256 /* pages per mincore call: a bounded stack whatever the chunk size */

/* How many pages of [start, start + length) are resident; -errno if mincore fails. */
int64_t vr_region_resident_pages(const vr_region *region, uintptr_t start, size_t length)
{
    unsigned char vector[MINCORE_BATCH];
    int64_t present = 0;
    size_t batch_bytes = MINCORE_BATCH * region->page_size;
    for (size_t done = 0; done < length; done += batch_bytes) {
        size_t part = length - done < batch_bytes ? length - done : batch_bytes;
        if (mincore((void *)(start + done), part, vector) < 0)
            return -errno;
        for (size_t page = 0; page < part / region->page_size; page++)
            present += vector[page] & 1;
    }
    return present;
}

/* 1 if the page holding `address` is resident. Async-signal-safe. */
int vr_region_page_present(const vr_region *region, uintptr_t address)
{
    uintptr_t page = address & ~(uintptr_t)(region->page_size - 1);
    return vr_region_resident_pages(region, page, region->page_size) == 1;
}

/* Fill-ahead. A thread walking forward through missing memory (a scan, a copy, a file write) faults
 * once per chunk, and each fault costs more than the fill itself: a wake-up of the uffd handler
 * thread on another CPU, or a signal's delivery and return, and for a Python regenerator a call
 * into Python. So once AHEAD_AFTER_FAULTS faults in a row each hit the chunk right after the last
 * one filled, a fault also fills the missing chunks after it: one chunk at first, doubling with each
 * fault of the walk up to ahead_max_chunks (1 MiB). Any other fault ends the walk: random access
 * never fills ahead, and neither do the first faults of a walk. Called by whoever serves the fault
 * (the uffd handler thread, the faulting thread's signal handler, a worker; async-signal-safe:
 * atomics only). Returns how many chunks to try. */
size_t vr_region_ahead_window(vr_region *region, size_t chunk)
{
    size_t max_chunks = __atomic_load_n(&region->ahead_max_chunks, __ATOMIC_RELAXED);
    if (!max_chunks)
        return 0;
    size_t window = 0;
    size_t streak = 1;
    if (chunk && __atomic_load_n(&region->ahead_next, __ATOMIC_RELAXED) == chunk)
        streak = __atomic_load_n(&region->ahead_streak, __ATOMIC_RELAXED) + 1;
    if (streak >= AHEAD_AFTER_FAULTS) {
        window = __atomic_load_n(&region->ahead_window, __ATOMIC_RELAXED);
        window = window ? window * 2 : 1;
        if (window > max_chunks)
            window = max_chunks;
    }
    __atomic_store_n(&region->ahead_streak, streak, __ATOMIC_RELAXED);
    __atomic_store_n(&region->ahead_window, window, __ATOMIC_RELAXED);
    __atomic_store_n(&region->ahead_next, chunk + 1, __ATOMIC_RELAXED);
    return window;
}

/* Region(fill_ahead=False): every chunk is filled by a fault of its own. */
void vr_region_turn_off_fill_ahead(vr_region *region)
{
    __atomic_store_n(&region->ahead_max_chunks, 0, __ATOMIC_RELAXED);
}

/* While a library call (mark_nonvolatile, prefault) makes chunks present, faults fill ahead only up
 * to the end of its range: the call regenerates what it was asked for, nothing after it. `end_chunk`
 * past the last chunk lifts the limit. The region's calls are serialized by its lock (Python). */
void vr_region_limit_fill_ahead(vr_region *region, size_t end_chunk)
{
    __atomic_store_n(&region->ahead_limit,
                     end_chunk < region->chunk_count ? end_chunk : region->chunk_count,
                     __ATOMIC_RELEASE);
}

/* The chunk fill-ahead stops before. */
size_t vr_region_ahead_limit(vr_region *region)
{
    return __atomic_load_n(&region->ahead_limit, __ATOMIC_ACQUIRE);
}

/* The walk's next fault is expected at `next_chunk` (after the chunks filled ahead). */
void vr_region_ahead_filled(vr_region *region, size_t next_chunk)
{
    __atomic_store_n(&region->ahead_next, next_chunk, __ATOMIC_RELAXED);
}

/* May a fault fill this chunk ahead? Only a chunk wholly missing (never filled, or all its pages
 * discarded), not being regenerated, and not failed (a failed chunk is left to a real fault, which
 * applies the error policy). The caller still has to claim it. Async-signal-safe (mincore). */
int vr_region_chunk_fillable_ahead(vr_region *region, size_t chunk)
{
    uint8_t state = vr_chunk_load(region, chunk);
    if (state & (VR_CHUNK_IN_FLIGHT | VR_CHUNK_POISONED | VR_CHUNK_FAILED))
        return 0;
    if (!(state & VR_CHUNK_MATERIALIZED))
        return 1;
    return vr_region_resident_pages(region, vr_chunk_address(region, chunk),
                                    vr_region_chunk_length(region, chunk)) == 0;
}

static void count_purge(vr_region *region, int reason, uint64_t bytes)
{
    vr_stat_add(&region->stats.purges, 1);
    vr_stat_add(&region->stats.purges_by_reason[reason], 1);
    vr_stat_add(&region->stats.bytes_purged_by_reason[reason], bytes);
}

/* Call `action` on each run of pages of [start, start + length) that mincore reports resident
 * (`resident` 1) or missing (0), in order; stops at the first action that fails. 0 or -errno. */
static int for_each_run_of_pages(vr_region *region, uintptr_t start, size_t length, int resident,
                                 int (*action)(vr_region *region, uintptr_t run, size_t run_length))
{
    unsigned char vector[MINCORE_BATCH];
    size_t page = region->page_size;
    size_t batch_bytes = MINCORE_BATCH * page;
    for (size_t done = 0; done < length; done += batch_bytes) {
        size_t part = length - done < batch_bytes ? length - done : batch_bytes;
        size_t pages = part / page;
        if (mincore((void *)(start + done), part, vector) < 0)
            return -errno;
        for (size_t first = 0; first < pages;) {
            if ((vector[first] & 1) != resident) {
                first++;
                continue;
            }
            size_t end = first;
            while (end < pages && (vector[end] & 1) == resident)
                end++;
            int rc = action(region, start + done + first * page, (end - first) * page);
            if (rc < 0)
                return rc;
            first = end;
        }
    }
    return 0;
}

/* Make the resident pages of `length` bytes at `start` dirty, so the kernel can no longer discard
 * them (a pin without filling, on a region the kernel reclaims). Runs of resident pages get
 * MADV_POPULATE_WRITE; missing pages are left alone (they refill on access). The race: reclaim may
 * take a lazy-free page between mincore and the madvise. On the uffd backend the madvise then faults
 * it in through the handler (a refill: correct, only not cheap); on the sigbus userfaultfd trap it
 * fails with EFAULT, and the run is redone page by page, skipping the pages that are missing now.
 * Without MADV_POPULATE_WRITE (Linux < 5.14) each resident page gets an atomic no-op write
 * (vr_dirty_page): a page reclaimed meanwhile faults like any access and is served. Called with the
 * GIL released. One run of resident pages here; 0 or -errno. */
static int dirty_run(vr_region *region, uintptr_t run, size_t run_length)
{
    size_t page = region->page_size;
    int rc;
    while ((rc = madvise((void *)run, run_length, MADV_POPULATE_WRITE)) < 0 &&
           (errno == EINTR || errno == EAGAIN))
        ;
    if (rc < 0 && errno == EINVAL) {
        for (size_t offset = 0; offset < run_length; offset += page)
            vr_dirty_page(run + offset);
    } else if (rc < 0 && errno == EFAULT) {
        /* A page of the run went missing meanwhile (or its refill failed): dirty the rest one by
         * one; a missing page stays missing and is refilled on access. */
        for (size_t offset = 0; offset < run_length; offset += page) {
            while ((rc = madvise((void *)(run + offset), page, MADV_POPULATE_WRITE)) < 0 &&
                   (errno == EINTR || errno == EAGAIN))
                ;
            if (rc < 0 && errno != EFAULT)
                return -errno;
        }
    } else if (rc < 0) {
        return -errno;
    }
    return 0;
}

/* Every run of resident pages of the range made dirty, as dirty_run says. */
static int dirty_resident_pages(vr_region *region, uintptr_t start, size_t length)
{
    return for_each_run_of_pages(region, start, length, 1, dirty_run);
}

/* A pin that does not fill (mark_nonvolatile(populate=False), Region.pinned(populate=False)). The
 * chunks' VOLATILE bits are cleared already and no refill of them was in flight then
 * (vr_region_begin_pin), so the kernel discards nothing of them any more once their resident pages
 * are dirty. Per chunk:
 * 1. on a region the kernel reclaims, its resident pages are made dirty (dirty_resident_pages);
 *    nothing is regenerated, except a page reclaimed in the race described there (uffd backend);
 * 2. with the chunk claimed (IN_FLIGHT, like a purge: faults on it wait, and the uffd backend wakes
 *    them afterwards), `purged_out[i]` is set if the chunk was filled once and is purged now or was
 *    purged since it was last marked volatile (PURGED). A chunk that is still missing pages is
 *    reported here and becomes "never filled" again (MATERIALIZED cleared; the discard is counted as
 *    the kernel's unless vrange's purge counted it): its refill on access is then a first touch, not
 *    a purge that the next pin would report a second time.
 * Called with the GIL released (a refill in the race may need it). 0 or -errno. */
int vr_region_pin_without_fill(vr_region *region, size_t first_chunk, size_t end_chunk,
                               uint8_t *purged_out)
{
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        uintptr_t start;
        size_t length;
        vr_region_span(region, chunk, chunk + 1, &start, &length);
        purged_out[chunk - first_chunk] = 0;
        if (region->kernel_reclaims) {
            int rc = dirty_resident_pages(region, start, length);
            if (rc < 0)
                return rc;
        }
        while (__atomic_fetch_or(&region->chunk_state[chunk], VR_CHUNK_IN_FLIGHT,
                                 __ATOMIC_SEQ_CST) & VR_CHUNK_IN_FLIGHT)
            vr_pause_briefly(); /* a fault is refilling it: it will be present and PURGED-marked */
        uint8_t state = __atomic_load_n(&region->chunk_state[chunk], __ATOMIC_SEQ_CST);
        int rc = 0;
        int missing;
        if (region->trap_kind == VR_TRAP_MEMFD) {
            missing = (state & VR_CHUNK_TRAPPED) != 0; /* a chunk is trapped whole or mapped whole */
        } else {
            int64_t present = vr_region_resident_pages(region, start, length);
            rc = present < 0 ? (int)present : 0;
            missing = present >= 0 && (size_t)present * region->page_size < length;
        }
        if (state & VR_CHUNK_MATERIALIZED) {
            purged_out[chunk - first_chunk] = (missing || (state & VR_CHUNK_PURGED)) ? 1 : 0;
            if (missing) {
                if (!(state & VR_CHUNK_COUNTED))
                    count_purge(region, VR_PURGE_KERNEL, 0);
                vr_chunk_clear(region, chunk, VR_CHUNK_MATERIALIZED | VR_CHUNK_COUNTED);
            }
        }
        vr_chunk_clear(region, chunk, VR_CHUNK_PURGED | VR_CHUNK_IN_FLIGHT);
        if (region->after_purge)
            region->after_purge(region, chunk); /* wake faults set aside meanwhile (uffd backend) */
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* A refill found the chunk, filled before, missing again: count the discard as the kernel's unless
 * vrange's own purge counted it already. Async-signal-safe. */
void vr_region_note_discard_found(vr_region *region, size_t chunk_index)
{
    if (!(vr_chunk_load(region, chunk_index) & VR_CHUNK_MATERIALIZED))
        return; /* a first touch is not a purge */
    vr_chunk_set(region, chunk_index, VR_CHUNK_PURGED);
    uint8_t before = __atomic_fetch_and(&region->chunk_state[chunk_index],
                                        (uint8_t)~VR_CHUNK_COUNTED, __ATOMIC_ACQ_REL);
    if (!(before & VR_CHUNK_COUNTED))
        count_purge(region, VR_PURGE_KERNEL, 0);
}

/* The default discard: drop the chunk's pages (MADV_DONTNEED); on a userfaultfd-registered range
 * they are then missing, and the next access is a fault vrange serves. */
int vr_region_discard_pages(vr_region *region, size_t chunk_index)
{
    uintptr_t start;
    size_t length;
    vr_region_span(region, chunk_index, chunk_index + 1, &start, &length);
    return madvise((void *)start, length, MADV_DONTNEED) < 0 ? -errno : 0;
}

/* Discard one chunk if it is volatile, filled, resident and not held; returns the bytes given back
 * (0 if it was skipped) or -errno. Safe against every other thread: the chunk is claimed (IN_FLIGHT)
 * first, so a fault on it waits, close() waits (vr_region_quiesce), and a pin that cleared VOLATILE
 * either is seen here or waits for this to finish (vr_region_begin_pin). Never called from a signal
 * handler; needs no GIL (the pressure monitor calls it from its own thread). */
int64_t vr_region_purge_chunk(vr_region *region, size_t chunk_index, int reason)
{
    uint8_t state = vr_chunk_load(region, chunk_index);
    if ((state & (VR_CHUNK_VOLATILE | VR_CHUNK_MATERIALIZED)) !=
            (VR_CHUNK_VOLATILE | VR_CHUNK_MATERIALIZED) ||
        (state & (VR_CHUNK_IN_FLIGHT | VR_CHUNK_TRAPPED)) ||
        __atomic_load_n(&region->holds[chunk_index], __ATOMIC_ACQUIRE))
        return 0;
    if (__atomic_fetch_or(&region->chunk_state[chunk_index], VR_CHUNK_IN_FLIGHT, __ATOMIC_SEQ_CST) &
        VR_CHUNK_IN_FLIGHT)
        return 0; /* being refilled or purged by another thread */
    __atomic_fetch_add(&region->discard_epoch, 1, __ATOMIC_SEQ_CST); /* see python_fill_ahead */
    int64_t freed = 0;
    state = __atomic_load_n(&region->chunk_state[chunk_index], __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&region->closing, __ATOMIC_SEQ_CST) == VR_OPEN &&
        (state & VR_CHUNK_VOLATILE) && !(state & VR_CHUNK_TRAPPED) &&
        !__atomic_load_n(&region->holds[chunk_index], __ATOMIC_SEQ_CST)) {
        uintptr_t start;
        size_t length;
        vr_region_span(region, chunk_index, chunk_index + 1, &start, &length);
        /* Count what is really given back: pages already discarded by the kernel are not. */
        int64_t present = vr_region_resident_pages(region, start, length);
        if (present > 0) {
            int rc = region->discard_chunk(region, chunk_index);
            if (rc < 0) {
                freed = rc;
            } else {
                freed = present * (int64_t)region->page_size;
                vr_chunk_set(region, chunk_index, VR_CHUNK_PURGED | VR_CHUNK_COUNTED);
                count_purge(region, reason, (uint64_t)freed);
            }
        } else if (present < 0) {
            freed = present;
        }
    }
    vr_chunk_clear(region, chunk_index, VR_CHUNK_IN_FLIGHT);
    if (region->after_purge)
        region->after_purge(region, chunk_index);
    return freed;
}

#define PURGE_IN_FLIGHT_WAITS 40 /* of vr_pause_briefly (50 us): about 2 ms */

/* Discard the volatile chunks of the range now; non-volatile chunks are skipped (never lose a
 * pinned byte), and so are chunks held for a system call. Returns the bytes discarded or -errno. */
int64_t vr_region_purge_range(vr_region *region, size_t first_chunk, size_t end_chunk, int reason)
{
    int64_t purged = 0;
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        int64_t freed = vr_region_purge_chunk(region, chunk, reason);
        /* A refill that has already let the faulting access go on may still hold the chunk for a
         * few microseconds (the uffd backend wakes the thread, then frees the volatile chunk
         * lazily): a purge right after that access must not skip it. Wait that long, no longer: a
         * regeneration still running is skipped, as documented. */
        for (int wait = 0; freed == 0 && wait < PURGE_IN_FLIGHT_WAITS &&
                           (vr_chunk_load(region, chunk) & VR_CHUNK_IN_FLIGHT); wait++) {
            vr_pause_briefly();
            freed = vr_region_purge_chunk(region, chunk, reason);
        }
        if (freed < 0)
            return freed;
        purged += freed;
    }
    return purged;
}

/* The last hold of a volatile chunk of a region the kernel reclaims is gone: make it lazy-free
 * again, claimed like a refill (so a pin racing this is safe, see vr_region_keep_volatile). */
static void free_after_hold(vr_region *region, size_t chunk)
{
    while (__atomic_fetch_or(&region->chunk_state[chunk], VR_CHUNK_IN_FLIGHT, __ATOMIC_SEQ_CST) &
           VR_CHUNK_IN_FLIGHT)
        vr_pause_briefly(); /* a refill or purge of it is finishing */
    if (__atomic_load_n(&region->closing, __ATOMIC_SEQ_CST) == VR_OPEN)
        vr_region_keep_volatile(region, chunk);
    vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
    if (region->after_purge)
        region->after_purge(region, chunk); /* wake faults set aside meanwhile (uffd backend) */
}

/* vrange.io holds the chunks a system call is about to use (+1) and lets go afterwards (-1). A held
 * chunk is never purged by vrange, and on regions the kernel reclaims a refill leaves it dirty (the
 * caller dirties it too), so the call cannot be starved by reclaim; the release makes it volatile
 * again. Called with the GIL released. */
void vr_region_hold(vr_region *region, size_t first_chunk, size_t end_chunk, int delta)
{
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        uint16_t now = __atomic_add_fetch(&region->holds[chunk], (uint16_t)delta, __ATOMIC_SEQ_CST);
        if (delta > 0) {
            /* A purge that claimed the chunk before this hold was visible may still discard it:
             * wait for it (the prefault that follows refills the chunk). Not for a chunk this very
             * thread is regenerating (a regenerator writing its own region's memory). */
            while ((__atomic_load_n(&region->chunk_state[chunk], __ATOMIC_SEQ_CST) &
                    VR_CHUNK_IN_FLIGHT) &&
                   region->owners[chunk] != (pid_t)syscall(SYS_gettid))
                vr_pause_briefly();
        } else if (now == 0 && region->kernel_reclaims &&
                   (vr_chunk_load(region, chunk) & (VR_CHUNK_VOLATILE | VR_CHUNK_MATERIALIZED)) ==
                       (VR_CHUNK_VOLATILE | VR_CHUNK_MATERIALIZED)) {
            free_after_hold(region, chunk);
        }
    }
}

/* In a forked child: the threads that held chunks for system calls, or regenerated them, are gone,
 * and so is a close() another thread was draining at the fork (the child's region is open: without
 * this, every fault the child takes without the GIL would wait for an unmap that never comes). */
void vr_region_forget_threads(vr_region *region)
{
    if (__atomic_load_n(&region->closing, __ATOMIC_ACQUIRE) == VR_CLOSING)
        __atomic_store_n(&region->closing, VR_OPEN, __ATOMIC_RELEASE);
    for (size_t chunk = 0; chunk < region->chunk_count; chunk++) {
        region->holds[chunk] = 0;
        region->owners[chunk] = 0;
    }
}

/* A forked child that cannot serve the region (no userfaultfd of its own, no mapping budget left):
 * a page missing now, or discarded later, would read as zeros. Make the whole region inaccessible
 * instead (an access raises SIGSEGV): wrong bytes are never handed out. Called from the at-fork
 * hook, where the child is single-threaded. */
int vr_region_fence(vr_region *region)
{
    /* Nothing runs on it in this child: a refill in flight at fork() belonged to another thread. */
    for (size_t chunk = 0; chunk < region->chunk_count; chunk++)
        vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
    if (mprotect((void *)region->base, region->size, PROT_NONE) < 0)
        return -errno;
    return 0;
}

/* For close(): Python reads the count with the GIL held (a cffi call would let it go). */
int *vr_region_gil_waiters_counter(vr_region *region) { return &region->gil_waiters; }

/* For close(): Python reads the states with the GIL held (a cffi call would let it go). */
uint8_t *vr_region_chunk_state_array(vr_region *region) { return region->chunk_state; }

void vr_region_set_file_size(vr_region *region, int64_t file_size)
{
    region->file_size = file_size;
}

void vr_region_set_isolated(vr_region *region, struct vr_isolated *isolated)
{
    region->isolated = isolated;
}

void vr_region_set_policy(vr_region *region, int priority, int group)
{
    region->priority = priority;
    region->group = group;
}

/* One run of pages made missing (MADV_DONTNEED). */
static int discard_run(vr_region *region, uintptr_t run, size_t run_length)
{
    (void)region;
    return madvise((void *)run, run_length, MADV_DONTNEED) < 0 ? -errno : 0;
}

/* Drop the pages of [start, start + length) that are not resident: poison markers count as missing
 * for mincore (pte_none_mostly), and MADV_DONTNEED clears them. Present pages stay. 0 or -errno. */
static int discard_missing_pages(vr_region *region, uintptr_t start, size_t length)
{
    return for_each_run_of_pages(region, start, length, 0, discard_run);
}

/* Drop chunks so they are missing again (and regenerated on the next access): every chunk of the
 * range, or only those whose regeneration failed. Used to leave failed chunks missing. */
int vr_region_discard(vr_region *region, size_t first_chunk, size_t end_chunk, int only_poisoned)
{
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        uint8_t state = vr_chunk_load(region, chunk);
        if (only_poisoned && !(state & (VR_CHUNK_POISONED | VR_CHUNK_FAILED)))
            continue;
        uintptr_t start;
        size_t length;
        vr_region_span(region, chunk, chunk + 1, &start, &length);
        /* A poisoned chunk's markers sit on the pages that were missing: its present pages may
         * hold bytes the program wrote under a pin that did not fill (they are not the failure's),
         * so only the markers go. A chunk the zeros policy filled is dropped whole (its zero pages
         * cannot be told from written ones). */
        int keep_present = only_poisoned && (state & VR_CHUNK_POISONED) &&
                           region->kernel_reclaims && region->trap_kind != VR_TRAP_MEMFD;
        if (keep_present) {
            int rc = discard_missing_pages(region, start, length);
            if (rc < 0)
                return rc;
        } else if (madvise((void *)start, length, MADV_DONTNEED) < 0) {
            return -errno;
        }
        vr_chunk_clear(region, chunk, VR_CHUNK_POISONED | VR_CHUNK_FAILED);
    }
    return 0;
}

/* Chunks of the range whose last regeneration failed (the "zeros" policy fills them, but a library
 * call must still report the failure and leave them missing). */
int vr_region_count_failed(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    int failed = 0;
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++)
        failed += (vr_chunk_load(region, chunk) & VR_CHUNK_FAILED) != 0;
    return failed;
}

/* vrange.testing.page_out, before each MADV_PAGEOUT: wait (bounded) until no chunk of the range is
 * being refilled. A refill of a volatile chunk wakes the faulting thread before it makes the chunk
 * lazy-free again (vr_region_keep_volatile), so that thread may page the range out while the
 * MADV_FREE runs: the isolation for reclaim makes MADV_FREE skip the pages, and they stay resident
 * for good though volatile. 0, or -ETIMEDOUT (a regenerator paging out its own chunk). */
int vr_region_wait_for_refills(vr_region *region, size_t first_chunk, size_t end_chunk,
                               int timeout_ms)
{
    int64_t deadline = vr_deadline_ns(timeout_ms);
    for (size_t chunk = first_chunk; chunk < end_chunk;) {
        if (!(vr_chunk_load(region, chunk) & VR_CHUNK_IN_FLIGHT)) {
            chunk++;
            continue;
        }
        if (vr_monotonic_ns() > deadline)
            return -ETIMEDOUT;
        vr_pause_briefly();
    }
    return 0;
}

int vr_pageout(uintptr_t address, size_t length)
{
    return madvise((void *)address, length, MADV_PAGEOUT) < 0 ? -errno : 0;
}
