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
#include <ucontext.h>
#include <unistd.h>

#include "python_regenerator.h"
#include "signal_chain.h"
#include "uffd_backend.h"

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
            vr_handler *handler = job->region->handler;
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
                vr_run_python_job(job, 1);
            } else {
                verdict = VR_VERDICT_NOT_MINE;
            }
            /* After this store the handler thread may free the job: do not touch it again. */
            __atomic_store_n(&job->verdict, verdict, __ATOMIC_RELEASE);
            vr_handler_notify_verdict(handler);
        }
    }
    errno = saved_errno;
}

int vr_fault_signal_is_ours(int signal_number)
{
    return vr_signal_handler_installed(signal_number, fault_signal_handler);
}

/* Install once per process. Refuses (EBUSY) if someone else already handles this signal, unless
 * `force` (vrange's own handler was replaced after it was installed: take the signal back, and pass
 * the replacement's own signals on to it). SA_NODEFER: see the top of this file. */
int vr_fault_signal_install(int signal_number, int force)
{
    return vr_signal_install(signal_number, fault_signal_handler,
                             SA_SIGINFO | SA_NODEFER | SA_RESTART, !force, &previous_action);
}
