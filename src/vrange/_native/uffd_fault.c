/* The uffd backend's fault path, from the event to the resolved fault: one file to follow a fault.
 *
 * The handler thread (uffd_handler.c) reads each page-fault event and calls vr_uffd_handle_pagefault:
 *   - a native source: regenerated on the handler thread itself, without the GIL;
 *   - an isolated source (a helper process, which may be slow): a job for a worker;
 *   - a Python regenerator: a job. If the faulting thread is stopped in a user-mode access
 *     (/proc/self/task/<tid>/syscall says -1), it is sent the fault signal carrying the job; the
 *     signal handler (fault_signal_handler, below) runs on the faulting thread and, if that thread
 *     holds the GIL, runs the regenerator right there; otherwise it answers "not mine". A fault inside
 *     a syscall, a "not mine", a thread that blocks the signal: the job goes to a worker
 *     (uffd_workers.c), which takes the GIL and runs it through vr_uffd_run_job_on_worker;
 *   - a chunk already being regenerated: the fault waits for that job; a thread that may hold the GIL
 *     waits in its signal handler with the GIL released (a WAIT job) instead of in the kernel.
 * Verdicts of signalled threads come back through vr_uffd_collect_verdicts, on the handler thread.
 * Every route ends in resolve_chunk (UFFDIO_COPY, then wake) or fail_chunk (the region's error
 * policy, then wake).
 *
 * Why running Python in the signal handler is tolerable: the interrupted instruction is a load or
 * store on a vrange region (a memcpy, a numpy inner loop, a bytes() copy), not code inside the
 * allocator or the interpreter's internals holding their locks, so re-entering the interpreter is
 * like a callback from that loop (interrupted_at_fault checks the exact pc and sp). This stops being
 * safe if vrange memory ever backs interpreter internals (do not put Python objects in a region).
 * SA_NODEFER lets a regenerator that itself faults on a region be served the same way (nested).
 *
 * Async-signal-safety: resolve_chunk, fail_chunk and everything they call use only syscalls, atomics
 * and memory the caller owns, because they also run inside the signal handler. The handler thread
 * never takes the GIL and never blocks on anything but poll() and the handler's lock. */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* defines _GNU_SOURCE */

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include "pressure.h"
#include "python_regenerator.h"
#include "signal_chain.h"
#include "uffd_backend.h"
#include "userfaultfd.h"

/* A regeneration job whose signal was not picked up in this time goes to a worker (the signal was
 * lost: its disposition was changed behind our back). */
#define SIGNAL_PICKUP_TIMEOUT_MS 1000

/* Chunks filled ahead of a fault are copied and woken in runs of about this many bytes. */
#define AHEAD_STEP_BYTES (1024 * 1024)

static void let_go_ahead(vr_region *region, size_t first, size_t end);

/* --- resolving a chunk --------------------------------------------------------------------------- */

static int fill_missing_pages(const vr_region *region, uintptr_t start, size_t length,
                              const char *source, enum vr_fill_kind kind)
{
    return vr_userfaultfd_fill_missing(region->handler->uffd, region->page_size, start, length,
                                       source, kind);
}

/* Wake the threads waiting in a fault on the range (they restart their access). */
static void wake_range(const vr_region *region, uintptr_t start, size_t length)
{
    vr_userfaultfd_wake(region->handler->uffd, start, length);
}

/* Wake the thread waiting on the page of `address`, when no region is known (closed meanwhile), or
 * nothing was to fill. */
static void wake_page(vr_uffd_handler *handler, uintptr_t address)
{
    vr_userfaultfd_wake(handler->uffd, address & ~(uintptr_t)(handler->page_size - 1),
                        handler->page_size);
}

/* Regeneration failed: fill the range's missing pages by the region's on_error policy (zeros, or
 * poison markers: an access then raises SIGBUS, a syscall EFAULT), or abort. Never wrong bytes. */
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
        /* Without UFFDIO_POISON (Linux < 6.6: EINVAL) the access would fault again for ever; the
         * Region refuses 'poison' there, so this is a kernel that lost it (a seccomp profile). */
        if (fill_missing_pages(region, start, length, NULL, VR_FILL_POISON) == -EINVAL)
            vr_abort_for_policy();
        break;
    default:
        vr_abort_for_policy();
    }
}

/* Resolve chunks [first, end), claimed (IN_FLIGHT) by the caller, with their regenerated bytes
 * `source` (NULL: zeros, for the Zeros source): copy them into the missing pages, let the chunks go
 * and wake every thread waiting on them. 0 or the copy's -errno. A failed copy of a faulting chunk
 * (`ahead_counter` NULL) is answered by the region's policy (or the access would refault for ever);
 * chunks filled ahead are just let go (a thread that touches them faults as usual), and counted as
 * served in `ahead_counter` (the counter of the fault that filled them) when filled. */
static int resolve_run(vr_region *region, size_t first, size_t end, const char *source,
                       uint64_t *ahead_counter)
{
    int ahead = ahead_counter != NULL;
    uintptr_t start = vr_chunk_address(region, first);
    size_t length = vr_chunk_address(region, end - 1) + vr_region_chunk_length(region, end - 1) -
                    start;
    /* The handler thread and workers never wait for the monitor: other faults depend on them. */
    vr_monitor_note_refill(region, length, 0);
    int rc = fill_missing_pages(region, start, length, source, source ? VR_FILL_COPY : VR_FILL_ZEROS);
    if (rc == 0) {
        int any_volatile = 0, all_volatile = 1;
        for (size_t chunk = first; chunk < end; chunk++) {
            vr_chunk_clear(region, chunk, VR_CHUNK_FAILED);
            int was_volatile = vr_chunk_set(region, chunk, VR_CHUNK_MATERIALIZED) & VR_CHUNK_VOLATILE;
            any_volatile |= was_volatile;
            all_volatile &= was_volatile != 0;
        }
        vr_stat_add(&region->stats.bytes_regenerated, length);
        if (ahead) {
            vr_stat_add(&region->stats.chunks_filled_ahead, end - first);
            vr_stat_add(ahead_counter, end - first);
        }
        /* Filled by a worker, a fault signal handler or a library call: the pages reach the LRU
         * lists before anyone wakes and may mark them volatile (vr_uffd_drain_lru); a MADV_FREE of
         * vr_region_keep_volatile below does it too. The handler thread drains later, when asked
         * (pthread_self only reads the thread pointer: safe in a signal handler). */
        int drains_here = !pthread_equal(pthread_self(), region->handler->thread);
        if (drains_here && !all_volatile)
            vr_uffd_drain_lru(region->handler);
        /* A chunk refilled while volatile must stay as discardable as it was: UFFDIO_COPY installs
         * ordinary dirty pages. Wake the faulting thread first, so that its access restarts on a
         * present page before the chunk becomes lazy-free again (see vr_region_keep_volatile for
         * why it cannot refault for ever); IN_FLIGHT is held until then, which is what a
         * concurrent mark_nonvolatile waits for (vr_region_begin_pin). */
        if (any_volatile) {
            wake_range(region, start, length);
            int made_lazy_free = 0;
            for (size_t chunk = first; chunk < end; chunk++)
                made_lazy_free |= vr_region_keep_volatile(region, chunk);
            /* MADV_FREE only queues the pages on this CPU's lazy-free batch: they stay swap-backed
             * until the batch moves them, and a move that finds a page isolated (MADV_PAGEOUT,
             * compaction) skips it for good, leaving it resident though volatile. The woken thread
             * is running already (it may call page_out now): move the batch before the chunks are
             * let go, on every thread, the handler thread too (vrange.testing.page_out waits for
             * chunks in flight). The drain also covers a run held for system calls. */
            if (made_lazy_free || (drains_here && all_volatile))
                vr_uffd_drain_lru(region->handler);
        }
    } else if (!ahead) {
        /* The copy itself failed (ENOMEM, ...): by policy, or the access would refault for ever. */
        apply_error_policy(region, start, length, first);
    }
    for (size_t chunk = first; chunk < end; chunk++) {
        region->gil_free_waiters[chunk] = 0;
        vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
    }
    wake_range(region, start, length); /* EEXIST and failures do not wake */
    return rc;
}

/* Resolve one faulting chunk with its regenerated bytes (see resolve_run). */
static int resolve_chunk(vr_region *region, size_t chunk_index, const char *source)
{
    return resolve_run(region, chunk_index, chunk_index + 1, source, NULL);
}

/* A vrange library call (mark_nonvolatile, prefault) of a region whose policy is 'abort' regenerates
 * a missing chunk on its own thread rather than faulting on it (uffd_handler.c, populate_range): a
 * regeneration that fails inside a fault can only abort the process there (without UFFDIO_POISON
 * nothing else answers the fault without wrong bytes), while the call can raise RegenerationError.
 * The chunk is claimed (IN_FLIGHT) under the handler's lock as a fault claims it, so faults on it
 * meanwhile wait for it (a GIL holder waits in its signal handler, without the GIL: WAIT jobs). The
 * calling thread does not hold the GIL (cffi); a Python regenerator takes it.
 * 1: refilled; 0: the chunk is in flight already (fault on it and wait); -errno: regeneration failed
 * (the chunk is left missing and FAILED; threads that faulted on it meanwhile fault again). */
int vr_uffd_regenerate_for_call(vr_region *region, size_t chunk)
{
    pthread_mutex_lock(&region->handler->lock);
    uint8_t previous = vr_chunk_set(region, chunk, VR_CHUNK_IN_FLIGHT);
    pthread_mutex_unlock(&region->handler->lock);
    if (previous & VR_CHUNK_IN_FLIGHT)
        return 0;
    size_t length = vr_region_chunk_length(region, chunk);
    uintptr_t start = vr_chunk_address(region, chunk);
    char *buffer = malloc(region->chunk_size);
    int rc = -ENOMEM;
    if (buffer) {
        vr_region_note_discard_found(region, chunk); /* filled before: the kernel or a purge took it */
        region->owners[chunk] = (pid_t)syscall(SYS_gettid); /* its own faults on it fail, not wait */
        if (region->source_kind == VR_SOURCE_PYTHON) {
            vr_stat_add(&region->stats.faults_on_worker_thread, 1);
            rc = vr_run_python_regenerator(region, (uint64_t)chunk * region->chunk_size, buffer,
                                           length, 0);
        } else {
            vr_stat_add(&region->stats.faults_on_handler_thread, 1);
            rc = vr_fill_native(region, chunk, buffer);
        }
        region->owners[chunk] = 0;
    }
    if (rc == 0) {
        rc = resolve_chunk(region, chunk, buffer); /* lets the chunk go and wakes its waiters */
        free(buffer);
        return rc < 0 ? rc : 1;
    }
    free(buffer);
    vr_stat_add(&region->stats.regeneration_errors, 1);
    vr_chunk_set(region, chunk, VR_CHUNK_FAILED);
    region->gil_free_waiters[chunk] = 0;
    vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
    wake_range(region, start, length);
    return rc < 0 && rc != -1 ? rc : -EFAULT;
}

/* A regenerator touched the chunk it is regenerating: fail that one page by the region's policy
 * (its access then raises SIGBUS, or its syscall EFAULT) instead of letting it wait for itself. */
static void fail_page(vr_region *region, uintptr_t address)
{
    uintptr_t page = address & ~(uintptr_t)(region->page_size - 1);
    apply_error_policy(region, page, region->page_size, (page - region->base) / region->chunk_size);
    wake_range(region, page, region->page_size);
}

/* Regeneration failed: resolve the fault without handing out wrong bytes (see docs/design.md). */
static void fail_chunk(vr_region *region, size_t chunk_index)
{
    size_t length = vr_region_chunk_length(region, chunk_index);
    uintptr_t start = vr_chunk_address(region, chunk_index);
    apply_error_policy(region, start, length, chunk_index);
    region->gil_free_waiters[chunk_index] = 0;
    vr_chunk_clear(region, chunk_index, VR_CHUNK_IN_FLIGHT);
    wake_range(region, start, length);
}

/* --- running a job ---------------------------------------------------------------------------------- */

/* After a Python regenerator's fault was resolved: fill the chunks after it if the region is being
 * walked forward (up to the job's ahead_end, decided when its event was read), on the same thread
 * (the faulting thread's signal handler or a worker), one by one through the job's buffer. The
 * chunks are claimed without the handler's lock: an atomic claim is exclusive all the same, and a
 * fault the handler then sees on one of them waits for its wake as on any chunk in flight (a thread
 * that may hold the GIL waits in its signal handler, without it). Each chunk is claimed just before its regenerator runs, never the whole
 * window at once: a regenerator may read the chunks after its own, and its nested fault must find
 * them unclaimed (served as usual), not claimed by this very thread (it would wait for itself).
 * A regenerator that fails here leaves the chunk missing, for a real fault. */
static void python_fill_ahead(vr_region *region, vr_job *job, int on_faulting_thread,
                              int at_unsafe_point)
{
    uint64_t *served = on_faulting_thread ? &region->stats.faults_on_faulting_thread
                                          : &region->stats.faults_on_worker_thread;
    size_t chunk = job->chunk_index;
    pid_t self = (pid_t)syscall(SYS_gettid);
    for (size_t ahead = chunk + 1; ahead < job->ahead_end; ahead++) {
        if (!vr_region_chunk_fillable_ahead(region, ahead) ||
            (vr_chunk_set(region, ahead, VR_CHUNK_IN_FLIGHT) & VR_CHUNK_IN_FLIGHT))
            return;
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* pairs with vr_region_quiesce */
        /* A job runs when a worker gets to it, possibly long after its fault: if part of the region
         * was made volatile or purged since (purge() may even have returned, and the kernel may
         * have reclaimed what was made volatile), the walk it saw is gone, and filling now would
         * bring back memory that was just given up. */
        if (__atomic_load_n(&region->closing, __ATOMIC_SEQ_CST) != VR_OPEN ||
            __atomic_load_n(&region->discard_epoch, __ATOMIC_SEQ_CST) != job->ahead_epoch) {
            let_go_ahead(region, ahead, ahead + 1);
            return;
        }
        vr_region_note_discard_found(region, ahead); /* filled before: the kernel took it */
        vr_region_ahead_filled(region, ahead + 1);
        region->owners[ahead] = self; /* its regenerator touching it fails, never waits */
        int rc = vr_run_python_regenerator_ahead(region, (uint64_t)ahead * region->chunk_size,
                                                 job->buffer, vr_region_chunk_length(region, ahead),
                                                 at_unsafe_point);
        region->owners[ahead] = 0;
        if (rc != 0) {
            vr_stat_add(&region->stats.regeneration_errors, 1);
            let_go_ahead(region, ahead, ahead + 1);
            return;
        }
        if (resolve_run(region, ahead, ahead + 1, job->buffer, served) != 0)
            return;
    }
}

/* Run a Python regenerator for the job's chunk and resolve the fault (or fail it by policy).
 * On the faulting thread this runs inside the fault signal handler (below). */
static void run_job(vr_job *job, int on_faulting_thread, int at_unsafe_point)
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
        rc = vr_run_python_regenerator(region, offset, job->buffer, length, at_unsafe_point);
    else
        rc = vr_run_python_regenerator_unless_cancelled(region, offset, job->buffer, length,
                                                        &job->state);
    region->owners[job->chunk_index] = 0;
    if (rc == -ECANCELED)
        return; /* the handler thread failed the fault by policy already */
    if (rc != 0) {
        fail_chunk(region, job->chunk_index);
        return;
    }
    if (resolve_chunk(region, job->chunk_index, job->buffer) == 0 &&
        region->source_kind == VR_SOURCE_PYTHON && !job->closing)
        python_fill_ahead(region, job, on_faulting_thread, on_faulting_thread && at_unsafe_point);
}

/* The worker pool's way to run a job (handler->run_job): on a worker, which takes the GIL for a
 * Python regenerator unless the handler thread cancelled the job meanwhile. */
void vr_uffd_run_job_on_worker(vr_job *job) { run_job(job, 0, 0); }

/* Lock held: hand the job to a worker; if no worker can ever take it, fail its fault by policy
 * rather than leave the thread waiting. */
static void hand_to_worker(vr_uffd_handler *handler, vr_job *job)
{
    if (vr_uffd_queue_job(handler, job) == 0)
        return;
    fail_chunk(job->region, job->chunk_index);
    vr_uffd_job_free(job);
}

/* --- the fault signal: serving a fault on the faulting thread --------------------------------------- */

/* Tell the handler thread a verdict is ready (async-signal-safe: one write to its eventfd). */
static void notify_verdict(vr_uffd_handler *handler)
{
    uint64_t one = 1;
    /* An eventfd write only fails if the counter would overflow: it is then readable anyway. */
    (void)!write(handler->wake_fd, &one, sizeof one);
}

/* The action vrange's replaced when it took the signal back from other code, to pass that code's own
 * signals on to it. Process-wide because a signal disposition is. */
static struct vr_previous_action previous_action;

/* How deep this thread is in chain_to_previous: a replacement that chains back to vrange (e.g.
 * faulthandler.register(chain=True), which saved vrange's handler as its own previous) must not make
 * the two call each other for ever. Initial-exec TLS: no allocation in a signal handler. */
static __thread int chain_depth __attribute__((tls_model("initial-exec")));

static void chain_to_previous(int signal_number, siginfo_t *info, void *context)
{
    if (chain_depth > 0)
        return; /* back from the replacement: its signal has been handled */
    chain_depth++;
    const struct sigaction *previous = vr_previous_action(&previous_action);
    if (previous->sa_flags & SA_SIGINFO) {
        if (previous->sa_sigaction)
            previous->sa_sigaction(signal_number, info, context);
    } else if (previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN &&
               previous->sa_handler != NULL) {
        previous->sa_handler(signal_number);
    }
    /* SIG_DFL or SIG_IGN before vrange: a stray signal is ignored, as it always was with vrange. */
    chain_depth--;
}

/* Did this signal interrupt the thread where it was stopped in the fault (same user pc and sp as
 * /proc reported)? If not, it was woken before the signal arrived and may be anywhere (inside the
 * GIL's own mutex, say): do nothing there. If so, it is about to (re)execute an access to vrange
 * memory, which is the context the reasoning above relies on. */
static int interrupted_at_fault(const vr_job *job, void *context)
{
    const ucontext_t *interrupted = context;
#if defined(__x86_64__)
    return (uint64_t)interrupted->uc_mcontext.gregs[REG_RIP] == job->user_pc &&
           (uint64_t)interrupted->uc_mcontext.gregs[REG_RSP] == job->user_sp;
#elif defined(__aarch64__)
    return interrupted->uc_mcontext.pc == job->user_pc && interrupted->uc_mcontext.sp == job->user_sp;
#else
    (void)job;
    (void)interrupted;
    return 0; /* cannot tell: let a worker serve it */
#endif
}

static void fault_signal_handler(int signal_number, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    if (!(info->si_code == SI_QUEUE && info->si_pid == getpid() && info->si_value.sival_ptr)) {
        chain_to_previous(signal_number, info, context); /* not vrange's */
    } else {
        vr_job *job = info->si_value.sival_ptr;
        if (job->magic != VR_JOB_MAGIC) {
            chain_to_previous(signal_number, info, context); /* queued by other code */
        } else {
            vr_uffd_handler *handler = job->region->handler;
            int verdict = VR_VERDICT_DONE;
            if (!interrupted_at_fault(job, context)) {
                /* Woken already: nothing to do here. A regeneration goes to a worker; while the
                 * region closes, the claim is let go (the thread may fault again: a new job). */
                if (job->kind == VR_JOB_REGENERATE &&
                    !__atomic_exchange_n(&job->started, 1, __ATOMIC_ACQ_REL))
                    verdict = job->closing ? VR_VERDICT_MISSED : VR_VERDICT_NOT_MINE;
            } else if (job->kind == VR_JOB_WAIT) {
                vr_wait_for_chunk(job->region, job->chunk_index); /* a WAIT job */
            } else if (__atomic_exchange_n(&job->started, 1, __ATOMIC_ACQ_REL)) {
                /* Picked up too late: a worker has this chunk already. Let the access retry. */
            } else if (PyGILState_Check()) {
                run_job(job, 1, 1);
            } else if (job->kind == VR_JOB_REGENERATE && !job->closing &&
                       PyGILState_GetThisThreadState() && !vr_python_has_exited()) {
                /* A Python thread that let the GIL go (a C loop, numpy): it takes the GIL here, as
                 * the sigbus backend's handler does, instead of handing the job to a worker (three
                 * more cross-thread hand-offs). It is stopped at an access to vrange memory, not in
                 * the GIL's code, so waiting for the GIL here is what a worker would do for it. */
                run_job(job, 1, 0);
            } else {
                verdict = VR_VERDICT_NOT_MINE;
            }
            /* After this store the handler thread may free the job: do not touch it again. */
            __atomic_store_n(&job->verdict, verdict, __ATOMIC_RELEASE);
            notify_verdict(handler);
        }
    }
    errno = saved_errno;
}

int vr_uffd_fault_signal_is_ours(int signal_number)
{
    return vr_signal_handler_installed(signal_number, fault_signal_handler);
}

/* Install once per process. Refuses (EBUSY) if someone else already handles this signal, unless
 * `force` (vrange's own handler was replaced after it was installed: take the signal back, and pass
 * the replacement's own signals on to it). SA_NODEFER: see the top of this file. */
int vr_uffd_fault_signal_install(int signal_number, int force)
{
    return vr_signal_install(signal_number, fault_signal_handler,
                             SA_SIGINFO | SA_NODEFER | SA_RESTART, !force, &previous_action);
}

/* --- where is the faulting thread? ------------------------------------------------------------------ */

static const char *const proc_file_names[VR_PROC_FILES] = { "syscall", "wchan", "status" };

/* The handler's open /proc files of thread `tid` (opened as they are needed), the least recently
 * used slot given up for a thread not seen lately. Handler thread only. */
static struct vr_proc_files *proc_files_of(vr_uffd_handler *handler, pid_t tid)
{
    struct vr_proc_files *slot = &handler->proc_cache[0];
    for (int i = 0; i < VR_PROC_CACHE_SLOTS; i++) {
        struct vr_proc_files *candidate = &handler->proc_cache[i];
        if (candidate->tid == tid) {
            slot = candidate;
            goto found;
        }
        if (candidate->last_used < slot->last_used)
            slot = candidate;
    }
    for (int file = 0; file < VR_PROC_FILES; file++) {
        if (slot->tid && slot->fd[file] >= 0)
            close(slot->fd[file]);
        slot->fd[file] = -1;
    }
    slot->tid = tid;
found:
    slot->last_used = ++handler->proc_clock;
    return slot;
}

/* Read a /proc file of the faulting thread. The handler reads three of them per routed fault: they
 * stay open for the last few threads and are read again with pread (every read from offset 0 makes
 * the file anew), which costs a third of opening, reading and closing them. A descriptor left from
 * an ended thread whose id was reused reads nothing: it is opened again once. */
static ssize_t read_proc_task_file(vr_uffd_handler *handler, pid_t tid, int file, char *buffer,
                                   size_t size)
{
    if (tid <= 0)
        return -1;
    struct vr_proc_files *slot = proc_files_of(handler, tid);
    for (int attempt = 0; attempt < 2; attempt++) {
        if (slot->fd[file] < 0) {
            char path[64];
            snprintf(path, sizeof path, "/proc/self/task/%d/%s", (int)tid, proc_file_names[file]);
            slot->fd[file] = open(path, O_RDONLY | O_CLOEXEC);
            if (slot->fd[file] < 0)
                return -1; /* the thread has ended */
        }
        ssize_t n = pread(slot->fd[file], buffer, size - 1, 0);
        if (n > 0) {
            buffer[n] = '\0';
            return n;
        }
        close(slot->fd[file]);
        slot->fd[file] = -1;
    }
    return -1;
}

/* A forked child: the cached descriptors are the parent's threads', which the child does not
 * have; close them (the parent's handler is given up in the child). */
void vr_uffd_handler_forget_in_child(vr_uffd_handler *handler)
{
    for (int i = 0; i < VR_PROC_CACHE_SLOTS; i++) {
        for (int file = 0; file < VR_PROC_FILES; file++) {
            if (handler->proc_cache[i].tid && handler->proc_cache[i].fd[file] >= 0)
                close(handler->proc_cache[i].fd[file]);
            handler->proc_cache[i].fd[file] = -1;
        }
        handler->proc_cache[i].tid = 0;
    }
}

/* The fault signal must reach vrange's handler: other code may have replaced it since the handler
 * started (signal.signal, a library). Checked where a fault is routed: take the signal back (the
 * replacement still gets its own signals, chained) and say so once. 0 if it cannot be taken back:
 * the fault then goes to a worker. */
static int fault_signal_ready(vr_uffd_handler *handler)
{
    if (vr_uffd_fault_signal_is_ours(handler->signal_number) == 1)
        return 1;
    if (vr_uffd_fault_signal_install(handler->signal_number, 1) < 0)
        return 0;
    if (!__atomic_exchange_n(&handler->signal_retaken, 1, __ATOMIC_ACQ_REL)) {
        static const char message[] =
            "vrange: other code replaced the handler of vrange's fault signal (SIGRTMIN+6); vrange "
            "put its own back in front, and passes the other code's signals on to it\n";
        (void)!write(STDERR_FILENO, message, sizeof message - 1);
    }
    return 1;
}

/* True if the thread is stopped in a user-mode access (not in a syscall) and does not block our
 * signal: only then may a signal be sent. A signal interrupting a fault taken inside a syscall
 * would make that syscall fail with EFAULT or a short count. */
static int can_signal_thread(vr_uffd_handler *handler, pid_t tid, vr_job *job)
{
    char text[512];
    if (!fault_signal_ready(handler))
        return 0;
    if (tid <= 0 || read_proc_task_file(handler, tid, VR_PROC_SYSCALL, text, sizeof text) <= 0)
        return 0;
    if (strncmp(text, "-1 ", 3) != 0)
        return 0; /* a syscall number, or "running": not a user-mode fault */
    /* "-1 <user sp> <user pc>": the signal handler checks it interrupted the thread right there. */
    char *end = NULL;
    job->user_sp = strtoull(text + 3, &end, 16);
    job->user_pc = strtoull(end, NULL, 16);
    /* And blocked in a userfault right now: the event may be stale (the thread was woken and has
     * moved on), and a signal must never land in arbitrary code (it may hold the GIL's mutex). */
    if (read_proc_task_file(handler, tid, VR_PROC_WCHAN, text, sizeof text) <= 0 ||
        strcmp(text, "handle_userfault") != 0)
        return 0;
    char status[4096];
    if (read_proc_task_file(handler, tid, VR_PROC_STATUS, status, sizeof status) <= 0)
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

/* Called with the lock held: send the job to the faulting thread. 0 if sent. */
static int signal_job(vr_uffd_handler *handler, vr_job *job)
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

/* --- verdicts --------------------------------------------------------------------------------------- */

/* Handler thread, lock held: a watched job whose worker has not got the GIL for VR_GIL_WAIT_LIMIT_MS
 * while its thread still waits in the fault is a deadlock in the making (that thread holds the GIL
 * and cannot be signalled): fail the fault by the region's policy, and let the worker skip the job
 * when it gets the GIL at last. */
static void cancel_gil_deadlocks(vr_uffd_handler *handler)
{
    int64_t now = vr_monotonic_ms();
    for (vr_job *job = handler->gil_waiting; job; job = job->waiting_next) {
        char wchan[64];
        if (__atomic_load_n(&job->state, __ATOMIC_ACQUIRE) != VR_JOB_QUEUED ||
            now - job->queued_at_ms < handler->gil_wait_limit_ms ||
            read_proc_task_file(handler, job->faulting_tid, VR_PROC_WCHAN, wchan, sizeof wchan) <= 0 ||
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
        fail_chunk(job->region, job->chunk_index);
    }
}

/* Handler thread: collect verdicts of signalled threads. "Not mine" goes to a worker, and so does a
 * regeneration whose signal was never picked up. */
void vr_uffd_collect_verdicts(vr_uffd_handler *handler)
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
                vr_job *copy = vr_uffd_job_new(job->region, job->chunk_index, job->faulting_tid,
                                       VR_JOB_REGENERATE);
                if (copy) {
                    __atomic_store_n(&job->started, 1, __ATOMIC_RELEASE); /* requeue only once */
                    hand_to_worker(handler, copy);
                }
            }
            link = &job->next;
            continue;
        }
        *link = job->next;
        if (verdict == VR_VERDICT_DONE) {
            vr_uffd_job_free(job);
        } else if (job->closing) {
            /* Not a GIL holder: it may sleep in the fault until close() unmaps or reopens. */
            if (verdict == VR_VERDICT_NOT_MINE)
                job->region->gil_free_waiters[job->chunk_index] = job->faulting_tid;
            vr_chunk_clear(job->region, job->chunk_index, VR_CHUNK_IN_FLIGHT);
            vr_uffd_job_free(job);
        } else {
            /* This thread does not hold the GIL, and cannot take it while it stays in this fault:
             * when it faults again on the chunk (it will, right away), let it wait in the kernel. */
            job->region->gil_free_waiters[job->chunk_index] = job->faulting_tid;
            hand_to_worker(handler, job);
        }
    }
    pthread_mutex_unlock(&handler->lock);
}

/* --- the event ---------------------------------------------------------------------------------------- */

/* Lock held. Two regions may contain the address: close() unmaps a region before it leaves this
 * table, and a region created meanwhile by another thread may take the same address at once. The
 * open one is then the mapping that faulted: serving the closing one would fill the new mapping with
 * the old region's bytes. */
static vr_region *find_region(vr_uffd_handler *handler, uintptr_t address)
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

static int ensure_staging(vr_uffd_handler *handler, size_t size)
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

/* --- native sources: the fault and the chunks filled ahead of it --------------------------------- */

/* Regenerate chunks [first, end) (claimed) from the native source and resolve them; on failure a
 * faulting chunk is failed by policy, chunks filled ahead are let go. 0 or -errno. */
static int serve_native(vr_uffd_handler *handler, vr_region *region, size_t first, size_t end,
                        int ahead)
{
    uint64_t *served = ahead ? &region->stats.faults_on_handler_thread : NULL;
    if (region->source_kind == VR_SOURCE_ZEROS)
        return resolve_run(region, first, end, NULL, served); /* copied from zeros: no buffer */
    int rc = ensure_staging(handler, (end - first) * region->chunk_size);
    for (size_t chunk = first; rc == 0 && chunk < end; chunk++)
        rc = vr_fill_native(region, chunk, handler->staging + (chunk - first) * region->chunk_size);
    if (rc == 0)
        return resolve_run(region, first, end, handler->staging, served);
    if (!ahead)
        fail_chunk(region, first);
    else
        let_go_ahead(region, first, end);
    return rc;
}

/* Lock held, `chunk` claimed for a fault of a native source on an open region: claim the chunks to
 * fill ahead of it (vr_region_ahead_window), as faults claim, under the lock. Returns the end of
 * the claimed run (chunk + 1: none). */
static size_t claim_ahead(vr_region *region, size_t chunk)
{
    size_t window = vr_region_ahead_window(region, chunk);
    size_t limit = vr_region_ahead_limit(region);
    size_t end = chunk + 1;
    while (end < limit && end - (chunk + 1) < window &&
           vr_region_chunk_fillable_ahead(region, end) &&
           !(vr_chunk_set(region, end, VR_CHUNK_IN_FLIGHT) & VR_CHUNK_IN_FLIGHT))
        end++;
    if (end == chunk + 1)
        return end;
    /* Pairs with vr_region_quiesce, as the fault's own claim does: close() either sees these
     * claims and waits for them, or they see it closing and are let go at once. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&region->closing, __ATOMIC_SEQ_CST) != VR_OPEN) {
        let_go_ahead(region, chunk + 1, end);
        return chunk + 1;
    }
    for (size_t ahead = chunk + 1; ahead < end; ahead++)
        vr_region_note_discard_found(region, ahead); /* filled before: the kernel took it */
    vr_region_ahead_filled(region, end);
    return end;
}

/* Let claimed chunks go unfilled (a thread waiting on one faults again and is served as usual). */
static void let_go_ahead(vr_region *region, size_t first, size_t end)
{
    if (first >= end)
        return;
    for (size_t chunk = first; chunk < end; chunk++)
        vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
    uintptr_t start = vr_chunk_address(region, first);
    wake_range(region, start, vr_chunk_address(region, end - 1) +
                                  vr_region_chunk_length(region, end - 1) - start);
}

/* Fill the claimed chunks [first, end) after a resolved fault, in steps of about 64 KiB, each woken
 * as it is done: the thread that faulted is running again already, and may be right behind. */
static void fill_ahead(vr_uffd_handler *handler, vr_region *region, size_t first, size_t end)
{
    size_t step = AHEAD_STEP_BYTES / region->chunk_size ? AHEAD_STEP_BYTES / region->chunk_size : 1;
    for (size_t run = first; run < end; run += step) {
        size_t run_end = run + step < end ? run + step : end;
        if (serve_native(handler, region, run, run_end, 1) != 0) {
            let_go_ahead(region, run_end, end);
            return;
        }
    }
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
static void serve_while_closing(vr_uffd_handler *handler, vr_region *region, size_t chunk, pid_t tid)
{
    if (region->gil_free_waiters[chunk] != tid) {
        vr_job *job = vr_uffd_job_new(region, chunk, tid, VR_JOB_REGENERATE);
        if (job) {
            job->closing = 1;
            if (can_signal_thread(handler, tid, job) && signal_job(handler, job) == 0)
                return; /* collect_verdicts ends the claim if the thread does not hold the GIL */
            if (job->watched) {
                hand_to_worker(handler, job);
                return;
            }
            vr_uffd_job_free(job);
        }
    }
    vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
}

/* Is thread `tid` blocked in a userfault right now (handler thread only: the /proc cache)? */
static int thread_waits_in_userfault(vr_uffd_handler *handler, pid_t tid)
{
    char wchan[64];
    return read_proc_task_file(handler, tid, VR_PROC_WCHAN, wchan, sizeof wchan) > 0 &&
           strcmp(wchan, "handle_userfault") == 0;
}

/* Lock held, `chunk` in flight (claimed by someone else): a thread that may hold the GIL (a
 * user-mode access) must not wait for it in the kernel, since the chunk's regenerator may need the
 * GIL. Ask it to wait in its signal handler without it (a WAIT job). */
static void ask_to_wait_without_gil(vr_uffd_handler *handler, vr_region *region, size_t chunk,
                                    pid_t tid)
{
    if (region->source_kind != VR_SOURCE_PYTHON || region->gil_free_waiters[chunk] == tid)
        return;
    vr_job *wait = vr_uffd_job_new(region, chunk, tid, VR_JOB_WAIT);
    if (wait && !(can_signal_thread(handler, tid, wait) && signal_job(handler, wait) == 0))
        vr_uffd_job_free(wait);
}

/* How long a chunk's regenerating thread must be seen asleep in the kernel, in two looks, before its
 * own fault on the chunk is failed: a nested fault on another region's page, which the handler
 * serves meanwhile, sleeps there too, but not across two looks with the events read between. */
#define SELF_FAULT_ASLEEP_MS 1

/* Lock held. Look at a fault of a chunk's own regenerating thread again from the handler loop
 * (vr_uffd_recheck_self_faults); with every slot taken, it is dropped as stale (the former rule). */
static void remember_self_fault(vr_uffd_handler *handler, vr_region *region, uintptr_t address,
                                size_t chunk, pid_t tid)
{
    if (handler->self_fault_count == VR_SELF_FAULT_SLOTS)
        return;
    vr_region_ref(region);
    handler->self_faults[handler->self_fault_count++] = (struct vr_self_fault){
        .region = region, .address = address, .chunk = chunk, .tid = tid, .asleep_since_ms = 0 };
}

/* Handler thread, each time round its loop while faults are remembered (it then polls every
 * millisecond): a remembered fault whose regeneration ended was stale (that regeneration's wake
 * reached the thread if it waited); one whose thread stays asleep in the kernel is the
 * regenerator reading its own chunk: fail the page by policy. */
void vr_uffd_recheck_self_faults(vr_uffd_handler *handler)
{
    int64_t now = vr_monotonic_ms();
    struct vr_self_fault finished[VR_SELF_FAULT_SLOTS];
    int fail[VR_SELF_FAULT_SLOTS];
    int finished_count = 0;
    pthread_mutex_lock(&handler->lock);
    for (int i = 0; i < handler->self_fault_count;) {
        struct vr_self_fault *fault = &handler->self_faults[i];
        vr_region *region = fault->region;
        int stale = !(vr_chunk_load(region, fault->chunk) & VR_CHUNK_IN_FLIGHT) ||
                    region->owners[fault->chunk] != fault->tid;
        int reads_itself = 0;
        if (!stale) {
            if (!thread_waits_in_userfault(handler, fault->tid))
                fault->asleep_since_ms = 0;
            else if (!fault->asleep_since_ms)
                fault->asleep_since_ms = now;
            else
                reads_itself = now - fault->asleep_since_ms >= SELF_FAULT_ASLEEP_MS;
        }
        if (!stale && !reads_itself) {
            i++;
            continue;
        }
        fail[finished_count] = reads_itself;
        finished[finished_count++] = *fault;
        *fault = handler->self_faults[--handler->self_fault_count];
    }
    pthread_mutex_unlock(&handler->lock);
    /* As for any failed page: outside the lock, the region kept alive by the reference. */
    for (int i = 0; i < finished_count; i++) {
        if (fail[i])
            fail_page(finished[i].region, finished[i].address);
        vr_region_unref(finished[i].region);
    }
}

void vr_uffd_handle_pagefault(vr_uffd_handler *handler, uintptr_t address, pid_t tid)
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
            /* The thread regenerating this chunk faulted on it. Either its regenerator reads the
             * chunk itself (it would wait for ever: fail the page), or the event is stale: the
             * thread faulted on the chunk again (woken by a wake of the range before its signal
             * arrived) and is now regenerating it in its signal handler, not waiting on this
             * fault (failing the page then would poison or zero-fill a page of a chunk whose
             * regenerator never failed). Only the first kind sleeps in the kernel, but a thread
             * that has just queued its fault may not be asleep yet: look again until the thread
             * is seen asleep (fail) or the regeneration ends (stale). */
            remember_self_fault(handler, region, address, chunk, tid);
            pthread_mutex_unlock(&handler->lock);
            return;
        }
        /* Someone is regenerating this chunk; clearing IN_FLIGHT and then UFFDIO_WAKE wakes this
         * thread too. If it may hold the GIL (a user-mode access), it must not wait in the kernel:
         * the regenerator may need the GIL. Ask it to wait in its signal handler without it. */
        ask_to_wait_without_gil(handler, region, chunk, tid);
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
     * lets go (uffd_handler.c, wake_after_purge) and the access faults again. */
    if (vr_chunk_set(region, chunk, VR_CHUNK_IN_FLIGHT) & VR_CHUNK_IN_FLIGHT) {
        /* Claimed since the check above, without this lock: by a purge, or by a Python
         * regenerator's fill-ahead (python_fill_ahead), whose regenerator may be waiting for the
         * GIL this thread holds. As for any chunk in flight, such a thread must wait in its signal
         * handler without the GIL, not asleep in the kernel (that deadlocked). */
        ask_to_wait_without_gil(handler, region, chunk, tid);
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
        vr_job *job = vr_uffd_job_new(region, chunk, tid, VR_JOB_REGENERATE);
        vr_region_unref(region); /* the job holds its own reference */
        if (job)
            hand_to_worker(handler, job);
        pthread_mutex_unlock(&handler->lock);
        if (!job)
            fail_chunk(region, chunk);
        return;
    }
    if (region->source_kind != VR_SOURCE_PYTHON) {
        size_t ahead_end = claim_ahead(region, chunk);
        pthread_mutex_unlock(&handler->lock);
        vr_stat_add(&region->stats.faults_on_handler_thread, 1);
        if (serve_native(handler, region, chunk, chunk + 1, 0) == 0)
            fill_ahead(handler, region, chunk + 1, ahead_end);
        else
            let_go_ahead(region, chunk + 1, ahead_end);
        vr_region_unref(region);
        return;
    }
    vr_job *job = vr_uffd_job_new(region, chunk, tid, VR_JOB_REGENERATE);
    if (!job) {
        pthread_mutex_unlock(&handler->lock);
        fail_chunk(region, chunk);
        vr_region_unref(region);
        return;
    }
    /* Decided here, in the order the faults came, not when a worker gets to it (workers run in any
     * order, and a late one would make a walk out of faults that were not one). */
    size_t window = vr_region_ahead_window(region, chunk);
    size_t limit = vr_region_ahead_limit(region); /* a library call's range ends here */
    job->ahead_end = chunk + 1 + window < limit ? chunk + 1 + window : limit;
    job->ahead_epoch = __atomic_load_n(&region->discard_epoch, __ATOMIC_SEQ_CST);
    vr_region_unref(region); /* the job holds its own reference */
    if (!(can_signal_thread(handler, tid, job) && signal_job(handler, job) == 0))
        hand_to_worker(handler, job);
    pthread_mutex_unlock(&handler->lock);
}
