/* Kernel constants that the build machine's headers may lack.
 *
 * vrange is built against whatever kernel headers the build machine has (Debian 12's are older than
 * the kernels we run on), but what a kernel supports is decided at run time by probing, never by
 * these numbers. Each value below is the kernel's ABI and cannot change. */
#ifndef VRANGE_KERNEL_DEFS_H
#define VRANGE_KERNEL_DEFS_H

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

/* madvise advice (include/uapi/asm-generic/mman-common.h). */
#ifndef MADV_FREE
#define MADV_FREE 8
#endif
#ifndef MADV_COLD
#define MADV_COLD 20
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#ifndef MADV_GUARD_REMOVE
#define MADV_GUARD_REMOVE 103
#endif

/* userfaultfd(2) flags and /dev/userfaultfd (5.11, 6.1). */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

/* UFFDIO_API features newer than Debian 12's headers. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

/* Range ioctl numbers (bits of uffdio_register.ioctls). */
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE 0x05
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON 0x08
#endif

/* UFFDIO_POISON (6.6): install a poison marker; an access then raises SIGBUS, a syscall gets EFAULT. */
struct vr_uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define VR_UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct vr_uffdio_poison)

#endif /* VRANGE_KERNEL_DEFS_H */
