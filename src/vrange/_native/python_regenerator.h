/* Running a region's Python regenerator from native code, and the GIL around it
 * (python_regenerator.c; it keeps other threads out with gil_switching.h). */
#ifndef VRANGE_PYTHON_REGENERATOR_H
#define VRANGE_PYTHON_REGENERATOR_H

#include <stddef.h>
#include <stdint.h>

#include "region.h"

/* Python callback (defined by cffi, extern "Python+C"): fill buf with len bytes of the region at
 * offset. Takes the GIL itself (a no-op when the calling thread holds it). Call it only through
 * vr_run_python_regenerator. `flags`: VR_CALLBACK_* below. */
int vr_python_regenerate(void *python_handle, uint64_t offset, char *buf, size_t len, int flags);
enum {
    VR_CALLBACK_AT_UNSAFE_POINT = 1, /* the thread faulted while holding the GIL */
    VR_CALLBACK_OUTERMOST = 2,       /* no other regenerator callback runs on this thread */
    VR_CALLBACK_AHEAD = 4            /* a chunk filled ahead of a fault: a failure fails no access */
};

/* Run the region's Python regenerator; 0 or -1. `at_unsafe_point`: the calling thread faulted while
 * holding the GIL (no other Python thread may run until the faulting operation completes). */
int vr_run_python_regenerator(vr_region *region, uint64_t offset, char *buffer, size_t length,
                              int at_unsafe_point);
/* The same for a chunk filled ahead of a fault (fill-ahead): its failure is recorded as such, and
 * fails no library call (the walk's own fault on that chunk regenerates it, or fails by policy). */
int vr_run_python_regenerator_ahead(vr_region *region, uint64_t offset, char *buffer, size_t length,
                                    int at_unsafe_point);
/* The same for a worker whose job may be cancelled while it waits for the GIL: takes the GIL, then
 * moves *state from 0 (queued) to 1 (running); -ECANCELED if it was cancelled meanwhile. */
int vr_run_python_regenerator_unless_cancelled(vr_region *region, uint64_t offset, char *buffer,
                                               size_t length, int *state);

/* Python is exiting (atexit ran: vr_sigbus_python_finalized): no fault may take the GIL from now on
 * (a thread that waits for it then may wait for ever). Async-signal-safe. */
void vr_python_note_exit(void);
int vr_python_has_exited(void);
/* The interpreter is finalizing (past every atexit handler): a thread that asks for the GIL from
 * now on is ended by CPython (3.10-3.13) or never gets it. Async-signal-safe. */
int vr_python_finalizing(void);

/* A thread faulted on a chunk another thread is regenerating: wait until it is done, with the GIL
 * released meanwhile if this thread holds it. */
void vr_wait_for_chunk(vr_region *region, size_t chunk);

#endif /* VRANGE_PYTHON_REGENERATOR_H */
