/* Installing a handler in front of the previous one: see signal_chain.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>

#include "signal_chain.h"

static int is_handler(const struct sigaction *action, vr_signal_action handler)
{
    return (action->sa_flags & SA_SIGINFO) && action->sa_sigaction == handler;
}

int vr_signal_handler_installed(int signal_number, vr_signal_action handler)
{
    struct sigaction current;
    if (sigaction(signal_number, NULL, &current) < 0)
        return -errno;
    return is_handler(&current, handler);
}

int vr_signal_install(int signal_number, vr_signal_action handler, int flags, int refuse_if_taken,
                      struct vr_previous_action *previous)
{
    struct sigaction current;
    if (sigaction(signal_number, NULL, &current) < 0)
        return -errno;
    if (is_handler(&current, handler))
        return 0;
    int taken = (current.sa_flags & SA_SIGINFO) ||
                (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN);
    if (taken && refuse_if_taken)
        return -EBUSY;
    int next = 1 - __atomic_load_n(&previous->index, __ATOMIC_ACQUIRE);
    previous->slots[next] = current;
    __atomic_store_n(&previous->index, next, __ATOMIC_RELEASE);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    if (sigaction(signal_number, &action, NULL) < 0)
        return -errno;
    return 0;
}
