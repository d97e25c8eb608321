/* The userfaultfd itself, shared by the uffd backend (its handler thread and workers), the sigbus
 * backend's userfaultfd trap (inside the SIGBUS handler of the faulting thread) and the probes:
 * obtaining one, the UFFDIO_API handshake, registering a range, filling missing pages, waking
 * waiters.
 *
 * Two ways to obtain one: the userfaultfd(2) system call (gated by vm.unprivileged_userfaultfd and
 * CAP_SYS_PTRACE, and denied outright by container seccomp profiles) and /dev/userfaultfd (Linux 6.1+,
 * gated by the device node's file permissions). Callers try both and report why each failed.
 *
 * Everything after opening uses only ioctls on the descriptor and the memory it is handed, so it is
 * async-signal-safe and never needs the GIL. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "userfaultfd.h"

#ifndef __NR_userfaultfd
#error "this platform's headers do not define __NR_userfaultfd"
#endif

int vr_userfaultfd_open_syscall(int flags, int *fd_out)
{
    long fd = syscall(__NR_userfaultfd, flags);
    if (fd < 0)
        return -errno;
    *fd_out = (int)fd;
    return 0;
}

int vr_userfaultfd_open_dev(int flags, int *fd_out)
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

/* What a simulated older kernel lacks (vrange.testing.simulate_kernel; never cleared). A seccomp
 * filter cannot read or rewrite the memory an ioctl is handed, so the answers of the two ioctls that
 * describe the kernel are made here, in the one place vrange reads them, to look like that kernel's:
 * a handshake requesting a hidden feature fails with EINVAL (what a kernel that does not know the bit
 * answers), and hidden features and ioctls never appear in an answer. Written once, before any
 * thread can use them (the seccomp filter is installed first); process-wide by nature, like the
 * filter it completes. */
static uint64_t hidden_features, hidden_ioctls;

void vr_userfaultfd_hide(uint64_t features, uint64_t ioctls)
{
    __atomic_fetch_or(&hidden_features, features, __ATOMIC_SEQ_CST);
    __atomic_fetch_or(&hidden_ioctls, ioctls, __ATOMIC_SEQ_CST);
}

uint64_t vr_userfaultfd_visible_ioctls(uint64_t ioctls)
{
    return ioctls & ~__atomic_load_n(&hidden_ioctls, __ATOMIC_RELAXED);
}

/* The handshake can be done once per descriptor: the kernel answers with every feature and ioctl it
 * supports, and enables only the requested features on this descriptor. */
int vr_userfaultfd_api(int fd, uint64_t requested_features, uint64_t *features_out, uint64_t *ioctls_out)
{
    uint64_t hidden = __atomic_load_n(&hidden_features, __ATOMIC_RELAXED);
    if (requested_features & hidden)
        return -EINVAL; /* a simulated kernel that does not know these features */
    struct uffdio_api api = { .api = UFFD_API, .features = requested_features };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *features_out = api.features & ~hidden;
    *ioctls_out = vr_userfaultfd_visible_ioctls(api.ioctls);
    return 0;
}

int vr_userfaultfd_register_missing(int uffd, uintptr_t start, size_t length, uint64_t *ioctls_out)
{
    struct uffdio_register reg = { .range = { .start = start, .len = length },
                                   .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    if (ioctls_out)
        *ioctls_out = vr_userfaultfd_visible_ioctls(reg.ioctls);
    return 0;
}

void vr_userfaultfd_wake(int uffd, uintptr_t start, size_t length)
{
    struct uffdio_range range = { .start = start, .len = length };
    /* Nothing to do if this fails: the range is gone (closed), and so are its waiters' mappings. */
    (void)ioctl(uffd, UFFDIO_WAKE, &range);
}

#define COPY_EAGAIN_RETRIES 1000

/* The source of VR_FILL_ZEROS: read-only zeros, copied from (never written), so filling a chunk
 * with zeros needs no buffer of its own and no memset per fault. */
#define ZERO_SOURCE_BYTES (64 * 1024)
static const char zero_source[ZERO_SOURCE_BYTES] __attribute__((aligned(4096)));

/* Pages that are already present (EEXIST) are kept as they are: a write made by the program is
 * never overwritten. Nothing is woken here (DONTWAKE): the uffd backend clears IN_FLIGHT first and
 * then wakes the range (vr_userfaultfd_wake), so a thread whose fault was set aside while the chunk was in flight is always
 * woken after the chunk is done; the trap has no waiters at all (its faults are SIGBUS). */
int vr_userfaultfd_fill_missing(int uffd, size_t page_size, uintptr_t start, size_t length,
                         const char *source, enum vr_fill_kind kind)
{
    size_t done = 0;
    int eagain_retries = 0;
    while (done < length) {
        int64_t progress;
        int rc;
        if (kind == VR_FILL_COPY || kind == VR_FILL_ZEROS) {
            /* Zeros: ordinary private pages (as UFFDIO_COPY makes them), not the shared zero page
             * UFFDIO_ZEROPAGE maps, whose first write would fault again. */
            size_t piece = length - done;
            if (kind == VR_FILL_ZEROS && piece > ZERO_SOURCE_BYTES)
                piece = ZERO_SOURCE_BYTES;
            const char *from = kind == VR_FILL_ZEROS ? zero_source : source + done;
            struct uffdio_copy copy = { .dst = start + done, .src = (uintptr_t)from, .len = piece,
                                        .mode = UFFDIO_COPY_MODE_DONTWAKE };
            rc = ioctl(uffd, UFFDIO_COPY, &copy);
            progress = copy.copy;
            if (rc == 0 && done + piece < length) {
                done += piece;
                continue;
            }
        } else if (kind == VR_FILL_ZEROPAGE) {
            struct uffdio_zeropage zero = { .range = { .start = start + done, .len = length - done },
                                            .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE };
            rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zero);
            progress = zero.zeropage;
        } else {
            struct vr_uffdio_poison poison = { .range = { .start = start + done, .len = length - done },
                                               .mode = UFFDIO_COPY_MODE_DONTWAKE };
            rc = ioctl(uffd, VR_UFFDIO_POISON, &poison);
            progress = poison.updated;
        }
        if (rc == 0)
            break;
        int err = errno;
        if (progress > 0) {
            done += (size_t)progress;
            continue;
        }
        if (err == EEXIST) {
            done += page_size; /* present already: keep it */
            continue;
        }
        if (err == EAGAIN && eagain_retries++ < COPY_EAGAIN_RETRIES) {
            sched_yield(); /* the mm is changing (an event is queued): try again */
            continue;
        }
        return -err;
    }
    return 0;
}
