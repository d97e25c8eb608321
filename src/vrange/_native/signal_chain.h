/* Installing a signal handler in front of whatever handled the signal before, and remembering that
 * previous action so signals that are not vrange's can be passed on to it (signal_chain.c).
 *
 * Used by both backends' handlers: SIGBUS (sigbus.c) and the uffd backend's fault signal
 * (uffd_fault.c). How each passes a foreign signal on differs (see their chain_to_previous), so only
 * the installation and the bookkeeping are shared. A signal disposition belongs to the process, so
 * the previous action is process-wide state of the file that owns the handler. */
#ifndef VRANGE_SIGNAL_CHAIN_H
#define VRANGE_SIGNAL_CHAIN_H

#include <signal.h>

typedef void (*vr_signal_action)(int signal_number, siginfo_t *info, void *context);

/* The action a handler replaced, double-buffered: a re-install writes the other slot and then flips
 * the index, so a handler running meanwhile never reads a half-written struct. */
struct vr_previous_action {
    struct sigaction slots[2];
    int index;
};

/* 1 if `handler` is the signal's handler now, 0 if other code replaced it, or -errno. */
int vr_signal_handler_installed(int signal_number, vr_signal_action handler);

/* Install `handler` (sa_flags `flags`, SA_SIGINFO among them), remembering the action it replaces in
 * `previous`. Nothing to do if it is installed already. With `refuse_if_taken`, -EBUSY if other code
 * handles the signal now (neither SIG_DFL nor SIG_IGN). 0 or -errno. */
int vr_signal_install(int signal_number, vr_signal_action handler, int flags, int refuse_if_taken,
                      struct vr_previous_action *previous);

/* The action to pass a foreign signal on to. Async-signal-safe. */
static inline const struct sigaction *vr_previous_action(const struct vr_previous_action *previous)
{
    return &previous->slots[__atomic_load_n(&previous->index, __ATOMIC_ACQUIRE)];
}

#endif /* VRANGE_SIGNAL_CHAIN_H */
