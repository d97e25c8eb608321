/* Benchmark helpers (python -m vrange bench): timing loops without Python in them, and the
 * "no library" floor, a minimal userfaultfd handler that vrange's uffd backend is measured against.
 * Every loop runs with the GIL released (cffi), so Python-regenerator faults it causes take the
 * paths a C extension's faults would. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "common.h"
#include "userfaultfd.h"

int vr_touch_pages(uintptr_t address, size_t length, size_t stride, int write, uint64_t *ns_out)
{
    if (stride == 0)
        return -EINVAL;
    struct timespec start, end;
    if (clock_gettime(CLOCK_MONOTONIC, &start) < 0)
        return -errno;
    volatile unsigned char *bytes = (volatile unsigned char *)address;
    unsigned sum = 0;
    for (size_t offset = 0; offset < length; offset += stride) {
        if (write)
            bytes[offset] = 1;
        else
            sum += bytes[offset];
    }
    if (clock_gettime(CLOCK_MONOTONIC, &end) < 0)
        return -errno;
    (void)sum;
    *ns_out = (uint64_t)(end.tv_sec - start.tv_sec) * 1000000000u + (uint64_t)(end.tv_nsec - start.tv_nsec);
    return 0;
}

/* One write to each page `pages[i]` (page indexes from `address`), in that order: the touches of a
 * random walk, which never fills ahead. GIL released (cffi). */
int vr_touch_pages_in_order(uintptr_t address, const uint32_t *pages, size_t count, size_t page,
                            uint64_t *ns_out)
{
    struct timespec start, end;
    if (clock_gettime(CLOCK_MONOTONIC, &start) < 0)
        return -errno;
    volatile unsigned char *bytes = (volatile unsigned char *)address;
    for (size_t i = 0; i < count; i++)
        bytes[(size_t)pages[i] * page] = 1;
    if (clock_gettime(CLOCK_MONOTONIC, &end) < 0)
        return -errno;
    *ns_out = (uint64_t)(end.tv_sec - start.tv_sec) * 1000000000u + (uint64_t)(end.tv_nsec - start.tv_nsec);
    return 0;
}

/* One write per stride, each timed on its own: the latency of every single fault. `ns_each` has
 * room for `count` entries; returns the number of accesses timed. */
int vr_touch_pages_each(uintptr_t address, size_t length, size_t stride, uint64_t *ns_each,
                        size_t count)
{
    if (stride == 0)
        return -EINVAL;
    volatile unsigned char *bytes = (volatile unsigned char *)address;
    size_t done = 0;
    for (size_t offset = 0; offset < length && done < count; offset += stride) {
        int64_t before = vr_monotonic_ns();
        bytes[offset] = 1;
        ns_each[done++] = (uint64_t)(vr_monotonic_ns() - before);
    }
    return (int)done;
}

/* --- the "no library" floor ------------------------------------------------------------------- */

struct floor_handler {
    int uffd;
    int stop_fd; /* readable when the handler must return */
    size_t chunk;
    uintptr_t start;
    size_t length;
    const char *zeros; /* one chunk of zeros, the source of every UFFDIO_COPY */
    int error;         /* 0 or -errno, set by the handler thread */
};

/* read() one event, UFFDIO_COPY the chunk around it (waking the faulting thread), repeat. */
static void *floor_handler_main(void *argument)
{
    struct floor_handler *handler = argument;
    struct pollfd fds[2] = { { .fd = handler->uffd, .events = POLLIN },
                             { .fd = handler->stop_fd, .events = POLLIN } };
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            handler->error = -errno;
            return NULL;
        }
        if (fds[1].revents)
            return NULL;
        struct uffd_msg message;
        ssize_t got = read(handler->uffd, &message, sizeof message);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            handler->error = -errno;
            return NULL;
        }
        if (got != sizeof message || message.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uintptr_t chunk_start = (uintptr_t)message.arg.pagefault.address & ~(uintptr_t)(handler->chunk - 1);
        size_t length = handler->chunk;
        if (chunk_start + length > handler->start + handler->length)
            length = handler->start + handler->length - chunk_start;
        struct uffdio_copy copy = { .dst = chunk_start, .src = (uintptr_t)handler->zeros, .len = length };
        if (ioctl(handler->uffd, UFFDIO_COPY, &copy) < 0 && errno != EEXIST) {
            handler->error = -errno;
            return NULL;
        }
    }
}

static int open_any_userfaultfd(int *fd_out)
{
    int flags = O_CLOEXEC | O_NONBLOCK;
    if (vr_userfaultfd_open_syscall(flags, fd_out) == 0 || vr_userfaultfd_open_dev(flags, fd_out) == 0)
        return 0;
    /* User-mode-only faults are all this loop makes. */
    if (vr_userfaultfd_open_syscall(flags | UFFD_USER_MODE_ONLY, fd_out) == 0)
        return 0;
    return vr_userfaultfd_open_dev(flags | UFFD_USER_MODE_ONLY, fd_out);
}

/* Map `length` bytes of anonymous memory, register them with a fresh userfaultfd, and touch every
 * page from this thread while a handler thread resolves each fault with one UFFDIO_COPY of
 * `chunk` zero bytes: the least any userfaultfd library can do per fault. Nanoseconds of the touch
 * loop in `ns_out`. */
int vr_bench_uffd_floor(size_t length, size_t chunk, uint64_t *ns_out)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (chunk < page || (chunk & (chunk - 1)) || length == 0 || length % page)
        return -EINVAL;
    int rc = 0;
    int stop[2] = { -1, -1 };
    int uffd = -1;
    char *zeros = MAP_FAILED;
    void *area = mmap(NULL, length + chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED)
        return -errno;
    /* Chunk-aligned start, so every chunk lies inside the range. */
    uintptr_t start = ((uintptr_t)area + chunk - 1) & ~(uintptr_t)(chunk - 1);
    if (madvise((void *)start, length, MADV_NOHUGEPAGE) < 0 && errno != EINVAL) {
        rc = -errno;
        goto out;
    }
    zeros = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (zeros == MAP_FAILED) {
        rc = -errno;
        goto out;
    }
    if ((rc = open_any_userfaultfd(&uffd)) < 0)
        goto out;
    uint64_t features, ioctls;
    if ((rc = vr_userfaultfd_api(uffd, 0, &features, &ioctls)) < 0)
        goto out;
    if ((rc = vr_userfaultfd_register_missing(uffd, start, length, NULL)) < 0)
        goto out;
    if (pipe2(stop, O_CLOEXEC) < 0) {
        rc = -errno;
        goto out;
    }
    struct floor_handler handler = { .uffd = uffd, .stop_fd = stop[0], .chunk = chunk,
                                     .start = start, .length = length, .zeros = zeros };
    pthread_t thread;
    if ((rc = -pthread_create(&thread, NULL, floor_handler_main, &handler)) < 0)
        goto out;
    rc = vr_touch_pages(start, length, page, 1, ns_out);
    if (write(stop[1], "x", 1) < 0 && rc == 0)
        rc = -errno;
    pthread_join(thread, NULL);
    if (rc == 0)
        rc = handler.error;
out:
    if (stop[0] >= 0)
        close(stop[0]);
    if (stop[1] >= 0)
        close(stop[1]);
    if (uffd >= 0)
        close(uffd);
    if (zeros != MAP_FAILED)
        munmap(zeros, chunk);
    munmap(area, length + chunk);
    return rc;
}
