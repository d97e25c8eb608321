/* Behaviour probes: ask the kernel by doing, not by comparing version numbers.
 *
 * Each probe works on its own scratch mapping and descriptors and undoes everything before it
 * returns, so probes can run at any time, from any thread, next to live regions. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"
#include "userfaultfd.h"

int vr_probe_madvise(int advice)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t len = 2 * (size_t)page;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -errno;
    memset(p, 0x5a, len); /* present, dirty pages: what a region's advice will act on */
    int rc = madvise(p, len, advice) < 0 ? -errno : 0;
    if (munmap(p, len) < 0 && rc == 0)
        rc = -errno;
    return rc;
}

int vr_probe_memfd(void)
{
    int fd = (int)syscall(SYS_memfd_create, "vrange-probe", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    return vr_close(fd);
}

/* --- Does this userfaultfd serve faults taken inside system calls? -------------------------------
 *
 * A reader thread read(2)s from a pipe into a registered, missing page, so the fault happens in the
 * kernel's copy_to_user. A descriptor made with UFFD_USER_MODE_ONLY makes that read fail with EFAULT
 * at once; a full one queues a fault event, which we resolve with UFFDIO_ZEROPAGE so the read
 * completes. The verdict is what happened, not what the sysctl suggests. */

struct kernel_fault_reader {
    int pipe_read_fd;
    int done_write_fd;
    char *page;
    ssize_t result;
    int error_number;
};

static void *kernel_fault_reader_main(void *arg)
{
    struct kernel_fault_reader *r = arg;
    r->result = read(r->pipe_read_fd, r->page, 8);
    r->error_number = r->result < 0 ? errno : 0;
    char one = 1;
    /* If this write fails the main thread's poll times out instead; nothing else to do here. */
    (void)!write(r->done_write_fd, &one, 1);
    return NULL;
}

static int resolve_one_fault(int uffd, char *page, long page_size)
{
    struct uffd_msg msg;
    ssize_t n = read(uffd, &msg, sizeof msg);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    if (n != (ssize_t)sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT)
        return 0;
    struct uffdio_zeropage zero = {
        .range = { .start = (uint64_t)(uintptr_t)page, .len = (uint64_t)page_size },
    };
    if (ioctl(uffd, UFFDIO_ZEROPAGE, &zero) < 0 && errno != EEXIST)
        return -errno;
    return 1;
}

int vr_probe_uffd_kernel_fault(int uffd, int timeout_ms, uint64_t *range_ioctls_out,
                               int *serves_syscalls_out)
{
    long page_size = sysconf(_SC_PAGESIZE);
    int rc = 0;
    int pipe_fds[2] = { -1, -1 }, done_fds[2] = { -1, -1 };
    int registered = 0, thread_started = 0;
    pthread_t thread;
    struct kernel_fault_reader reader = { 0 };

    char *page = mmap(NULL, (size_t)page_size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return -errno;

    struct uffdio_register reg = {
        .range = { .start = (uint64_t)(uintptr_t)page, .len = (uint64_t)page_size },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        rc = -errno;
        goto out;
    }
    registered = 1;
    *range_ioctls_out = vr_userfaultfd_visible_ioctls(reg.ioctls);

    if (pipe2(pipe_fds, O_CLOEXEC) < 0 || pipe2(done_fds, O_CLOEXEC) < 0) {
        rc = -errno;
        goto out;
    }
    if (write(pipe_fds[1], "vrange!!", 8) != 8) {
        rc = -EIO;
        goto out;
    }
    reader.pipe_read_fd = pipe_fds[0];
    reader.done_write_fd = done_fds[1];
    reader.page = page;
    int err = pthread_create(&thread, NULL, kernel_fault_reader_main, &reader);
    if (err != 0) {
        rc = -err;
        goto out;
    }
    thread_started = 1;

    for (int reader_done = 0; !reader_done;) {
        struct pollfd fds[2] = { { .fd = uffd, .events = POLLIN },
                                 { .fd = done_fds[0], .events = POLLIN } };
        int n = poll(fds, 2, timeout_ms);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            break;
        }
        if (n == 0) {
            rc = -ETIMEDOUT;
            break;
        }
        if (fds[0].revents & POLLIN) {
            int resolved = resolve_one_fault(uffd, page, page_size);
            if (resolved < 0) {
                rc = resolved;
                break;
            }
        }
        if (fds[1].revents & POLLIN)
            reader_done = 1;
    }

out:
    /* Unregistering wakes a reader still blocked on the fault (after a timeout or an error); its
     * fault is then served as ordinary anonymous memory, so the join below cannot hang. */
    if (registered) {
        struct uffdio_range range = reg.range;
        if (ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0 && rc == 0)
            rc = -errno;
    }
    if (thread_started)
        pthread_join(thread, NULL);
    if (rc == 0) {
        if (reader.result == 8 && memcmp(page, "vrange!!", 8) == 0)
            *serves_syscalls_out = 1;
        else if (reader.result < 0 && reader.error_number == EFAULT)
            *serves_syscalls_out = 0;
        else
            rc = reader.result < 0 ? -reader.error_number : -EIO;
    }
    for (int i = 0; i < 2; i++) {
        if (pipe_fds[i] >= 0)
            close(pipe_fds[i]);
        if (done_fds[i] >= 0)
            close(done_fds[i]);
    }
    if (munmap(page, (size_t)page_size) < 0 && rc == 0)
        rc = -errno;
    return rc;
}
