/* Isolated regenerators: the Python regenerator runs in a helper process, outside this process's
 * GIL. A fault is served by sending the helper a request on a socket of its own (one per slot) and
 * waiting for the answer; the helper fills the slot's part of a shared memfd, which is copied into
 * the chunk. The faulting thread never runs Python and never lets its GIL go, so the operation that
 * faulted stays atomic for every other Python thread (see docs/design.md).
 *
 * Async-signal-safety and GIL: vr_isolated_fill uses send/poll/recv/kill/memcpy and atomics only; it
 * runs on the uffd handler thread or in the SIGBUS handler of the faulting thread, without the GIL.
 * A helper that does not answer within the timeout is killed and marked dead; every fault then fails
 * by the region's policy until Python starts a new helper (at the next library call). Python swaps
 * helpers only while it holds every slot, so no fault ever talks to a half-replaced helper. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "clock.h"
#include "isolated.h"

struct vr_isolated {
    size_t slot_size;
    char *shared; /* VR_ISOLATED_SLOTS * slot_size, MAP_SHARED over the memfd */
    int fds[VR_ISOLATED_SLOTS];
    int busy[VR_ISOLATED_SLOTS];
    int helper_pid;
    int dead;
    int timeout_ms;
    char last_error[VR_ISOLATED_ERROR_BYTES];
    size_t last_error_length;
};

struct request {
    uint64_t offset;
    uint64_t length;
};

struct reply_header {
    int32_t status; /* 0: filled; 1: the regenerator raised (the text follows) */
    uint32_t text_length;
};

int vr_isolated_new(int memfd, size_t slot_size, int timeout_ms, vr_isolated **out)
{
    vr_isolated *isolated = calloc(1, sizeof *isolated);
    if (!isolated)
        return -ENOMEM;
    isolated->shared = mmap(NULL, slot_size * VR_ISOLATED_SLOTS, PROT_READ | PROT_WRITE,
                            MAP_SHARED, memfd, 0);
    if (isolated->shared == MAP_FAILED) {
        int saved = errno;
        free(isolated);
        return -saved;
    }
    isolated->slot_size = slot_size;
    isolated->timeout_ms = timeout_ms;
    isolated->dead = 1; /* until a helper is set */
    for (int slot = 0; slot < VR_ISOLATED_SLOTS; slot++)
        isolated->fds[slot] = -1;
    *out = isolated;
    return 0;
}

/* Python, before swapping the helper: wait until every slot is free and take them all. Called with
 * the GIL released. -ETIMEDOUT if a fault kept one longer than the timeout (it cannot: a fault gives
 * up after the timeout). */
int vr_isolated_claim_all(vr_isolated *isolated, int timeout_ms)
{
    int64_t deadline = vr_deadline_ns(timeout_ms);
    for (int slot = 0; slot < VR_ISOLATED_SLOTS; slot++) {
        while (__atomic_exchange_n(&isolated->busy[slot], 1, __ATOMIC_ACQUIRE)) {
            if (vr_monotonic_ns() > deadline) {
                for (int taken = 0; taken < slot; taken++)
                    __atomic_store_n(&isolated->busy[taken], 0, __ATOMIC_RELEASE);
                return -ETIMEDOUT;
            }
            vr_pause_briefly();
        }
    }
    return 0;
}

/* With every slot claimed: the new helper's pid and its sockets (the old ones are closed). */
void vr_isolated_set_helper(vr_isolated *isolated, int pid, const int *fds)
{
    for (int slot = 0; slot < VR_ISOLATED_SLOTS; slot++) {
        if (isolated->fds[slot] >= 0)
            close(isolated->fds[slot]);
        isolated->fds[slot] = fds[slot];
    }
    isolated->helper_pid = pid;
    __atomic_store_n(&isolated->dead, 0, __ATOMIC_RELEASE);
}

void vr_isolated_release_all(vr_isolated *isolated)
{
    for (int slot = 0; slot < VR_ISOLATED_SLOTS; slot++)
        __atomic_store_n(&isolated->busy[slot], 0, __ATOMIC_RELEASE);
}

int vr_isolated_dead(vr_isolated *isolated) { return __atomic_load_n(&isolated->dead, __ATOMIC_ACQUIRE); }

int vr_isolated_helper_pid(vr_isolated *isolated) { return isolated->helper_pid; }

size_t vr_isolated_last_error(vr_isolated *isolated, char *out, size_t size)
{
    size_t length = __atomic_load_n(&isolated->last_error_length, __ATOMIC_ACQUIRE);
    if (length > size)
        length = size;
    memcpy(out, isolated->last_error, length);
    return length;
}

/* After fork, in the child: the shared mapping is the parent's memfd (its helper writes there); map
 * the child's own instead. The child is single-threaded here. */
int vr_isolated_remap(vr_isolated *isolated, int memfd)
{
    char *fresh = mmap(NULL, isolated->slot_size * VR_ISOLATED_SLOTS, PROT_READ | PROT_WRITE,
                       MAP_SHARED, memfd, 0);
    if (fresh == MAP_FAILED)
        return -errno;
    munmap(isolated->shared, isolated->slot_size * VR_ISOLATED_SLOTS);
    isolated->shared = fresh;
    return 0;
}

/* The source is gone (no region uses it any more): close the sockets and unmap. */
void vr_isolated_free(vr_isolated *isolated)
{
    vr_isolated_forget_helper(isolated);
    munmap(isolated->shared, isolated->slot_size * VR_ISOLATED_SLOTS);
    free(isolated);
}

/* In a forked child: the helper and its sockets belong to the parent. Drop them (without killing
 * the parent's helper); Python starts the child's own. */
void vr_isolated_forget_helper(vr_isolated *isolated)
{
    for (int slot = 0; slot < VR_ISOLATED_SLOTS; slot++) {
        if (isolated->fds[slot] >= 0)
            close(isolated->fds[slot]);
        isolated->fds[slot] = -1;
        isolated->busy[slot] = 0;
    }
    isolated->helper_pid = 0;
    isolated->dead = 1;
}

static void give_up(vr_isolated *isolated)
{
    __atomic_store_n(&isolated->dead, 1, __ATOMIC_RELEASE);
    if (isolated->helper_pid > 0)
        kill(isolated->helper_pid, SIGKILL); /* hung or confused: the next helper starts clean */
}

int vr_isolated_fill(vr_isolated *isolated, uint64_t offset, char *buffer, size_t length)
{
    if (length > isolated->slot_size)
        return -EINVAL;
    /* Waiting for a free slot is not the helper's fault: each slot is busy for at most one timeout,
     * so a slot frees up within that (plus the time of a kill), and nobody is killed for queueing. */
    int64_t slot_deadline = vr_deadline_ns(2 * (int64_t)isolated->timeout_ms);
    int slot = -1;
    while (slot < 0) {
        if (__atomic_load_n(&isolated->dead, __ATOMIC_ACQUIRE))
            return -EPIPE;
        for (int candidate = 0; candidate < VR_ISOLATED_SLOTS && slot < 0; candidate++)
            if (!__atomic_exchange_n(&isolated->busy[candidate], 1, __ATOMIC_ACQUIRE))
                slot = candidate;
        if (slot < 0) {
            if (vr_monotonic_ns() > slot_deadline)
                return -EBUSY;
            vr_pause_briefly();
        }
    }
    /* The timeout is the helper's answer time for this request alone (it serves every slot at
     * once, one thread each). */
    int64_t deadline = vr_deadline_ns(isolated->timeout_ms);
    int rc = 0;
    int fd = isolated->fds[slot];
    struct request request = { .offset = offset, .length = length };
    if (__atomic_load_n(&isolated->dead, __ATOMIC_ACQUIRE)) {
        rc = -EPIPE;
    } else if (send(fd, &request, sizeof request, MSG_NOSIGNAL) != (ssize_t)sizeof request) {
        give_up(isolated);
        rc = -EPIPE;
    } else {
        for (;;) {
            int64_t left_ms = (deadline - vr_monotonic_ns()) / 1000000;
            struct pollfd wait = { .fd = fd, .events = POLLIN };
            int ready = left_ms > 0 ? poll(&wait, 1, (int)left_ms) : 0;
            if (ready < 0 && errno == EINTR)
                continue;
            if (ready <= 0) {
                give_up(isolated);
                rc = -ETIMEDOUT;
                break;
            }
            char message[sizeof(struct reply_header) + VR_ISOLATED_ERROR_BYTES];
            ssize_t got = recv(fd, message, sizeof message, 0);
            if (got < 0 && errno == EINTR)
                continue;
            if (got < (ssize_t)sizeof(struct reply_header)) {
                give_up(isolated); /* the helper died (EOF) or answered nonsense */
                rc = -EPIPE;
                break;
            }
            struct reply_header header;
            memcpy(&header, message, sizeof header);
            if (header.status != 0) {
                size_t text = (size_t)got - sizeof header;
                memcpy(isolated->last_error, message + sizeof header, text);
                __atomic_store_n(&isolated->last_error_length, text, __ATOMIC_RELEASE);
                rc = -EIO;
            } else {
                memcpy(buffer, isolated->shared + (size_t)slot * isolated->slot_size, length);
            }
            break;
        }
    }
    __atomic_store_n(&isolated->busy[slot], 0, __ATOMIC_RELEASE);
    return rc;
}
