/* Obtaining a userfaultfd and doing the UFFDIO_API handshake.
 *
 * Two ways in: the userfaultfd(2) system call (gated by vm.unprivileged_userfaultfd and
 * CAP_SYS_PTRACE, and denied outright by container seccomp profiles) and /dev/userfaultfd (Linux 6.1+,
 * gated by the device node's file permissions). Callers try both and report why each failed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

#ifndef __NR_userfaultfd
#error "this platform's headers do not define __NR_userfaultfd"
#endif

int vr_native_version(void) { return VR_NATIVE_VERSION; }

long vr_page_size(void) { return sysconf(_SC_PAGESIZE); }

int vr_uffd_open_syscall(int flags, int *fd_out)
{
    long fd = syscall(__NR_userfaultfd, flags);
    if (fd < 0)
        return -errno;
    *fd_out = (int)fd;
    return 0;
}

int vr_uffd_open_dev(int flags, int *fd_out)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int saved = errno;
    close(dev); /* the new userfaultfd does not depend on the device fd staying open */
    if (fd < 0)
        return -saved;
    *fd_out = fd;
    return 0;
}

/* The handshake can be done once per descriptor: the kernel answers with every feature and ioctl it
 * supports, and enables only the requested features on this descriptor. */
int vr_uffd_api(int fd, uint64_t requested_features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = requested_features };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return 0;
}

int vr_close(int fd)
{
    /* Linux always releases the descriptor, even when close() reports EINTR: never retry. */
    if (close(fd) < 0 && errno != EINTR)
        return -errno;
    return 0;
}
