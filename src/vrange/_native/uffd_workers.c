/* The uffd backend's jobs and the pool of worker threads that run them (see uffd_backend.h).
 *
 * The pool sits below the fault path (uffd_fault.c): it queues what it is handed and runs each job
 * through handler->run_job, never calling up into the file that made the job. A worker takes the GIL
 * only inside that call (to run a Python regenerator); the pool itself never does. The queue, the
 * worker counts and the watched list are guarded by the handler's lock. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include "uffd_backend.h"

vr_job *vr_uffd_job_new(vr_region *region, size_t chunk_index, pid_t tid, int kind)
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

void vr_uffd_job_free(vr_job *job)
{
    job->magic = 0;
    vr_region_unref(job->region);
    free(job->buffer);
    free(job);
}

/* Lock held: the job leaves the list of watched jobs (see cancel_gil_deadlocks in uffd_fault.c). */
static void unwatch(vr_uffd_handler *handler, vr_job *job)
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
    vr_uffd_handler *handler = arg;
    /* Created by the handler thread, a worker inherits its mask, which blocks the fault signal. A
     * worker holds the GIL while its regenerator runs; if that regenerator faults on a region, the
     * signal is the only way to serve it (no other thread can take the GIL): unblock it. */
    vr_uffd_set_fault_signal_mask(handler, SIG_UNBLOCK);
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
        handler->run_job(job);
        pthread_mutex_lock(&handler->lock);
        unwatch(handler, job);
        vr_uffd_job_free(job);
    }
    return NULL;
}

/* Called with the lock held. Every queued job gets a worker of its own (an idle one, reserved at
 * once, or a new one): a busy worker may be inside a regenerator whose syscall waits on this very
 * job (it touches another region), so a job must never wait behind a busy worker. 0, or -1 when no
 * worker can ever take the job (none runs and none can be started): it is then not queued, and the
 * caller fails its fault by policy. */
int vr_uffd_queue_job(vr_uffd_handler *handler, vr_job *job)
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
        return 0;
    }
    if (handler->workers_total >= VR_MAX_WORKERS)
        return 0; /* all busy: the job waits for the first to finish */
    pthread_t thread;
    int rc = pthread_create(&thread, NULL, worker_main, handler);
    if (rc != 0) {
        if (handler->workers_total > 0)
            return 0; /* a busy worker will take it when done */
        /* No worker will ever take this job: fail its fault by policy rather than leave it. */
        static const char message[] =
            "vrange: cannot start a regenerator worker thread; the fault fails by policy\n";
        (void)!write(STDERR_FILENO, message, sizeof message - 1);
        handler->queue_head = handler->queue_tail = NULL; /* it is the only job queued */
        unwatch(handler, job);
        return -1;
    }
    pthread_detach(thread);
    handler->workers_total++;
    return 0;
}
