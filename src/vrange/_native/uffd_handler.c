/* The fault handler of the uffd backend: one userfaultfd, one C thread reading it, and a pool of
 * worker threads for Python regenerators. See uffd_backend.h for the routing of a fault.
 *
 * GIL: the handler thread never takes it (so it can always read the next event, including the one
 * from a thread that holds the GIL and is frozen in a fault). Workers take it only inside
 * vr_python_regenerate (cffi's extern "Python" wrapper does PyGILState_Ensure).
 *
 * Lifetime: the handler lives as long as the process (it is never stopped: at interpreter exit a
 * thread may still fault, and a running handler serves it or fails it; process exit ends every
 * thread). A forked child gets a handler of its own. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "python_regenerator.h"
#include "uffd_backend.h"

#define EVENT_BATCH 16
/* A regeneration job whose signal was not picked up in this time goes to a worker (the signal was
 * lost: its disposition was changed behind our back). */
#define SIGNAL_PICKUP_TIMEOUT_MS 1000
#define VERDICT_POLL_MS 100

int vr_handler_new(int signal_number, vr_handler **out)
{
    vr_handler *handler = calloc(1, sizeof *handler);
    if (!handler)
        return -ENOMEM;
    handler->uffd = handler->wake_fd = -1;
    handler->signal_number = signal_number;
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

static void notify(vr_handler *handler)
{
    uint64_t one = 1;
    /* An eventfd write only fails if the counter would overflow: it is then readable anyway. */
    (void)!write(handler->wake_fd, &one, sizeof one);
}

/* The signal handler's way to tell the handler thread a verdict is ready (async-signal-safe). */
void vr_handler_notify_verdict(vr_handler *handler) { notify(handler); }

static void set_fault_signal_mask(const vr_handler *handler, int how)
{
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, handler->signal_number);
    pthread_sigmask(how, &mask, NULL);
}

/* --- where is the faulting thread? ------------------------------------------------------------ */

static ssize_t read_proc_task_file(pid_t tid, const char *name, char *buffer, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/%s", (int)tid, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buffer, size - 1);
    close(fd);
    if (n >= 0)
        buffer[n] = '\0';
    return n;
}

/* True if the thread is stopped in a user-mode access (not in a syscall) and does not block our
 * signal: only then may a signal be sent. A signal interrupting a fault taken inside a syscall
 * would make that syscall fail with EFAULT or a short count. */
/* The fault signal must reach vrange's handler: other code may have replaced it since the handler
 * started (signal.signal, a library). Checked where a fault is routed: take the signal back (the
 * replacement still gets its own signals, chained) and say so once. 0 if it cannot be taken back:
 * the fault then goes to a worker. */
static int fault_signal_ready(vr_handler *handler)
{
    if (vr_fault_signal_is_ours(handler->signal_number) == 1)
        return 1;
    if (vr_fault_signal_install(handler->signal_number, 1) < 0)
        return 0;
    if (!__atomic_exchange_n(&handler->signal_retaken, 1, __ATOMIC_ACQ_REL)) {
        static const char message[] =
            "vrange: other code replaced the handler of vrange's fault signal (SIGRTMIN+6); vrange "
            "put its own back in front, and passes the other code's signals on to it\n";
        (void)!write(STDERR_FILENO, message, sizeof message - 1);
    }
    return 1;
}

static int can_signal_thread(vr_handler *handler, pid_t tid, vr_job *job)
{
    char text[512];
    if (!fault_signal_ready(handler))
        return 0;
    if (tid <= 0 || read_proc_task_file(tid, "syscall", text, sizeof text) <= 0)
        return 0;
    if (strncmp(text, "-1 ", 3) != 0)
        return 0; /* a syscall number, or "running": not a user-mode fault */
    /* "-1 <user sp> <user pc>": the signal handler checks it interrupted the thread right there. */
    char *end = NULL;
    job->user_sp = strtoull(text + 3, &end, 16);
    job->user_pc = strtoull(end, NULL, 16);
    /* And blocked in a userfault right now: the event may be stale (the thread was woken and has
     * moved on), and a signal must never land in arbitrary code (it may hold the GIL's mutex). */
    if (read_proc_task_file(tid, "wchan", text, sizeof text) <= 0 ||
        strcmp(text, "handle_userfault") != 0)
        return 0;
    char status[4096];
    if (read_proc_task_file(tid, "status", status, sizeof status) <= 0)
        return 0;
    const char *blocked = strstr(status, "SigBlk:");
    if (!blocked)
        return 0;
    unsigned long long mask = strtoull(blocked + 7, NULL, 16);
    if (mask >> (handler->signal_number - 1) & 1) {
        job->watched = 1; /* it may hold the GIL, and the signal cannot reach it */
        return 0;
    }
    return 1;
}

/* --- jobs ----------------------------------------------------------------------------------------- */

static vr_job *job_new(vr_region *region, size_t chunk_index, pid_t tid, int kind)
{
    vr_job *job = calloc(1, sizeof *job);
    if (!job)
        return NULL;
    if (kind == VR_JOB_REGENERATE) {
        /* Zeroed: should a regenerator ever be reported as successful without filling it, the
         * region gets zeros rather than another allocation's leftovers. */
        job->buffer = calloc(1, region->chunk_size);
        if (!job->buffer) {
            free(job);
            return NULL;
        }
    }
    job->magic = VR_JOB_MAGIC;
    job->kind = kind;
    job->region = region;
    job->chunk_index = chunk_index;
    job->faulting_tid = tid;
    vr_region_ref(region);
    return job;
}

static void job_free(vr_job *job)
{
    job->magic = 0;
    vr_region_unref(job->region);
    free(job->buffer);
    free(job);
}

/* Run a Python regenerator for the job's chunk and resolve the fault (or fail it by policy).
 * On the faulting thread this runs inside the signal handler: see fault_signal.c. */
void vr_run_python_job(vr_job *job, int on_faulting_thread)
{
    vr_region *region = job->region;
    size_t length = vr_region_chunk_length(region, job->chunk_index);
    uint64_t offset = (uint64_t)job->chunk_index * region->chunk_size;
    uint64_t *counter = on_faulting_thread ? &region->stats.faults_on_faulting_thread
                                           : &region->stats.faults_on_worker_thread;
    __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    /* Remember who regenerates: if this regenerator faults on this very chunk, the handler fails
     * that fault instead of leaving it to wait for itself. */
    region->owners[job->chunk_index] = (pid_t)syscall(SYS_gettid);
    int rc;
    if (region->source_kind != VR_SOURCE_PYTHON)
        /* A helper process regenerates (no GIL, but it may take long, so a worker waits for it
         * rather than the handler thread, which must keep serving every other fault), or a native
         * source serves a GIL holder's fault while the region closes (serve_while_closing). */
        rc = vr_fill_native(region, job->chunk_index, job->buffer);
    else if (on_faulting_thread)
        rc = vr_run_python_regenerator(region, offset, job->buffer, length, 1);
    else
        rc = vr_run_python_regenerator_unless_cancelled(region, offset, job->buffer, length,
                                                        &job->state);
    region->owners[job->chunk_index] = 0;
    if (rc == -ECANCELED)
        return; /* the handler thread failed the fault by policy already */
    if (rc == 0)
        vr_resolve_chunk(region, job->chunk_index, job->buffer);
    else
        vr_fail_chunk(region, job->chunk_index);
}

/* Lock held: the job leaves the list of watched jobs (see cancel_gil_deadlocks). */
static void unwatch(vr_handler *handler, vr_job *job)
{
    if (!job->watched)
        return;
    for (vr_job **link = &handler->gil_waiting; *link; link = &(*link)->waiting_next)
        if (*link == job) {
            *link = job->waiting_next;
            return;
        }
}

static void *worker_main(void *arg)
{
    vr_handler *handler = arg;
    /* Created by the handler thread, a worker inherits its mask, which blocks the fault signal. A
     * worker holds the GIL while its regenerator runs; if that regenerator faults on a region, the
     * signal is the only way to serve it (no other thread can take the GIL): unblock it. */
    set_fault_signal_mask(handler, SIG_UNBLOCK);
    pthread_mutex_lock(&handler->lock);
    for (;;) {
        vr_job *job = handler->queue_head;
        if (!job) {
            handler->workers_idle++;
            while (handler->wakeups == 0)
                pthread_cond_wait(&handler->work_ready, &handler->lock);
            handler->wakeups--; /* the enqueuer already took us off the idle count */
            continue;
        }
        handler->queue_head = job->next;
        if (!handler->queue_head)
            handler->queue_tail = NULL;
        pthread_mutex_unlock(&handler->lock);
        vr_run_python_job(job, 0);
        pthread_mutex_lock(&handler->lock);
        unwatch(handler, job);
        job_free(job);
    }
    return NULL;
}

/* Called with the lock held. Every queued job gets a worker of its own (an idle one, reserved at
 * once, or a new one): a busy worker may be inside a regenerator whose syscall waits on this very
 * job (it touches another region), so a job must never wait behind a busy worker. */
static void queue_for_worker(vr_handler *handler, vr_job *job)
{
    job->next = NULL;
    job->queued_at_ms = vr_monotonic_ms();
    if (job->watched) {
        job->waiting_next = handler->gil_waiting;
        handler->gil_waiting = job;
    }
    if (handler->queue_tail)
        handler->queue_tail->next = job;
    else
        handler->queue_head = job;
    handler->queue_tail = job;
    if (handler->workers_idle > 0) {
        handler->workers_idle--;
        handler->wakeups++;
        pthread_cond_signal(&handler->work_ready);
        return;
    }
    if (handler->workers_total >= VR_MAX_WORKERS)
        return; /* all busy: the job waits for the first to finish */
    pthread_t thread;
    int rc = pthread_create(&thread, NULL, worker_main, handler);
    if (rc != 0) {
        if (handler->workers_total > 0)
            return; /* a busy worker will take it when done */
        /* No worker will ever take this job: fail its fault by policy rather than leave it. */
        static const char message[] =
            "vrange: cannot start a regenerator worker thread; the fault fails by policy\n";
        (void)!write(STDERR_FILENO, message, sizeof message - 1);
        handler->queue_head = handler->queue_tail = NULL; /* it is the only job queued */
        unwatch(handler, job);
        vr_fail_chunk(job->region, job->chunk_index);
        job_free(job);
        return;
    }
    pthread_detach(thread);
    handler->workers_total++;
}

/* Handler thread, lock held: a watched job whose worker has not got the GIL for VR_GIL_WAIT_LIMIT_MS
 * while its thread still waits in the fault is a deadlock in the making (that thread holds the GIL
 * and cannot be signalled): fail the fault by the region's policy, and let the worker skip the job
 * when it gets the GIL at last. */
static void cancel_gil_deadlocks(vr_handler *handler)
{
    int64_t now = vr_monotonic_ms();
    for (vr_job *job = handler->gil_waiting; job; job = job->waiting_next) {
        char wchan[64];
        if (__atomic_load_n(&job->state, __ATOMIC_ACQUIRE) != VR_JOB_QUEUED ||
            now - job->queued_at_ms < handler->gil_wait_limit_ms ||
            read_proc_task_file(job->faulting_tid, "wchan", wchan, sizeof wchan) <= 0 ||
            strcmp(wchan, "handle_userfault") != 0)
            continue;
        int queued = VR_JOB_QUEUED;
        if (!__atomic_compare_exchange_n(&job->state, &queued, VR_JOB_CANCELLED, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        static const char message[] =
            "vrange: a thread that blocks vrange's fault signal (SIGRTMIN+6) faulted on a region "
            "with a Python regenerator while holding the GIL: the regenerator cannot run, so the "
            "fault fails by the region's on_error policy (unblock the signal in that thread, or use "
            "a native or vrange.sources.Isolated regenerator)\n";
        (void)!write(STDERR_FILENO, message, sizeof message - 1);
        vr_fail_chunk(job->region, job->chunk_index);
    }
}

/* Handler thread: collect verdicts of signalled threads. "Not mine" goes to a worker, and so does a
 * regeneration whose signal was never picked up. */
static void collect_verdicts(vr_handler *handler)
{
    int64_t now = vr_monotonic_ms();
    pthread_mutex_lock(&handler->lock);
    cancel_gil_deadlocks(handler);
    vr_job **link = &handler->signalled;
    while (*link) {
        vr_job *job = *link;
        int verdict = __atomic_load_n(&job->verdict, __ATOMIC_ACQUIRE);
        if (verdict == VR_VERDICT_PENDING) {
            if (job->closing && now - job->signalled_at_ms > SIGNAL_PICKUP_TIMEOUT_MS &&
                !__atomic_exchange_n(&job->started, 1, __ATOMIC_ACQ_REL)) {
                /* Never picked up while closing: let the claim go, so close() can go on (the job
                 * stays listed for the late signal, which then finds it started and does nothing). */
                vr_chunk_clear(job->region, job->chunk_index, VR_CHUNK_IN_FLIGHT);
            } else if (job->kind == VR_JOB_REGENERATE && !job->closing &&
                       !__atomic_load_n(&job->started, __ATOMIC_ACQUIRE) &&
                       now - job->signalled_at_ms > SIGNAL_PICKUP_TIMEOUT_MS) {
                /* The job stays listed (the signal may still arrive and use it); a copy goes to a
                 * worker. Both may regenerate; UFFDIO_COPY never overwrites, so that is safe. */
                vr_job *copy = job_new(job->region, job->chunk_index, job->faulting_tid,
                                       VR_JOB_REGENERATE);
                if (copy) {
                    __atomic_store_n(&job->started, 1, __ATOMIC_RELEASE); /* requeue only once */
                    queue_for_worker(handler, copy);
                }
            }
            link = &job->next;
            continue;
        }
        *link = job->next;
        if (verdict == VR_VERDICT_DONE) {
            job_free(job);
        } else if (job->closing) {
            /* Not a GIL holder: it may sleep in the fault until close() unmaps or reopens. */
            if (verdict == VR_VERDICT_NOT_MINE)
                job->region->gil_free_waiters[job->chunk_index] = job->faulting_tid;
            vr_chunk_clear(job->region, job->chunk_index, VR_CHUNK_IN_FLIGHT);
            job_free(job);
        } else {
            /* This thread does not hold the GIL, and cannot take it while it stays in this fault:
             * when it faults again on the chunk (it will, right away), let it wait in the kernel. */
            job->region->gil_free_waiters[job->chunk_index] = job->faulting_tid;
            queue_for_worker(handler, job);
        }
    }
    pthread_mutex_unlock(&handler->lock);
}

/* Lock held. Two regions may contain the address: close() unmaps a region before it leaves this
 * table, and a region created meanwhile by another thread may take the same address at once. The
 * open one is then the mapping that faulted: serving the closing one would fill the new mapping with
 * the old region's bytes. */
static vr_region *find_region(vr_handler *handler, uintptr_t address)
{
    vr_region *closing = NULL;
    for (size_t i = 0; i < handler->region_count; i++) {
        vr_region *region = handler->regions[i];
        if (address < region->base || address >= region->base + region->size)
            continue;
        if (__atomic_load_n(&region->closing, __ATOMIC_ACQUIRE) == VR_OPEN)
            return region;
        if (!closing)
            closing = region;
    }
    return closing;
}

static int ensure_staging(vr_handler *handler, size_t size)
{
    if (handler->staging_size >= size)
        return 0;
    char *grown = realloc(handler->staging, size);
    if (!grown)
        return -ENOMEM;
    handler->staging = grown;
    handler->staging_size = size;
    return 0;
}

/* Called with the lock held: send the job to the faulting thread. 0 if sent. */
static int signal_job(vr_handler *handler, vr_job *job)
{
    job->next = handler->signalled;
    handler->signalled = job;
    job->signalled_at_ms = vr_monotonic_ms();
    siginfo_t info;
    memset(&info, 0, sizeof info);
    info.si_signo = handler->signal_number;
    info.si_code = SI_QUEUE;
    info.si_pid = getpid();
    info.si_uid = getuid();
    info.si_value.sival_ptr = job;
    if (syscall(SYS_rt_tgsigqueueinfo, getpid(), job->faulting_tid, handler->signal_number, &info)
        == 0)
        return 0;
    handler->signalled = job->next; /* the thread is gone or unreachable */
    return -1;
}

static void wake_page(vr_handler *handler, uintptr_t address)
{
    struct uffdio_range range = { .start = address & ~(uintptr_t)4095, .len = 4096 };
    (void)ioctl(handler->uffd, UFFDIO_WAKE, &range);
}

/* Lock held, the chunk claimed (IN_FLIGHT), the region closing: close() is waiting, without the GIL,
 * for refills to end, and then needs the GIL back. A thread that holds the GIL and is left asleep in
 * this fault would deadlock it; any other thread may sleep until the region is unmapped (its access
 * then raises SIGSEGV, as on any closed mapping) or opened again (close() raised BufferError), both
 * of which wake the whole range. Only the faulting thread can tell whether it holds the GIL: send it
 * a CLOSING job (served in its signal handler if it holds the GIL, "not mine" otherwise). A thread
 * that cannot be signalled and may hold the GIL (it blocks the signal) gets a worker, watched by
 * cancel_gil_deadlocks, as when the region is open. A thread faulting inside a syscall sleeps: a
 * syscall on region memory is made with the GIL released (vrange.io, os.write, numpy). */
static void serve_while_closing(vr_handler *handler, vr_region *region, size_t chunk, pid_t tid)
{
    if (region->gil_free_waiters[chunk] != tid) {
        vr_job *job = job_new(region, chunk, tid, VR_JOB_REGENERATE);
        if (job) {
            job->closing = 1;
            if (can_signal_thread(handler, tid, job) && signal_job(handler, job) == 0)
                return; /* collect_verdicts ends the claim if the thread does not hold the GIL */
            if (job->watched) {
                queue_for_worker(handler, job);
                return;
            }
            job_free(job);
        }
    }
    vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
}

static void handle_pagefault(vr_handler *handler, uintptr_t address, pid_t tid)
{
    pthread_mutex_lock(&handler->lock);
    vr_region *region = find_region(handler, address);
    if (!region) {
        pthread_mutex_unlock(&handler->lock);
        wake_page(handler, address); /* closed while this event was queued: it re-faults (SIGSEGV) */
        return;
    }
    size_t chunk = (address - region->base) / region->chunk_size;
    uint8_t state = vr_chunk_load(region, chunk);
    if (state & VR_CHUNK_IN_FLIGHT) {
        if (tid > 0 && region->owners[chunk] == tid) {
            /* The regenerator of this chunk reads the chunk itself: it would wait for ever. */
            vr_region_ref(region);
            pthread_mutex_unlock(&handler->lock);
            vr_fail_page(region, address);
            vr_region_unref(region);
            return;
        }
        /* Someone is regenerating this chunk; clearing IN_FLIGHT and then UFFDIO_WAKE wakes this
         * thread too. If it may hold the GIL (a user-mode access), it must not wait in the kernel:
         * the regenerator may need the GIL. Ask it to wait in its signal handler without it. */
        if (region->source_kind == VR_SOURCE_PYTHON && region->gil_free_waiters[chunk] != tid) {
            vr_job *wait = job_new(region, chunk, tid, VR_JOB_WAIT);
            if (wait && !(can_signal_thread(handler, tid, wait) && signal_job(handler, wait) == 0))
                job_free(wait);
        }
        pthread_mutex_unlock(&handler->lock);
        return;
    }
    if ((state & VR_CHUNK_MATERIALIZED) && vr_region_page_present(region, address)) {
        /* A stale event: the page was filled after this fault was queued (two threads touched it
         * at once). Nothing was purged; just wake the thread. */
        pthread_mutex_unlock(&handler->lock);
        wake_page(handler, address);
        return;
    }
    /* Claim the chunk. Faults set IN_FLIGHT only here, under the lock; a purge (vrange's own, from
     * another thread) may hold it: then leave this thread asleep, the purge wakes the chunk when it
     * lets go (uffd_region.c, wake_after_purge) and the access faults again. */
    if (vr_chunk_set(region, chunk, VR_CHUNK_IN_FLIGHT) & VR_CHUNK_IN_FLIGHT) {
        pthread_mutex_unlock(&handler->lock);
        return;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* pairs with vr_region_quiesce */
    if (__atomic_load_n(&region->closing, __ATOMIC_SEQ_CST) != VR_OPEN) {
        serve_while_closing(handler, region, chunk, tid);
        pthread_mutex_unlock(&handler->lock);
        return;
    }
    vr_region_note_discard_found(region, chunk); /* filled before: the kernel or a purge took it */
    vr_region_ref(region);
    if (region->source_kind == VR_SOURCE_ISOLATED) {
        vr_job *job = job_new(region, chunk, tid, VR_JOB_REGENERATE);
        vr_region_unref(region); /* the job holds its own reference */
        if (job)
            queue_for_worker(handler, job);
        pthread_mutex_unlock(&handler->lock);
        if (!job)
            vr_fail_chunk(region, chunk);
        return;
    }
    if (region->source_kind != VR_SOURCE_PYTHON) {
        pthread_mutex_unlock(&handler->lock);
        vr_stat_add(&region->stats.faults_on_handler_thread, 1);
        if (ensure_staging(handler, region->chunk_size) == 0 &&
            vr_fill_native(region, chunk, handler->staging) == 0)
            vr_resolve_chunk(region, chunk, handler->staging);
        else
            vr_fail_chunk(region, chunk);
        vr_region_unref(region);
        return;
    }
    vr_job *job = job_new(region, chunk, tid, VR_JOB_REGENERATE);
    if (!job) {
        pthread_mutex_unlock(&handler->lock);
        vr_fail_chunk(region, chunk);
        vr_region_unref(region);
        return;
    }
    vr_region_unref(region); /* the job holds its own reference */
    if (!(can_signal_thread(handler, tid, job) && signal_job(handler, job) == 0))
        queue_for_worker(handler, job);
    pthread_mutex_unlock(&handler->lock);
}

static void *handler_main(void *arg)
{
    vr_handler *handler = arg;
    /* This thread must never run our signal handler (it is not a faulting thread). */
    set_fault_signal_mask(handler, SIG_BLOCK);

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
        collect_verdicts(handler);
        if (!(fds[0].revents & POLLIN))
            continue;
        struct uffd_msg messages[EVENT_BATCH];
        ssize_t n = read(handler->uffd, messages, sizeof messages);
        if (n <= 0)
            continue; /* EAGAIN: a spurious wake-up */
        for (size_t i = 0; i < (size_t)n / sizeof messages[0]; i++) {
            if (messages[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            handle_pagefault(handler, (uintptr_t)messages[i].arg.pagefault.address,
                             (pid_t)messages[i].arg.pagefault.feat.ptid);
        }
    }
    return NULL;
}

int vr_handler_start(vr_handler *handler)
{
    int rc = vr_fault_signal_install(handler->signal_number, 0);
    if (rc < 0)
        return rc;
    rc = pthread_create(&handler->thread, NULL, handler_main, handler);
    if (rc != 0)
        return -rc;
    pthread_detach(handler->thread);
    return 0;
}

/* 1 if the fault signal still reaches our handler; 0 if other code replaced it (re-install). */
int vr_handler_signal_is_ours(vr_handler *handler)
{
    return vr_fault_signal_is_ours(handler->signal_number);
}

void vr_handler_free(vr_handler *handler)
{
    close(handler->uffd);
    close(handler->wake_fd);
    free(handler->regions);
    free(handler->staging);
    free(handler);
}
