/* The userfaultfd backend: regions registered with one userfaultfd, whose events a handler thread
 * serves.
 *
 * One handler per process (created by Python, passed to every call: no C global holds it) owns one
 * userfaultfd and one C thread that reads its events. A fault on a region with a native source is
 * served on that thread without the GIL; a fault on a region with a Python regenerator becomes a job,
 * carried by the fault signal to the faulting thread (if it holds the GIL) or to a pool of C worker
 * threads that take the GIL. Every queued job gets a worker of its own (up to VR_MAX_WORKERS), so a
 * regenerator that itself makes a syscall touching another region (which needs a second worker)
 * cannot deadlock. The handler thread itself never takes the GIL and never blocks on anything but
 * poll(), so it always keeps reading events (a thread holding the GIL and faulting is served by the
 * signal).
 *
 * Files, from the top: uffd_handler.c (the handler's lifetime and event loop, the region table,
 * library calls), uffd_fault.c (the fault path, one file from event to resolved fault, with the
 * fault signal's handler), uffd_workers.c (jobs and the worker pool, which runs a job through
 * handler->run_job and never calls up). */
#ifndef VRANGE_UFFD_BACKEND_H
#define VRANGE_UFFD_BACKEND_H

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

#include "region.h"

#define VR_MAX_WORKERS 16

#define VR_JOB_MAGIC 0x76726a6fU

/* MISSED: a CLOSING job reached its thread after it had moved on (it holds the GIL or not). */
enum vr_job_verdict {
    VR_VERDICT_PENDING = 0,
    VR_VERDICT_DONE = 1,
    VR_VERDICT_NOT_MINE = 2,
    VR_VERDICT_MISSED = 3
};

/* A job regenerates a chunk, or (WAIT) asks a thread that faulted on a chunk being regenerated to
 * wait in its signal handler with the GIL released: a thread holding the GIL must not wait in the
 * kernel while the regenerator may need the GIL. */
enum vr_job_kind { VR_JOB_REGENERATE = 0, VR_JOB_WAIT = 1 };

typedef struct vr_job vr_job;
struct vr_job {
    uint32_t magic; /* checked by the signal handler: a queued signal may come from elsewhere */
    vr_region *region;
    size_t chunk_index;
    pid_t faulting_tid;
    int kind;
    int closing; /* sent while the region closes: served only by a thread that holds the GIL */
    int verdict; /* written by the signal handler, read by the handler thread */
    int started; /* the signal handler has begun: never hand this job to a worker too */
    int64_t signalled_at_ms;
    uint64_t user_sp, user_pc; /* where the thread was stopped, from /proc/self/task/<tid>/syscall */
    char *buffer;
    /* Fill-ahead once the fault is served, decided when the event was read: up to ahead_end, as long
     * as nothing of the region was made volatile or purged since (ahead_epoch: its discard_epoch). */
    size_t ahead_end;
    uint64_t ahead_epoch;
    vr_job *next;
    /* A job for a worker whose faulting thread blocks the fault signal: that thread may hold the
     * GIL the worker needs. The handler thread watches it (gil_waiting) and, when the worker has
     * not got the GIL after VR_GIL_WAIT_LIMIT_MS while the thread still waits in the fault, fails
     * the fault by the region's policy instead of leaving both waiting for ever. */
    int state; /* VR_JOB_QUEUED, VR_JOB_RUNNING (the worker has the GIL), VR_JOB_CANCELLED */
    int watched;
    int64_t queued_at_ms;
    vr_job *waiting_next;
};

enum vr_job_state { VR_JOB_QUEUED = 0, VR_JOB_RUNNING = 1, VR_JOB_CANCELLED = 2 };
/* Long enough that another thread holding the GIL in C code for a while is not mistaken for the
 * deadlock (it cannot be told apart from outside the interpreter), short enough not to look hung. */
#define VR_GIL_WAIT_LIMIT_MS 10000

/* /proc files of a faulting thread the handler keeps open (uffd_fault.c, read_proc_task_file). */
#define VR_PROC_CACHE_SLOTS 8
#define VR_SELF_FAULT_SLOTS 16
enum { VR_PROC_SYSCALL, VR_PROC_WCHAN, VR_PROC_STATUS, VR_PROC_FILES };
struct vr_proc_files {
    pid_t tid; /* 0: a free slot */
    int fd[VR_PROC_FILES];
    uint64_t last_used;
};

struct vr_uffd_handler {
    int uffd;
    int wake_fd; /* eventfd: signal verdicts and shutdown */
    int signal_number;
    size_t page_size;
    pthread_t thread;
    pthread_mutex_t lock; /* regions, jobs, queue, worker counts */
    vr_region **regions;
    size_t region_count, region_capacity;
    vr_job *signalled; /* jobs sent to faulting threads, awaiting a verdict */
    vr_job *queue_head, *queue_tail; /* jobs for the workers */
    pthread_cond_t work_ready;
    int workers_total, workers_idle, wakeups;
    /* How a worker runs a job (vr_uffd_run_job_on_worker): the pool below the fault path calls it
     * through this pointer instead of naming it. */
    void (*run_job)(vr_job *job);
    char *staging; /* handler thread only: native fills */
    size_t staging_size;
    uint64_t features;
    int signal_retaken; /* the fault signal was taken back from other code (said once) */
    vr_job *gil_waiting; /* watched jobs (see vr_job.watched), under lock */
    int gil_wait_limit_ms;
    int64_t spin_ns; /* how long the thread looks for the next event before it sleeps */
    struct vr_proc_files proc_cache[VR_PROC_CACHE_SLOTS]; /* handler thread only */
    uint64_t proc_clock;
    void *drain_page; /* one untouched private page: see vr_uffd_drain_lru (NULL: none) */
    /* Faults of a chunk's own regenerating thread that looked stale when read (the thread was not
     * asleep in the kernel yet): looked at again until they resolve (handler thread only). */
    struct vr_self_fault {
        vr_region *region; /* holds a reference */
        uintptr_t address;
        size_t chunk;
        pid_t tid;
        int64_t asleep_since_ms; /* first seen asleep in the kernel (0: not yet) */
    } self_faults[VR_SELF_FAULT_SLOTS];
    int self_fault_count;
    int undrained;    /* atomic: the handler thread filled pages since its last drain */
    int drain_wanted; /* atomic: a mark_volatile waits for that drain (wait_for_handler_drain) */
};

/* cffi: begin (exported to Python; build.py reads these blocks) */
int vr_uffd_handler_new(int signal_number, vr_uffd_handler **out);
int vr_uffd_handler_start(vr_uffd_handler *handler);
void vr_uffd_handler_free(vr_uffd_handler *handler);
int vr_uffd_handler_signal_is_ours(vr_uffd_handler *handler);
int vr_uffd_fault_signal_install(int signal_number, int force);
int vr_uffd_register(vr_region *region);
int vr_uffd_close(vr_region *region);
int vr_uffd_resume(vr_region *region);
int vr_uffd_populate(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_uffd_prefault(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_uffd_rebind_after_fork(vr_region *region, vr_uffd_handler *handler);
void vr_uffd_handler_forget_in_child(vr_uffd_handler *handler);
/* cffi: end */

/* uffd_fault.c: the fault path. Called by the handler thread (lock not held). */
void vr_uffd_handle_pagefault(vr_uffd_handler *handler, uintptr_t address, pid_t tid);
void vr_uffd_collect_verdicts(vr_uffd_handler *handler);
void vr_uffd_drain_lru(vr_uffd_handler *handler);
void vr_uffd_recheck_self_faults(vr_uffd_handler *handler);
void vr_uffd_run_job_on_worker(vr_job *job);
int vr_uffd_regenerate_for_call(vr_region *region, size_t chunk); /* uffd_fault.c: a library call's refill */
/* 1 if the fault signal reaches vrange's handler, 0 if other code replaced it, or -errno. */
int vr_uffd_fault_signal_is_ours(int signal_number);

/* uffd_workers.c: jobs and the worker pool. */
vr_job *vr_uffd_job_new(vr_region *region, size_t chunk_index, pid_t tid, int kind);
void vr_uffd_job_free(vr_job *job);
/* Lock held: queue a job for a worker; -1 if no worker can ever take it (then not queued). */
int vr_uffd_queue_job(vr_uffd_handler *handler, vr_job *job);

/* Block or unblock the fault signal in the calling thread: the handler thread never runs its handler
 * (it is never a faulting thread); a worker must (its regenerator may fault while holding the GIL). */
static inline void vr_uffd_set_fault_signal_mask(const vr_uffd_handler *handler, int how)
{
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, handler->signal_number);
    pthread_sigmask(how, &mask, NULL);
}

#endif /* VRANGE_UFFD_BACKEND_H */
