/* The userfaultfd backend: regions, the fault handler, and the jobs that carry a fault to whoever
 * can regenerate it.
 *
 * One handler per process (created by Python, passed to every call: no C global holds it) owns one
 * userfaultfd and one C thread that reads its events. A fault on a region with a native source is
 * served on that thread without the GIL. A fault on a region with a Python regenerator becomes a job:
 *   - the faulting thread is in a user-mode access (/proc/self/task/<tid>/syscall says -1): the
 *     handler sends it a real-time signal carrying the job; the signal handler runs on the faulting
 *     thread and, if that thread holds the GIL, runs the regenerator right there (fault_signal.c);
 *     otherwise it answers "not mine";
 *   - otherwise (a fault inside a syscall, a "not mine", a thread with the signal blocked) the job
 *     goes to a pool of C worker threads that take the GIL to run the regenerator. The pool grows
 *     when every worker is busy, so a regenerator that itself makes a syscall touching another
 *     region (which needs a second worker) cannot deadlock.
 * The handler thread itself never takes the GIL and never blocks on anything but poll(), so it
 * always keeps reading events (a thread holding the GIL and faulting is served by the signal). */
#ifndef VRANGE_UFFD_BACKEND_H
#define VRANGE_UFFD_BACKEND_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#include "common.h"

#define VR_MAX_WORKERS 16

enum vr_source_kind { VR_SOURCE_ZEROS = 0, VR_SOURCE_FILE = 1, VR_SOURCE_PYTHON = 2 };
enum vr_on_error { VR_ON_ERROR_POISON = 0, VR_ON_ERROR_ZEROS = 1, VR_ON_ERROR_ABORT = 2 };

/* Per-chunk state bits (one byte per chunk, updated with atomics from several threads). */
#define VR_CHUNK_VOLATILE 0x01     /* marked volatile: the kernel (or purge) may discard it */
#define VR_CHUNK_MATERIALIZED 0x02 /* filled at least once: a later fault means it was purged */
#define VR_CHUNK_PURGED 0x04       /* purged since it was last marked volatile */
#define VR_CHUNK_POISONED 0x08     /* regeneration failed; missing pages hold poison markers */
#define VR_CHUNK_IN_FLIGHT 0x10    /* a job is regenerating it: more faults on it just wait */

struct vr_stats {
    uint64_t faults_on_handler_thread;  /* native source, served by the handler thread */
    uint64_t faults_on_faulting_thread; /* Python regenerator run in the signal handler */
    uint64_t faults_on_worker_thread;   /* Python regenerator run by a GIL-taking worker */
    uint64_t bytes_regenerated;
    uint64_t regeneration_errors;
    uint64_t purges; /* chunks purged (explicitly or found discarded by the kernel) */
};

typedef struct vr_handler vr_handler;
typedef struct vr_region vr_region;

struct vr_region {
    uintptr_t base;
    size_t size;
    size_t chunk_size;
    size_t chunk_count;
    size_t page_size;
    int source_kind;
    int file_fd;
    int64_t file_offset;
    void *python_handle; /* cffi handle of the Python Region, for vr_python_regenerate */
    int on_error;
    uint8_t *chunk_state;
    struct vr_stats stats;
    int refcount; /* the handler's table and every job in flight hold one */
    int registered;
    vr_handler *handler;
};

#define VR_JOB_MAGIC 0x76726a6fU

enum vr_job_verdict { VR_VERDICT_PENDING = 0, VR_VERDICT_DONE = 1, VR_VERDICT_NOT_MINE = 2 };

typedef struct vr_job vr_job;
struct vr_job {
    uint32_t magic; /* checked by the signal handler: a queued signal may come from elsewhere */
    vr_region *region;
    size_t chunk_index;
    pid_t faulting_tid;
    int verdict; /* written by the signal handler, read by the handler thread */
    char *buffer;
    vr_job *next;
};

struct vr_handler {
    int uffd;
    int wake_fd; /* eventfd: signal verdicts and shutdown */
    int signal_number;
    int stopping;
    pthread_t thread;
    int thread_started;
    pid_t owner_pid;
    pthread_mutex_t lock; /* regions, jobs, queue, worker counts */
    vr_region **regions;
    size_t region_count, region_capacity;
    vr_job *signalled; /* jobs sent to faulting threads, awaiting a verdict */
    vr_job *queue_head, *queue_tail; /* jobs for the workers */
    pthread_cond_t work_ready;
    int workers_total, workers_idle;
    pthread_t workers[VR_MAX_WORKERS];
    char *staging; /* handler thread only: native fills */
    size_t staging_size;
    uint64_t features;
};

/* Python callback (defined by cffi, extern "Python+C"): fill buf with len bytes of the region at
 * offset. Takes the GIL itself (a no-op when the calling thread holds it). 0 or -1. */
int vr_python_regenerate(void *python_handle, uint64_t offset, char *buf, size_t len);

/* uffd_handler.c */
int vr_handler_new(int signal_number, vr_handler **out);
int vr_handler_start(vr_handler *handler);
int vr_handler_stop(vr_handler *handler);
void vr_handler_free(vr_handler *handler);
void vr_handler_notify_verdict(vr_handler *handler);

/* uffd_region.c */
int vr_region_new(vr_handler *handler, uintptr_t base, size_t size, size_t chunk_size,
                  int source_kind, int file_fd, int64_t file_offset, void *python_handle,
                  int on_error, vr_region **out);
int vr_region_register(vr_region *region);
int vr_region_close(vr_region *region);
int vr_region_references(vr_region *region);
void vr_region_release(vr_region *region);
int vr_region_mark_volatile(vr_region *region, size_t first_chunk, size_t end_chunk);
int64_t vr_region_purge(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_region_discard(vr_region *region, size_t first_chunk, size_t end_chunk, int only_poisoned);
int vr_region_populate(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_region_finish_nonvolatile(vr_region *region, size_t first_chunk, size_t end_chunk,
                                 uint8_t *purged_out);
int vr_region_chunk_states(vr_region *region, uint8_t *states_out);
int vr_region_residency(vr_region *region, uint8_t *pages_out);
void vr_region_stats(vr_region *region, struct vr_stats *out);
int vr_region_rebind_after_fork(vr_region *region, vr_handler *handler);
int vr_pageout(uintptr_t address, size_t length);

/* internal to the backend */
void vr_region_ref(vr_region *region);
void vr_region_unref(vr_region *region);
size_t vr_region_chunk_length(const vr_region *region, size_t chunk_index);
int vr_resolve_chunk(vr_region *region, size_t chunk_index, const char *source);
int vr_fail_chunk(vr_region *region, size_t chunk_index);
int vr_fill_native(vr_region *region, size_t chunk_index, char *buffer);
void vr_run_python_job(vr_job *job, int on_faulting_thread);

/* fault_signal.c */
int vr_fault_signal_install(int signal_number);

#endif /* VRANGE_UFFD_BACKEND_H */
