/* The sigbus backend: the SIGBUS handler on the faulting thread and the whole fault path (serve_fault,
 * serve_chunk, regenerate), chaining to the previous handler, the table of sigbus regions, and the
 * library calls that populate chunks. A trap (sigbus_uffd_trap.c, sigbus_memfd_trap.c) is reached
 * only through its struct vr_sigbus_trap (see sigbus_backend.h): it says whether a page is missing
 * and refills a chunk with the regenerator this file hands it.
 *
 * Process-wide state, and why it cannot be per region: a signal disposition belongs to the process,
 * so the previous SIGBUS action (for chaining) and the table the handler searches by address are
 * process-wide. The table is an array of atomic pointers; a closing region leaves it, then waits for
 * every handler already running to finish (a grace period) before its memory may be freed.
 *
 * Async-signal-safety: the handler uses syscalls, atomics and the region's own memory. It runs a
 * Python regenerator through cffi (which takes the GIL if this thread does not hold it); see
 * uffd_fault.c for why calling into Python here is tolerable and when it is not. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pressure.h"
#include "python_regenerator.h"
#include "sigbus_backend.h"
#include "signal_chain.h"

#define VR_SIGBUS_MAX_REGIONS 4096
#define GRACE_PERIOD_TIMEOUT_NS (5LL * 1000 * 1000 * 1000)

static vr_region *regions[VR_SIGBUS_MAX_REGIONS];
static int regions_high_water;
/* Handlers between reading the table and taking a reference on the region they found. */
static int lookups_running;
/* The action replaced by ours, to chain to. */
static struct vr_previous_action previous_action;

static pid_t current_tid(void) { return (pid_t)syscall(SYS_gettid); }

/* The region containing `address`, with `active` raised (the caller lowers it), or NULL. Two
 * regions may contain it: close() unmaps a region before it leaves the table, and a region created
 * meanwhile by another thread may take the same address at once. The open one is then the mapping
 * that faulted: serving the closing one would fill the new mapping with the old region's bytes. */
static vr_region *enter_region(uintptr_t address)
{
    vr_region *found = NULL;
    __atomic_fetch_add(&lookups_running, 1, __ATOMIC_ACQ_REL);
    int high = __atomic_load_n(&regions_high_water, __ATOMIC_ACQUIRE);
    for (int i = 0; i < high; i++) {
        vr_region *region = __atomic_load_n(&regions[i], __ATOMIC_ACQUIRE);
        if (!region || address < region->base || address >= region->base + region->size)
            continue;
        if (__atomic_load_n(&region->closing, __ATOMIC_ACQUIRE) == VR_OPEN) {
            found = region;
            break;
        }
        if (!found)
            found = region;
    }
    if (found)
        __atomic_fetch_add(&found->active, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_sub(&lookups_running, 1, __ATOMIC_ACQ_REL);
    return found;
}

static int claim_chunk(vr_region *region, size_t chunk)
{
    uint8_t before = vr_chunk_set(region, chunk, VR_CHUNK_IN_FLIGHT);
    if (before & VR_CHUNK_IN_FLIGHT)
        return 0;
    /* Who regenerates: only a Python regenerator can touch its own chunk (a native source fills a
     * scratch buffer), so only it needs the owner, which costs a gettid() per fault. */
    region->owners[chunk] = region->source_kind == VR_SOURCE_PYTHON ? current_tid() : 0;
    return 1;
}

static void release_chunk(vr_region *region, size_t chunk)
{
    region->owners[chunk] = 0;
    vr_chunk_clear(region, chunk, VR_CHUNK_IN_FLIGHT);
}

/* Fill `buffer` with the chunk's bytes: a Python regenerator (through cffi, which takes the GIL if
 * this thread does not hold it) or a native source. 0, -EIO (the regenerator raised), -ESHUTDOWN
 * (the interpreter is finalizing: Python cannot run any more), or a native source's -errno. If
 * finalizing begins while this thread waits for the GIL, CPython 3.10-3.13 ends the thread here
 * (a forced unwind): the callers let go of what they hold then (let_go_at_thread_exit). */
static int regenerate_chunk(vr_region *region, size_t chunk, char *buffer, int ahead)
{
    if (region->source_kind != VR_SOURCE_PYTHON)
        return vr_fill_native(region, chunk, buffer);
    /* Not vr_python_has_exited: atexit handlers registered before vrange run after its own, with
     * Python whole, and may join a thread that faults here (it must be served). */
    if (vr_python_finalizing())
        return -ESHUTDOWN;
    size_t length = vr_region_chunk_length(region, chunk);
    uint64_t offset = (uint64_t)(chunk * region->chunk_size);
    /* Holding the GIL here means the thread faulted while holding it: an unsafe point. */
    int rc = ahead ? vr_run_python_regenerator_ahead(region, offset, buffer, length,
                                                     PyGILState_Check())
                   : vr_run_python_regenerator(region, offset, buffer, length, PyGILState_Check());
    return rc != 0 ? -EIO : 0;
}

static int regenerate(vr_region *region, size_t chunk, char *buffer)
{
    return regenerate_chunk(region, chunk, buffer, 0);
}

/* A chunk filled ahead of a fault (its failure fails no library call). */
static int regenerate_ahead(vr_region *region, size_t chunk, char *buffer)
{
    return regenerate_chunk(region, chunk, buffer, 1);
}

/* A refill is about to start on a chunk this thread claimed: if it was filled before, the kernel or a
 * purge discarded it (counted as such), and this is a fault served on the faulting thread. */
static void count_refill(vr_region *region, size_t chunk)
{
    vr_region_note_discard_found(region, chunk);
    vr_stat_add(&region->stats.faults_on_faulting_thread, 1);
}

/* After serving a fault on `chunk`: fill the missing chunks after it if this thread is walking
 * forward (vr_region_ahead_window), one signal instead of one per chunk. Claimed like a fault's
 * chunk; a chunk that cannot be claimed, or is not wholly missing, ends the run. A Python
 * regenerator's chunks are claimed one at a time, each just before its regenerator runs: the
 * regenerator may read the chunks after its own (its nested fault must find them unclaimed and be
 * served as usual, not find them claimed by this very thread, which would fail or wait for ever). */
/* What a handler holds while a regenerator runs: chunks [first, end) claimed, and the region entered
 * (`active` raised by enter_region). */
struct held_at_regeneration {
    vr_region *region;
    size_t first, end;
};

/* Run by the forced unwind when CPython ends this thread while it waits for the GIL in a regenerator
 * (the interpreter began finalizing meanwhile: PyThread_exit_thread): let go of the chunks and the
 * region, so that other threads faulting on those chunks are not left waiting for a thread that is
 * gone, and a close does not wait for it. The chunks stay missing. Registered with
 * pthread_cleanup_push, so it runs only then (pthread_cleanup_pop(0) on the ordinary return). */
static void let_go_at_thread_exit(void *arg)
{
    const struct held_at_regeneration *held = arg;
    for (size_t chunk = held->first; chunk < held->end; chunk++)
        release_chunk(held->region, chunk);
    __atomic_fetch_sub(&held->region->active, 1, __ATOMIC_ACQ_REL);
}

static void fill_ahead(vr_region *region, size_t chunk, const struct vr_sigbus_trap *trap)
{
    size_t window = vr_region_ahead_window(region, chunk);
    size_t limit = vr_region_ahead_limit(region);
    if (chunk + 1 + window < limit)
        limit = chunk + 1 + window;
    size_t batch = region->source_kind == VR_SOURCE_PYTHON ? 1 : window;
    for (size_t first = chunk + 1; first < limit;) {
        size_t end = first;
        while (end < limit && end - first < batch && vr_region_chunk_fillable_ahead(region, end) &&
               claim_chunk(region, end))
            end++;
        if (end == first)
            return;
        int rc = -ECANCELED;
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* pairs with vr_region_quiesce */
        if (__atomic_load_n(&region->closing, __ATOMIC_SEQ_CST) == VR_OPEN) {
            for (size_t ahead = first; ahead < end; ahead++)
                vr_region_note_discard_found(region, ahead); /* filled before: the kernel took it */
            vr_region_ahead_filled(region, end);
            /* A chunk left missing faults as usual. */
            struct held_at_regeneration held = { region, first, end };
            pthread_cleanup_push(let_go_at_thread_exit, &held);
            rc = trap->fill_ahead(region, first, end, regenerate_ahead);
            pthread_cleanup_pop(0);
            if (rc == -EIO)
                vr_stat_add(&region->stats.regeneration_errors, 1);
        }
        for (size_t ahead = first; ahead < end; ahead++)
            release_chunk(region, ahead);
        if (rc != 0)
            return;
        first = end;
    }
}

/* serve_fault's answer for a thread without the GIL that needs a Python regenerator once the
 * interpreter is finalizing (every atexit handler has run: the threads left are daemon threads or
 * threads Python does not know): the regenerator can never run, and failing by policy would kill
 * the process with SIGBUS as it exits. The thread waits instead, as a daemon thread waiting for the
 * GIL does, until the exit ends it. */
#define PARK_FOR_EXIT 2

/* Wait, with every signal blocked, until the process exits. Async-signal-safe (sigsuspend). */
static void park_until_exit(void)
{
    sigset_t all;
    sigfillset(&all);
    for (;;)
        sigsuspend(&all);
}

/* Serve a SIGBUS on a missing page: 1 if the access may restart, 0 to chain to the previous
 * handler, PARK_FOR_EXIT. Called with the region entered (`active` raised). */
static int serve_chunk(vr_region *region, uintptr_t address, const struct vr_sigbus_trap *trap)
{
    size_t chunk = (address - region->base) / region->chunk_size;
    if (vr_chunk_load(region, chunk) & VR_CHUNK_POISONED)
        return 0; /* its regeneration failed: the access raises SIGBUS until a pin retries it */
    if (!claim_chunk(region, chunk)) {
        if (region->owners[chunk] == current_tid())
            return 0; /* a regenerator touching the chunk it is regenerating: fail, never hang */
        vr_wait_for_chunk(region, chunk);
        return 1;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* pairs with vr_region_quiesce */
    int closing = __atomic_load_n(&region->closing, __ATOMIC_SEQ_CST);
    if (closing == VR_CLOSED || (closing == VR_CLOSING && !PyGILState_Check()) ||
        !trap->page_missing(region, chunk, address)) {
        release_chunk(region, chunk); /* closing, or filled meanwhile: restart the access */
        return 1;
    }
    count_refill(region, chunk);
    int handled = 1;
    int refilled;
    struct held_at_regeneration held = { region, chunk, chunk + 1 };
    pthread_cleanup_push(let_go_at_thread_exit, &held);
    refilled = trap->refill(region, chunk, regenerate);
    pthread_cleanup_pop(0);
    if (refilled != 0) {
        if (region->source_kind == VR_SOURCE_PYTHON && vr_python_finalizing() &&
            !PyGILState_Check()) {
            release_chunk(region, chunk);
            return PARK_FOR_EXIT;
        }
        vr_stat_add(&region->stats.regeneration_errors, 1);
        switch (region->on_error) {
        case VR_ON_ERROR_ZEROS:
            handled = trap->refill(region, chunk, NULL) == 0;
            vr_chunk_set(region, chunk, VR_CHUNK_FAILED); /* zeros, not the region's bytes */
            break;
        case VR_ON_ERROR_POISON:
            vr_chunk_set(region, chunk, VR_CHUNK_POISONED);
            handled = 0;
            break;
        default:
            vr_abort_for_policy();
        }
    }
    release_chunk(region, chunk);
    if (handled && !(vr_chunk_load(region, chunk) & VR_CHUNK_FAILED))
        fill_ahead(region, chunk, trap);
    return handled;
}

/* Populate path (a library call, GIL released): regenerate the chunk on this thread if it has
 * missing pages. 0, 1 (another thread held it: look again), or -errno (the regeneration failed). */
static int populate_chunk(vr_region *region, size_t chunk, const struct vr_sigbus_trap *trap)
{
    if (!trap->chunk_missing(region, chunk))
        return 0;
    if (!claim_chunk(region, chunk)) {
        vr_wait_for_chunk(region, chunk);
        return 1;
    }
    int rc = 0;
    if (trap->chunk_missing(region, chunk)) {
        count_refill(region, chunk);
        rc = trap->refill(region, chunk, regenerate);
        if (rc != 0)
            vr_stat_add(&region->stats.regeneration_errors, 1);
    }
    release_chunk(region, chunk);
    return rc;
}

/* 1: the access may restart; 0: this SIGBUS must go to the previous handler (the process dies
 * with SIGBUS unless that handler says otherwise). */
static int serve_fault(vr_region *region, uintptr_t address)
{
    if (__atomic_load_n(&region->closing, __ATOMIC_ACQUIRE) == VR_CLOSING && !PyGILState_Check()) {
        /* close() is draining: start nothing new for a thread without the GIL (its access is
         * through a pointer close() cannot see). Wait until the region is open again or unmapped;
         * the access then restarts (and faults as on any unmapped address). A thread that holds
         * the GIL is served instead: its statement began before close(), which cannot unmap until
         * it gets the GIL back, and letting the GIL go here would let close() unmap under the
         * statement (SIGSEGV when it resumes). */
        while (__atomic_load_n(&region->closing, __ATOMIC_ACQUIRE) == VR_CLOSING)
            vr_pause_briefly();
        return 1;
    }
    return serve_chunk(region, address, region->trap_kind == VR_TRAP_UFFD ? &vr_sigbus_uffd_trap
                                                                          : &vr_sigbus_memfd_trap);
}

/* The default action: restore it and let the fault happen again (a sent signal is raised again
 * instead). The process dies with SIGBUS, as it would have without vrange. */
static void take_default_action(int signal_number, const siginfo_t *info)
{
    struct sigaction default_action;
    memset(&default_action, 0, sizeof default_action);
    default_action.sa_handler = SIG_DFL;
    sigaction(signal_number, &default_action, NULL);
    if (info->si_code <= 0)
        raise(signal_number);
}

/* How deep this thread is in chain_to_previous. Initial-exec TLS: no allocation on first use (the
 * general-dynamic model may call malloc, which a signal handler must not). */
static __thread int chain_depth __attribute__((tls_model("initial-exec")));

static void chain_to_previous(int signal_number, siginfo_t *info, void *context)
{
    if (chain_depth > 0) {
        /* The previous handler sent the signal back to us (faulthandler restores the handler it
         * replaced, ours, and raises again): do not loop, take the default action. */
        take_default_action(signal_number, info);
        return;
    }
    const struct sigaction *previous = vr_previous_action(&previous_action);
    chain_depth++;
    if (previous->sa_flags & SA_SIGINFO)
        previous->sa_sigaction(signal_number, info, context);
    else if (previous->sa_handler == SIG_IGN && info->si_code <= 0)
        ; /* a sent SIGBUS that was ignored before vrange: still ignored */
    else if (previous->sa_handler == SIG_DFL || previous->sa_handler == SIG_IGN)
        take_default_action(signal_number, info); /* a real fault cannot be ignored */
    else
        previous->sa_handler(signal_number);
    chain_depth--;
}

/* How many SIGBUS handlers this thread is inside (a regenerator may close a region). */
static __thread int handler_depth __attribute__((tls_model("initial-exec")));

static void sigbus_handler(int signal_number, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    handler_depth++;
    int handled = 0;
    if (info->si_code == BUS_ADRERR) {
        vr_region *region = enter_region((uintptr_t)info->si_addr);
        if (region) {
            handled = serve_fault(region, (uintptr_t)info->si_addr);
            __atomic_fetch_sub(&region->active, 1, __ATOMIC_ACQ_REL);
            if (handled == PARK_FOR_EXIT)
                park_until_exit(); /* the region is left first: closing it never waits for us */
        }
    }
    handler_depth--;
    if (!handled)
        chain_to_previous(signal_number, info, context);
    errno = saved_errno;
}

/* Install the handler, remembering the current action to chain to. Called again after someone
 * replaced our handler: we go back in front and chain to the replacement. */
int vr_sigbus_install(void)
{
    /* SA_NODEFER: a regenerator that touches another purged chunk takes a nested SIGBUS. No
     * SA_ONSTACK: a Python regenerator needs the thread's real stack, not a small alternate one. */
    return vr_signal_install(SIGBUS, sigbus_handler, SA_SIGINFO | SA_NODEFER, 0, &previous_action);
}

/* 1: our handler is in place; 0: someone replaced it since (purged chunks would then crash). */
int vr_sigbus_handler_is_ours(void)
{
    return vr_signal_handler_installed(SIGBUS, sigbus_handler);
}

/* The watchdog, called by the pressure monitor's thread at every wake-up: while sigbus regions are
 * open, put vrange's handler back in front if other code replaced it since (on the userfaultfd trap
 * the kernel makes pages missing without any vrange call that could notice). 1 if it re-installed,
 * 0 if nothing was to do, or -errno. */
int vr_sigbus_reinstall_if_replaced(void)
{
    int high = __atomic_load_n(&regions_high_water, __ATOMIC_ACQUIRE), open_regions = 0;
    for (int i = 0; i < high && !open_regions; i++)
        open_regions = __atomic_load_n(&regions[i], __ATOMIC_ACQUIRE) != NULL;
    if (!open_regions || vr_sigbus_handler_is_ours() == 1)
        return 0;
    int rc = vr_sigbus_install();
    return rc < 0 ? rc : 1;
}

void vr_sigbus_python_finalized(void) { vr_python_note_exit(); }

int vr_sigbus_attach(vr_region *region, int trap_kind, int trap_uffd)
{
    const struct vr_sigbus_trap *trap = trap_kind == VR_TRAP_UFFD    ? &vr_sigbus_uffd_trap
                                        : trap_kind == VR_TRAP_MEMFD ? &vr_sigbus_memfd_trap
                                                                     : NULL;
    if (!trap)
        return -EINVAL;
    int rc = trap->attach(region, trap_uffd);
    if (rc < 0)
        return rc;
    region->trap_kind = trap_kind;
    /* The pressure monitor's thread runs the watchdog at every wake-up from now on. */
    vr_monitor_set_watchdog(vr_sigbus_reinstall_if_replaced);
    for (int i = 0; i < VR_SIGBUS_MAX_REGIONS; i++) {
        vr_region *expected = NULL;
        if (__atomic_compare_exchange_n(&regions[i], &expected, region, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            int high = __atomic_load_n(&regions_high_water, __ATOMIC_ACQUIRE);
            while (high < i + 1 && !__atomic_compare_exchange_n(&regions_high_water, &high, i + 1, 0,
                                                                 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                ;
            region->registered = 1;
            return 0;
        }
    }
    return -EMFILE;
}

/* After the mapping is gone: leave the table, then wait for the handlers that may have found this
 * region to leave it. -EBUSY if they did not within 5 s (a handler is stuck in a regenerator), or
 * when called from inside a handler: the caller must then never free the region. */
int vr_sigbus_detach(vr_region *region)
{
    __atomic_store_n(&region->closing, VR_CLOSED, __ATOMIC_RELEASE);
    if (region->registered) {
        for (int i = 0; i < VR_SIGBUS_MAX_REGIONS; i++) {
            vr_region *expected = region;
            if (__atomic_compare_exchange_n(&regions[i], &expected, NULL, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE))
                break;
        }
        region->registered = 0;
    }
    if (region->trap_fd >= 0) {
        close(region->trap_fd);
        region->trap_fd = -1;
    }
    if (handler_depth > 0)
        return -EBUSY; /* called from inside a handler (a regenerator): waiting would wait on us;
                        * Python frees it later, once vr_sigbus_idle says so */
    /* Lookups are short (no blocking inside): once none runs, no handler can still find us. */
    while (__atomic_load_n(&lookups_running, __ATOMIC_ACQUIRE) > 0)
        vr_pause_briefly();
    int64_t deadline = vr_monotonic_ns() + GRACE_PERIOD_TIMEOUT_NS;
    while (__atomic_load_n(&region->active, __ATOMIC_ACQUIRE) > 0) {
        if (vr_monotonic_ns() > deadline)
            return -ETIMEDOUT;
        vr_pause_briefly();
    }
    return 0;
}

/* 1 if a detached region may be freed now: no handler can find it or is inside it. Not from a
 * handler. */
int vr_sigbus_idle(vr_region *region)
{
    return handler_depth == 0 && __atomic_load_n(&lookups_running, __ATOMIC_ACQUIRE) == 0 &&
           __atomic_load_n(&region->active, __ATOMIC_ACQUIRE) == 0;
}

/* close() found the region still exported: open it again. */
void vr_sigbus_resume(vr_region *region)
{
    __atomic_store_n(&region->closing, VR_OPEN, __ATOMIC_RELEASE);
}

/* In a forked child: threads that were in a handler or regenerating in the parent do not exist
 * here (call for every live region). */
void vr_sigbus_after_fork(vr_region *region)
{
    __atomic_store_n(&lookups_running, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&region->active, 0, __ATOMIC_RELEASE);
    for (size_t chunk = 0; chunk < region->chunk_count; chunk++)
        if (vr_chunk_load(region, chunk) & VR_CHUNK_IN_FLIGHT)
            release_chunk(region, chunk);
    for (int slot = 0; slot < VR_SCRATCH_SLOTS; slot++)
        __atomic_store_n(&region->scratch_busy[slot], 0, __ATOMIC_RELEASE);
}

/* --- populating (library calls, GIL released) ---------------------------------------------------- */

#define PIN_RETRIES 1000 /* reclaim racing a pin: each retry refills what was taken meanwhile */

/* Regenerate every missing chunk of the range on this thread (memfd trap; called with the GIL
 * released). Returns 0, or the first failure's -errno (-EIO: a Python regenerator raised) after
 * trying every chunk; failed chunks stay missing. */
int vr_sigbus_memfd_populate(vr_region *region, size_t first_chunk, size_t end_chunk)
{
    int first_error = 0;
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        int rc;
        while ((rc = populate_chunk(region, chunk, &vr_sigbus_memfd_trap)) == 1)
            ;
        if (rc < 0 && !first_error)
            first_error = rc;
    }
    return first_error;
}

/* Make every page of the range present (regenerating chunks with missing pages on this thread) and,
 * with `dirty`, no longer discardable (mark_nonvolatile; the chunks' VOLATILE bits are already
 * cleared). Userfaultfd trap; called with the GIL released. Returns 0, or the first failure's -errno
 * after trying every chunk; a chunk whose regeneration failed keeps its missing pages. */
int vr_sigbus_uffd_populate(vr_region *region, size_t first_chunk, size_t end_chunk, int dirty)
{
    const struct vr_sigbus_trap *trap = &vr_sigbus_uffd_trap;
    if (dirty && first_chunk < end_chunk) {
        /* The common pin: every page present. One MADV_POPULATE_WRITE over the range dirties it
         * all (no page of it may be discarded any more), instead of a mincore and a populate per
         * chunk. A missing page fails it with EFAULT (the trap's SIGBUS mode), Linux < 5.14 with
         * EINVAL: the pages it reached are dirtied all the same, and the loop below does the rest
         * chunk by chunk. */
        uintptr_t start;
        size_t length;
        vr_region_span(region, first_chunk, end_chunk, &start, &length);
        if (madvise((void *)start, length, MADV_POPULATE_WRITE) == 0)
            return 0;
    }
    int first_error = 0;
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        int rc = 0;
        for (int attempt = 0; attempt < PIN_RETRIES; attempt++) {
            rc = populate_chunk(region, chunk, trap);
            if (rc == 1)
                continue; /* another thread was filling it */
            if (rc < 0)
                break;
            rc = dirty ? trap->dirty(region, chunk) : 0;
            if (rc != -EFAULT)
                break; /* -EFAULT: a lazy-free page was reclaimed before it was dirtied */
        }
        if (rc != 0 && !first_error)
            first_error = rc;
    }
    return first_error;
}
