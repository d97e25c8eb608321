/* The one way native code runs a Python regenerator (vr_python_regenerate, defined by cffi as an
 * extern "Python+C" callback into vrange._backends._regeneration), and what happens around it.
 *
 * GIL: cffi's wrapper takes the GIL if the calling thread does not hold it (a uffd worker, a sigbus
 * handler on a thread that released it) and gives it back afterwards; a thread that faulted while
 * holding the GIL runs the regenerator with it ("at an unsafe point": in the middle of a C operation
 * that assumes nobody else runs; the Python side then suppresses forced GIL switches and warns when
 * another thread ran anyway, see docs/design.md).
 *
 * Interrupts: a KeyboardInterrupt or SystemExit raised while the regenerator runs (Ctrl-C, a signal
 * handler) is not a regenerator failure. The Python side retries the regenerator and reports the
 * interrupt here; it is raised again at the program's next safe point through Py_AddPendingCall
 * (which runs on the main thread, where Python runs signal handlers), after the faulting operation
 * completed. Py_AddPendingCall needs no GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <unistd.h>

#include "gil_switching.h"
#include "python_regenerator.h"

/* Return codes of the Python callback (vrange._backends._regeneration.vr_python_regenerate). RETRY: an
 * interrupt hit vrange's own Python code around the regenerator (a signal's Python handler runs at
 * whatever bytecode comes next): call again, the faulting access must still complete. */
enum { CALLBACK_FAILED = -1, CALLBACK_OK = 0, CALLBACK_OK_INTERRUPTED = 1,
       CALLBACK_FAILED_INTERRUPTED = 2, CALLBACK_RETRY = 3 };
#define CALLBACK_ATTEMPTS 5

/* How deep this thread is in regenerator callbacks, and whether an interrupt is waiting for it to
 * leave them. Initial-exec TLS: no allocation when first used in a signal handler. */
static __thread int regenerator_depth __attribute__((tls_model("initial-exec")));
static __thread int deliver_when_done __attribute__((tls_model("initial-exec")));

static void deliver_later(void);

/* A pending call, on the main thread with the GIL, at a safe point: raise the interrupt there. Not
 * while this thread is inside a regenerator callback (the pending call runs at the next eval-loop
 * check, which may be the entry of the next chunk's regenerator, faulted by the same statement):
 * raised there, cffi would swallow it and the chunk would fail; it waits until the callbacks are
 * done. */
static int raise_deferred_interrupt(void *unused)
{
    (void)unused;
    if (regenerator_depth > 0) {
        deliver_when_done = 1;
        return 0;
    }
    PyObject *module = PyImport_ImportModule("vrange._backends._regeneration");
    if (!module)
        return -1;
    PyObject *result = PyObject_CallMethod(module, "raise_deferred_interrupt", NULL);
    Py_DECREF(module);
    if (!result)
        return -1; /* the interrupt, raised in the program's current frame */
    Py_DECREF(result);
    return 0;
}

static void deliver_later(void)
{
    if (Py_AddPendingCall(raise_deferred_interrupt, NULL) < 0) {
        static const char message[] =
            "vrange: an interrupt that arrived during a regeneration could not be delivered\n";
        (void)!write(STDERR_FILENO, message, sizeof message - 1);
    }
}

static int python_exited;

void vr_python_note_exit(void) { __atomic_store_n(&python_exited, 1, __ATOMIC_RELEASE); }

int vr_python_has_exited(void) { return __atomic_load_n(&python_exited, __ATOMIC_ACQUIRE); }

/* Async-signal-safe: one atomic load of the interpreter's state. */
int vr_python_finalizing(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

static int run_python_regenerator(vr_region *region, uint64_t offset, char *buffer, size_t length,
                                  int at_unsafe_point, int extra_flags)
{
    regenerator_depth++;
    if (at_unsafe_point)
        vr_hold_gil_switches(); /* no forced GIL switch until the faulting operation resumes */
    int flags = (at_unsafe_point ? VR_CALLBACK_AT_UNSAFE_POINT : 0) |
                (regenerator_depth == 1 ? VR_CALLBACK_OUTERMOST : 0) | extra_flags;
    int rc, interrupted = 0;
    for (int attempt = 1;; attempt++) {
        rc = vr_python_regenerate(region->python_handle, offset, buffer, length, flags);
        if (rc != CALLBACK_RETRY)
            break;
        interrupted = 1;
        if (attempt == CALLBACK_ATTEMPTS) {
            rc = CALLBACK_FAILED; /* interrupted every time: fail by policy, still deliver */
            break;
        }
    }
    if (at_unsafe_point)
        vr_release_gil_switches();
    regenerator_depth--;
    if (interrupted || rc == CALLBACK_OK_INTERRUPTED || rc == CALLBACK_FAILED_INTERRUPTED)
        deliver_later();
    if (regenerator_depth == 0 && deliver_when_done) {
        deliver_when_done = 0;
        deliver_later();
    }
    return (rc == CALLBACK_OK || rc == CALLBACK_OK_INTERRUPTED) ? 0 : -1;
}

int vr_run_python_regenerator(vr_region *region, uint64_t offset, char *buffer, size_t length,
                              int at_unsafe_point)
{
    return run_python_regenerator(region, offset, buffer, length, at_unsafe_point, 0);
}

int vr_run_python_regenerator_ahead(vr_region *region, uint64_t offset, char *buffer, size_t length,
                                    int at_unsafe_point)
{
    return run_python_regenerator(region, offset, buffer, length, at_unsafe_point,
                                  VR_CALLBACK_AHEAD);
}

int vr_run_python_regenerator_unless_cancelled(vr_region *region, uint64_t offset, char *buffer,
                                               size_t length, int *state)
{
    /* Take the GIL here rather than in cffi's wrapper, so the job can be claimed with it held: the
     * handler thread may have given up on it while this worker waited (see uffd_backend.h). */
    PyGILState_STATE gil = PyGILState_Ensure();
    int queued = 0;
    int rc;
    if (!__atomic_compare_exchange_n(state, &queued, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        rc = -ECANCELED;
    else
        rc = vr_run_python_regenerator(region, offset, buffer, length, 0);
    PyGILState_Release(gil);
    return rc;
}

/* A thread faulted on a chunk another thread is regenerating: wait until it is done. If this thread
 * holds the GIL, let go of it meanwhile (the other regenerator may need it), and count the wait in
 * `gil_waiters`: the thread is in the middle of a statement that touches the region, so close() must
 * not unmap until it is back (close() checks the count with the GIL held, see Region.close). */
void vr_wait_for_chunk(vr_region *region, size_t chunk)
{
    PyThreadState *saved = NULL;
    if (PyGILState_Check()) {
        __atomic_fetch_add(&region->gil_waiters, 1, __ATOMIC_SEQ_CST);
        saved = PyEval_SaveThread();
    }
    while (vr_chunk_load(region, chunk) & VR_CHUNK_IN_FLIGHT)
        vr_pause_briefly();
    if (saved) {
        PyEval_RestoreThread(saved);
        __atomic_fetch_sub(&region->gil_waiters, 1, __ATOMIC_SEQ_CST);
    }
}
