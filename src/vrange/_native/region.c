/* Region state shared by both backends: creation, references, chunk bookkeeping, native fills,
 * introspection. Called from Python with the GIL released (cffi); vr_fill_native also runs on the
 * uffd handler thread and inside signal handlers: it uses only syscalls and memory it is handed. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "region.h"

size_t vr_region_chunk_length(const vr_region *region, size_t chunk_index)
{
    size_t start = chunk_index * region->chunk_size;
    size_t rest = region->size - start;
    return rest < region->chunk_size ? rest : region->chunk_size;
}

void vr_region_ref(vr_region *region)
{
    __atomic_fetch_add(&region->refcount, 1, __ATOMIC_RELAXED);
}

void vr_region_unref(vr_region *region)
{
    if (__atomic_sub_fetch(&region->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        free(region->chunk_state);
        free(region->owners);
        free(region->gil_free_waiters);
        free(region);
    }
}

int vr_region_new(vr_handler *handler, uintptr_t base, size_t size, size_t chunk_size,
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
    if (!region->chunk_state || !region->owners || !region->gil_free_waiters) {
        free(region->chunk_state);
        free(region->owners);
        free(region->gil_free_waiters);
        free(region);
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
    region->refcount = 1; /* the caller's (Python's) reference, dropped by vr_region_release */
    region->handler = handler;
    region->trap_fd = -1;
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
        if (n == 0) { /* past the end of the file: the region's bytes there are zeros */
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

void vr_pause_briefly(void)
{
    struct timespec step = { .tv_sec = 0, .tv_nsec = 50000 };
    nanosleep(&step, NULL);
}

static int64_t monotonic_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
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
    int64_t deadline = monotonic_ms() + timeout_ms;
    for (size_t chunk = 0; chunk < region->chunk_count;) {
        if (!(vr_chunk_load(region, chunk) & VR_CHUNK_IN_FLIGHT)) {
            chunk++;
            continue;
        }
        if (monotonic_ms() > deadline) {
            __atomic_store_n(&region->closing, VR_OPEN, __ATOMIC_RELEASE);
            return -ETIMEDOUT;
        }
        vr_pause_briefly();
    }
    return 0;
}

void vr_region_set_volatile(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++)
        vr_chunk_set(region, chunk, VR_CHUNK_VOLATILE);
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
}

