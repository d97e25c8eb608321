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

#include "clock.h"
#include "uffd_backend.h"
#include "userfaultfd.h"

#define EVENT_BATCH 16
#define VERDICT_POLL_MS 100
/* How often remembered faults of a chunk's own regenerating thread are looked at again. */
#define SELF_FAULT_POLL_MS 1

/* After serving an event the handler thread keeps looking for the next one, without sleeping, for
 * this long (microseconds; $VRANGE_UFFD_SPIN_US, read once per handler, 0 turns it off). A thread
 * walking through missing memory faults again within microseconds, and an event found by a thread
 * that is awake costs no cross-CPU wake-up of the handler: on the project's 2-vCPU VM that wake-up
 * is most of a 4 KiB fault (docs/benchmarks.md). The spin is bounded, so an idle process costs
 * nothing; while it lasts it uses the CPU the handler runs on. */
#define DEFAULT_SPIN_US 50

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
    handler->drain_page = vr_drain_page_new(handler->page_size);
    if (!handler->drain_page) {
        rc = -errno;
        goto fail;
    }
    handler->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (handler->wake_fd < 0) {
        rc = -errno;
        goto fail;
    }
    pthread_mutex_init(&handler->lock, NULL);
    pthread_cond_init(&handler->work_ready, NULL);
    handler->gil_wait_limit_ms = VR_GIL_WAIT_LIMIT_MS;
    handler->spin_ns = (int64_t)DEFAULT_SPIN_US * 1000;
    const char *spin = getenv("VRANGE_UFFD_SPIN_US"); /* for benchmarks; read once, here */
    if (spin && *spin)
        handler->spin_ns = atoi(spin) > 0 ? (int64_t)atoi(spin) * 1000 : 0;
    const char *limit = getenv("VRANGE_GIL_WAIT_LIMIT_MS"); /* for tests; read once, here */
    if (limit && atoi(limit) > 0)
        handler->gil_wait_limit_ms = atoi(limit);
    *out = handler;
    return 0;
fail:
    if (handler->uffd >= 0)
        close(handler->uffd);
    if (handler->drain_page)
        munmap(handler->drain_page, handler->page_size);
    free(handler);
    return rc;
}

/* Put the pages this thread's CPU filled last on the LRU lists now (see vr_drain_cpu_lru in
 * region.c for why):
 *  - a worker, a fault signal handler or a library call drains right after its fill, before it
 *    wakes anyone (uffd_fault.c, resolve_run): these fills ran a regenerator, beside which the drain
 *    is small;
 *  - the handler thread, whose native fills are the fast path, drains when it goes to sleep, and
 *    sooner when a mark_volatile asks (wait_for_handler_drain). */
void vr_uffd_drain_lru(vr_uffd_handler *handler)
{
    vr_drain_cpu_lru(handler->drain_page, handler->page_size);
}

/* The most a mark_volatile waits for the handler thread's drain: the thread drains at its next loop
 * (microseconds) unless a regeneration or the scheduler holds it up; the wait never blocks for ever. */
#define DRAIN_WAIT_NS (2 * 1000 * 1000)

/* Before a range is marked volatile (MADV_FREE): if the handler thread filled pages since its last
 * drain, ask it to drain now and wait, bounded, until it has (see vr_uffd_drain_lru). Called by
 * vr_region_mark_volatile on the caller's thread, without the GIL (cffi releases it), possibly in a
 * regenerator inside a fault signal handler: only atomics, clock_gettime and nanosleep, all
 * async-signal-safe. `undrained` is set before the handler fills anything it read, and a woken
 * thread runs after the fill, so a thread marking pages the handler filled for it sees it set. */
static void wait_for_handler_drain(vr_region *region)
{
    vr_uffd_handler *handler = region->handler;
    if (!handler || !__atomic_load_n(&handler->undrained, __ATOMIC_SEQ_CST))
        return;
    __atomic_store_n(&handler->drain_wanted, 1, __ATOMIC_SEQ_CST);
    int64_t deadline = vr_monotonic_ns() + DRAIN_WAIT_NS;
    /* Short sleeps, not sched_yield: on a busy CPU one yield may give away a whole time slice
     * (a fault-injection run measured waits of 8 ms at p99 with it), past the bound. */
    while (__atomic_load_n(&handler->undrained, __ATOMIC_SEQ_CST) && vr_monotonic_ns() < deadline)
        vr_pause_briefly();
}

/* Drain (vr_uffd_drain_lru) if pages were filled since the last drain and the thread is going to
 * sleep (`sleeping`) or a mark_volatile waits for it. */
static void drain_if_due(vr_uffd_handler *handler, int sleeping)
{
    if (!__atomic_load_n(&handler->undrained, __ATOMIC_SEQ_CST))
        return;
    if (!sleeping && !__atomic_load_n(&handler->drain_wanted, __ATOMIC_SEQ_CST))
        return;
    vr_uffd_drain_lru(handler);
    __atomic_store_n(&handler->drain_wanted, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&handler->undrained, 0, __ATOMIC_SEQ_CST);
}

static void *handler_main(void *arg)
{
    vr_uffd_handler *handler = arg;
    /* This thread must never run our signal handler (it is not a faulting thread). */
    vr_uffd_set_fault_signal_mask(handler, SIG_BLOCK);

    int64_t spin_until = 0; /* looking for events without sleeping until then (see DEFAULT_SPIN_US) */
    for (;;) {
        struct pollfd fds[2] = { { .fd = handler->uffd, .events = POLLIN },
                                 { .fd = handler->wake_fd, .events = POLLIN } };
        int timeout = 0;
        drain_if_due(handler, !spin_until);
        if (!spin_until) {
            pthread_mutex_lock(&handler->lock);
            timeout = handler->signalled || handler->gil_waiting ? VERDICT_POLL_MS : -1;
            if (handler->self_fault_count)
                timeout = SELF_FAULT_POLL_MS;
            pthread_mutex_unlock(&handler->lock);
        }
        int ready = poll(fds, 2, timeout);
        if (ready < 0)
            continue; /* EINTR; nothing else can fail with valid descriptors */
        if (ready == 0 && spin_until) {
            if (vr_monotonic_ns() >= spin_until)
                spin_until = 0; /* nothing came: sleep in poll() again */
            else
                vr_cpu_relax();
            continue;
        }
        if (fds[1].revents & POLLIN) {
            uint64_t count;
            (void)!read(handler->wake_fd, &count, sizeof count);
        }
        vr_uffd_collect_verdicts(handler);
        if (handler->self_fault_count)
            vr_uffd_recheck_self_faults(handler);
        if (!(fds[0].revents & POLLIN))
            continue;
        struct uffd_msg messages[EVENT_BATCH];
        ssize_t n = read(handler->uffd, messages, sizeof messages);
        if (n <= 0)
            continue; /* EAGAIN: a spurious wake-up */
        __atomic_store_n(&handler->undrained, 1, __ATOMIC_SEQ_CST); /* before any fill */
        for (size_t i = 0; i < (size_t)n / sizeof messages[0]; i++) {
            if (messages[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            vr_uffd_handle_pagefault(handler, (uintptr_t)messages[i].arg.pagefault.address,
                                     (pid_t)messages[i].arg.pagefault.feat.ptid);
        }
        if (handler->spin_ns)
            spin_until = vr_monotonic_ns() + handler->spin_ns;
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
    if (handler->drain_page)
        munmap(handler->drain_page, handler->page_size);
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
    region->before_lazy_free = wait_for_handler_drain;
    region->kernel_reclaims = 1;
    if (!region->drain_page) /* kept across a rebind after fork */
        region->drain_page = vr_drain_page_new(region->page_size);
    if (!region->drain_page)
        return -errno;
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

#define MINCORE_PAGES 256 /* pages per mincore call: a bounded stack whatever the range */

/* Fault the page at `address` in from inside a system call: one byte of it goes through a pipe. The
 * handler sees a fault inside a syscall and never signals this thread; a chunk whose refill failed
 * by the poison policy makes the write fail with EFAULT instead of raising SIGBUS here. */
static int fault_in_from_syscall(const int pipe_fds[2], uintptr_t address)
{
    for (;;) {
        ssize_t written = write(pipe_fds[1], (const void *)address, 1);
        if (written == 1) {
            char sink;
            while (read(pipe_fds[0], &sink, 1) < 0 && errno == EINTR)
                ;
            return 0;
        }
        if (written < 0 && errno == EINTR)
            continue;
        return written < 0 ? -errno : -EIO;
    }
}

/* Linux < 5.14 has no MADV_POPULATE_READ/WRITE: do what they do, page by page.
 *
 * 1. Every page mincore reports missing is faulted in from inside a system call
 *    (fault_in_from_syscall): the handler resolves the fault as for any syscall (a worker takes the
 *    GIL for a Python regenerator; the caller released it, cffi), resolving the whole chunk at once.
 *    A failed refill comes back as -EFAULT (poison policy; 'abort' aborts, as it does under
 *    MADV_POPULATE_WRITE), and then nothing is dirtied.
 * 2. With `dirty`, every page is dirtied with an atomic no-op write (vr_dirty_page): a page refilled
 *    in step 1 is dirty already (UFFDIO_COPY installs dirty pages, and the chunks being pinned are no
 *    longer VOLATILE, so no refill makes them lazy-free again: vr_region_keep_volatile); a present
 *    lazy-free page becomes dirty and reclaim keeps it from then on.
 *
 * The race: reclaim may take a present lazy-free page between step 1's mincore and step 2's write.
 * The write then faults in user mode, on this thread, without the GIL: the handler signals it, the
 * signal handler finds the GIL not held and answers "not mine", and a worker (or the handler thread,
 * for a native source) refills the chunk; the write restarts on the refilled page. Only if that
 * refill fails is the outcome a failed raw access (the region's on_error policy: SIGBUS under
 * 'poison') instead of an error returned: the same regenerator succeeded for that chunk earlier. */
static int populate_by_touching(vr_region *region, uintptr_t start, size_t length, int dirty)
{
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) < 0)
        return -errno;
    unsigned char vector[MINCORE_PAGES];
    size_t batch_bytes = MINCORE_PAGES * region->page_size;
    int rc = 0;
    for (size_t done = 0; done < length && rc == 0; done += batch_bytes) {
        size_t part = length - done < batch_bytes ? length - done : batch_bytes;
        if (mincore((void *)(start + done), part, vector) < 0) {
            rc = -errno;
            break;
        }
        for (size_t page = 0; page < part / region->page_size && rc == 0; page++) {
            uintptr_t address = start + done + page * region->page_size;
            /* A page of a chunk another page of which was just refilled is present by now: the
             * handler fills the whole chunk. */
            if ((vector[page] & 1) || vr_region_page_present(region, address))
                continue;
            if (region->on_error == VR_ON_ERROR_ABORT) {
                /* Regenerate it here, so that a failure raises rather than aborts. */
                rc = vr_uffd_regenerate_for_call(region, (address - region->base) /
                                                             region->chunk_size);
                if (rc != 0)
                    rc = rc > 0 ? 0 : rc;
                else /* in flight for another thread's fault: wait for it like a fault */
                    rc = fault_in_from_syscall(pipe_fds, address);
            } else {
                rc = fault_in_from_syscall(pipe_fds, address);
            }
        }
    }
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    if (rc < 0 || !dirty)
        return rc;
    size_t first_chunk = (start - region->base) / region->chunk_size;
    size_t end_chunk = (start + length - region->base + region->chunk_size - 1) / region->chunk_size;
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++)
        if (vr_chunk_load(region, chunk) & (VR_CHUNK_POISONED | VR_CHUNK_FAILED))
            return -EFAULT; /* a poison marker would raise SIGBUS on the write below */
    for (size_t offset = 0; offset < length; offset += region->page_size)
        vr_dirty_page(start + offset);
    return 0;
}

/* Make every page of the range present, and with MADV_POPULATE_WRITE dirty too (so no longer
 * discardable): lazy-free pages are re-dirtied, missing ones fault through the handler. The caller
 * does not hold the GIL (cffi), so Python regenerators can run on a worker while this waits. Where
 * the kernel rejects the advice (EINVAL: Linux < 5.14), the pages are touched instead. */
static int populate_range(vr_region *region, size_t first_chunk, size_t end_chunk, int advice)
{
    uintptr_t start;
    size_t length;
    vr_region_span(region, first_chunk, end_chunk, &start, &length);
    /* Under 'abort' a regeneration failing inside madvise could only abort the process: make the
     * pages present page by page, regenerating missing chunks on this thread (so the call raises). */
    if (region->on_error == VR_ON_ERROR_ABORT)
        return populate_by_touching(region, start, length, advice == MADV_POPULATE_WRITE);
    while (madvise((void *)start, length, advice) < 0) {
        if (errno == EINVAL)
            return populate_by_touching(region, start, length, advice == MADV_POPULATE_WRITE);
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
