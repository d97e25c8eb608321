/* The uffd backend's handler and regions: the handler's lifetime and its thread's event loop, the
 * table of registered regions, and the library calls on a region (register, close, resume,
 * populate, prefault, rebind after fork). A fault itself is followed in uffd_fault.c; the workers
 * are in uffd_workers.c. See uffd_backend.h for the whole.
 *
 * GIL: the handler thread never takes it (so it can always read the next event, including the one
 * from a thread that holds the GIL and is frozen in a fault). Workers take it only to run a Python
 * regenerator (vr_run_python_regenerator_unless_cancelled). Library calls run with the GIL released
 * (cffi).
 *
 * Lifetime: the handler lives as long as the process (it is never stopped: at interpreter exit a
 * thread may still fault, and a running handler serves it or fails it; process exit ends every
 * thread). A forked child gets a handler of its own. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "uffd_backend.h"
#include "userfaultfd.h"

#define EVENT_BATCH 16
#define VERDICT_POLL_MS 100

/* --- the handler ------------------------------------------------------------------------------------ */

int vr_uffd_handler_new(int signal_number, vr_uffd_handler **out)
{
    vr_uffd_handler *handler = calloc(1, sizeof *handler);
    if (!handler)
        return -ENOMEM;
    handler->uffd = handler->wake_fd = -1;
    handler->signal_number = signal_number;
    handler->page_size = (size_t)sysconf(_SC_PAGESIZE);
    handler->run_job = vr_uffd_run_job_on_worker;
    int rc = vr_userfaultfd_open_syscall(O_CLOEXEC | O_NONBLOCK, &handler->uffd);
    if (rc < 0)
        rc = vr_userfaultfd_open_dev(O_CLOEXEC | O_NONBLOCK, &handler->uffd);
    if (rc < 0)
        goto fail;
    uint64_t ioctls;
    rc = vr_userfaultfd_api(handler->uffd, UFFD_FEATURE_THREAD_ID, &handler->features, &ioctls);
    if (rc < 0)
        goto fail;
    handler->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (handler->wake_fd < 0) {
        rc = -errno;
        goto fail;
    }
    pthread_mutex_init(&handler->lock, NULL);
    pthread_cond_init(&handler->work_ready, NULL);
    handler->gil_wait_limit_ms = VR_GIL_WAIT_LIMIT_MS;
    const char *limit = getenv("VRANGE_GIL_WAIT_LIMIT_MS"); /* for tests; read once, here */
    if (limit && atoi(limit) > 0)
        handler->gil_wait_limit_ms = atoi(limit);
    *out = handler;
    return 0;
fail:
    if (handler->uffd >= 0)
        close(handler->uffd);
    free(handler);
    return rc;
}

static void *handler_main(void *arg)
{
    vr_uffd_handler *handler = arg;
    /* This thread must never run our signal handler (it is not a faulting thread). */
    vr_uffd_set_fault_signal_mask(handler, SIG_BLOCK);

    for (;;) {
        struct pollfd fds[2] = { { .fd = handler->uffd, .events = POLLIN },
                                 { .fd = handler->wake_fd, .events = POLLIN } };
        pthread_mutex_lock(&handler->lock);
        int timeout = handler->signalled || handler->gil_waiting ? VERDICT_POLL_MS : -1;
        pthread_mutex_unlock(&handler->lock);
        if (poll(fds, 2, timeout) < 0)
            continue; /* EINTR; nothing else can fail with valid descriptors */
        if (fds[1].revents & POLLIN) {
            uint64_t count;
            (void)!read(handler->wake_fd, &count, sizeof count);
        }
        vr_uffd_collect_verdicts(handler);
        if (!(fds[0].revents & POLLIN))
            continue;
        struct uffd_msg messages[EVENT_BATCH];
        ssize_t n = read(handler->uffd, messages, sizeof messages);
        if (n <= 0)
            continue; /* EAGAIN: a spurious wake-up */
        for (size_t i = 0; i < (size_t)n / sizeof messages[0]; i++) {
            if (messages[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            vr_uffd_handle_pagefault(handler, (uintptr_t)messages[i].arg.pagefault.address,
                                     (pid_t)messages[i].arg.pagefault.feat.ptid);
        }
    }
    return NULL;
}

int vr_uffd_handler_start(vr_uffd_handler *handler)
{
    int rc = vr_uffd_fault_signal_install(handler->signal_number, 0);
    if (rc < 0)
        return rc;
    rc = pthread_create(&handler->thread, NULL, handler_main, handler);
    if (rc != 0)
        return -rc;
    pthread_detach(handler->thread);
    return 0;
}

/* 1 if the fault signal still reaches our handler; 0 if other code replaced it (re-install). */
int vr_uffd_handler_signal_is_ours(vr_uffd_handler *handler)
{
    return vr_uffd_fault_signal_is_ours(handler->signal_number);
}

void vr_uffd_handler_free(vr_uffd_handler *handler)
{
    close(handler->uffd);
    close(handler->wake_fd);
    free(handler->regions);
    free(handler->staging);
    free(handler);
}

/* --- regions ---------------------------------------------------------------------------------------- */

static int table_add(vr_uffd_handler *handler, vr_region *region)
{
    pthread_mutex_lock(&handler->lock);
    int rc = vr_region_list_append(&handler->regions, &handler->region_count,
                                   &handler->region_capacity, region);
    pthread_mutex_unlock(&handler->lock);
    return rc;
}

static void table_remove(vr_uffd_handler *handler, vr_region *region)
{
    pthread_mutex_lock(&handler->lock);
    int found = vr_region_list_remove(handler->regions, &handler->region_count, region);
    pthread_mutex_unlock(&handler->lock);
    if (found)
        vr_region_unref(region);
}

/* After vrange purged a chunk (vr_region_purge_chunk): a fault that arrived while the purge held the
 * chunk was left asleep; wake it, so it faults again and is served. */
static void wake_after_purge(vr_region *region, size_t chunk)
{
    vr_userfaultfd_wake(region->handler->uffd, vr_chunk_address(region, chunk),
                        vr_region_chunk_length(region, chunk));
}

int vr_uffd_register(vr_region *region)
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

/* Called after Python unmapped the region (mmap.close succeeded): drop it from the table and wake
 * anyone still waiting on it (they re-fault on an unmapped address: SIGSEGV, as for any closed
 * mapping, never a hang). Jobs in flight keep the struct alive until they finish; Python keeps its
 * reference (and the handle the jobs call back with) until vr_region_references says 1. */
int vr_uffd_close(vr_region *region)
{
    vr_uffd_handler *handler = region->handler;
    __atomic_store_n(&region->closing, VR_CLOSED, __ATOMIC_RELEASE);
    table_remove(handler, region);
    vr_userfaultfd_wake(handler->uffd, region->base, region->size);
    return 0;
}

/* close() found the region still exported: open it again and wake the faults set aside. */
int vr_uffd_resume(vr_region *region)
{
    /* Threads found not to hold the GIL while it closed may hold it at the next close(). */
    pthread_mutex_lock(&region->handler->lock);
    memset(region->gil_free_waiters, 0, region->chunk_count * sizeof *region->gil_free_waiters);
    pthread_mutex_unlock(&region->handler->lock);
    __atomic_store_n(&region->closing, VR_OPEN, __ATOMIC_RELEASE);
    vr_userfaultfd_wake(region->handler->uffd, region->base, region->size);
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

int vr_uffd_populate(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    return populate_range(region, first_chunk, end_chunk, MADV_POPULATE_WRITE);
}

/* Make missing pages present without dirtying lazy-free ones (they stay discardable). */
int vr_uffd_prefault(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    return populate_range(region, first_chunk, end_chunk, MADV_POPULATE_READ);
}

/* In a forked child: the child's mapping is not registered (no UFFD_FEATURE_EVENT_FORK) and the
 * parent's threads are gone. Register it with the child's own handler; jobs that were in flight in
 * the parent will never finish here, so their chunks are simply missing-or-present again. */
int vr_uffd_rebind_after_fork(vr_region *region, vr_uffd_handler *handler)
{
    for (size_t chunk = 0; chunk < region->chunk_count; chunk++)
        vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
    region->handler = handler;
    region->refcount = 1;
    region->registered = 0;
    return vr_uffd_register(region);
}
