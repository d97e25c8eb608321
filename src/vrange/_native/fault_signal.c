/* The real-time signal that carries a Python-regenerator fault to the faulting thread.
 *
 * Why: a thread that holds the GIL and touches a missing page is frozen in the kernel until the fault
 * is resolved, so no other thread can take the GIL to run the regenerator. The handler thread sends
 * this signal (with the job in si_value) only to a thread stopped in a user-mode access; the fault
 * wait is interruptible, so the handler below runs on the faulting thread. If that thread holds the
 * GIL, it runs the regenerator itself and resolves the fault, then returns and the access restarts
 * and succeeds. Otherwise it answers "not mine" and a worker takes the GIL instead.
 *
 * Why running Python here is tolerable: the interrupted instruction is a load or store on a vrange
 * region (a memcpy, a numpy inner loop, a bytes() copy), not code inside the allocator or the
 * interpreter's internals holding their locks, so re-entering the interpreter is like a callback from
 * that loop. This stops being safe if vrange memory ever backs interpreter internals (do not put
 * Python objects in a region). SA_NODEFER lets a regenerator that itself faults on a region be served
 * the same way (nested). errno is preserved. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "uffd_backend.h"

static void fault_signal_handler(int signal_number, siginfo_t *info, void *context)
{
    (void)signal_number;
    (void)context;
    int saved_errno = errno;
    if (info->si_code == SI_QUEUE && info->si_pid == getpid() && info->si_value.sival_ptr) {
        vr_job *job = info->si_value.sival_ptr;
        if (job->magic == VR_JOB_MAGIC) {
            vr_handler *handler = job->region->handler;
            int verdict = VR_VERDICT_NOT_MINE;
            if (PyGILState_Check()) {
                vr_run_python_job(job, 1);
                verdict = VR_VERDICT_DONE;
            }
            /* After this store the handler thread may free the job: do not touch it again. */
            __atomic_store_n(&job->verdict, verdict, __ATOMIC_RELEASE);
            vr_handler_notify_verdict(handler);
        }
    }
    errno = saved_errno;
}

/* Install once per process. Refuses (EBUSY) if someone else already handles this signal. */
int vr_fault_signal_install(int signal_number)
{
    struct sigaction current;
    if (sigaction(signal_number, NULL, &current) < 0)
        return -errno;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == fault_signal_handler)
        return 0;
    if (!(current.sa_flags & SA_SIGINFO) && current.sa_handler != SIG_DFL &&
        current.sa_handler != SIG_IGN)
        return -EBUSY;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction != fault_signal_handler)
        return -EBUSY;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = fault_signal_handler;
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(signal_number, &action, NULL) < 0)
        return -errno;
    return 0;
}
