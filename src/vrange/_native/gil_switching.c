/* Keeping other Python threads out while a regenerator runs at an unsafe point.
 *
 * A thread that faulted while holding the GIL is in the middle of a C operation that assumes no other
 * Python thread runs until it completes. A regenerator that never lets the GIL go itself can still
 * lose it: a thread waiting for the GIL asks for it after every switch interval (5 ms), and the eval
 * loop running the regenerator hands it over. Raising the switch interval through sys.setswitchinterval
 * is not enough (measured): a waiter already in its timed wait still times out and asks, and a request
 * already made still goes through. So, under the GIL's own mutex, this raises the interval, counts a
 * switch (a waiter asks only if no switch happened during its wait), withdraws a pending request and
 * wakes the waiters, which then wait again with the long interval. The interval is bounded (1 s): a
 * regenerator that lets the GIL go anyway (I/O, sleep) must get it back in bounded time.
 *
 * This needs CPython's internal GIL state, whose layout is version-specific: implemented for CPython
 * 3.11 (the version this build targets is checked at compile time); elsewhere it does nothing and
 * vrange only detects and warns (see vrange/_backends/_regeneration.py). Must be called with the GIL held.
 *
 * Called in a signal handler (the faulting thread's): taking the GIL's mutex there is safe because
 * the handler interrupted an access to vrange memory (uffd_fault.c checks the exact pc; a SIGBUS
 * is raised by that access), never code inside take_gil/drop_gil, the only holders of that mutex. */
#include <patchlevel.h> /* PY_VERSION_HEX, before Python.h: the internal headers need a define first */

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
#define VR_CAN_HOLD_GIL 1
#define Py_BUILD_CORE_MODULE 1 /* this file only: the internal GIL state */
#endif

#include <Python.h>

#ifdef VR_CAN_HOLD_GIL
#include "internal/pycore_interp.h"
#include "internal/pycore_runtime.h"
#include <pthread.h>
#endif

#include "gil_switching.h"

#define HELD_SWITCH_INTERVAL_US 1000000UL

/* Only the GIL holder reads or writes these. */
static int holds;
static unsigned long saved_interval;

#ifdef VR_CAN_HOLD_GIL
static void set_interval_and_wake(unsigned long interval, int withdraw_requests)
{
    struct _gil_runtime_state *gil = &_PyRuntime.ceval.gil;
    pthread_mutex_lock(&gil->mutex);
    if (withdraw_requests) {
        saved_interval = gil->interval;
        gil->switch_number++; /* every waiter's current wait now ends without asking */
        _Py_atomic_store_relaxed(&PyInterpreterState_Get()->ceval.gil_drop_request, 0);
    }
    gil->interval = interval;
    pthread_cond_broadcast(&gil->cond); /* waiters start their next wait with the new interval */
    pthread_mutex_unlock(&gil->mutex);
}
#endif

int vr_gil_switches_can_be_held(void)
{
#ifdef VR_CAN_HOLD_GIL
    return 1;
#else
    return 0;
#endif
}

void vr_hold_gil_switches(void)
{
#ifdef VR_CAN_HOLD_GIL
    if (holds++ == 0)
        set_interval_and_wake(HELD_SWITCH_INTERVAL_US, 1);
#endif
}

void vr_release_gil_switches(void)
{
#ifdef VR_CAN_HOLD_GIL
    if (--holds == 0)
        set_interval_and_wake(saved_interval, 0);
#endif
}
