/* Seccomp filters that deny userfaultfd, the way container runtimes' default profiles do.
 *
 * For tests and compatibility profiles only: a filter cannot be removed, and installing one sets
 * no_new_privs on the calling thread, so callers do this in a forked child. With TSYNC the filter
 * covers every thread of the process, as a container's would. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

#if defined(__x86_64__)
#define VR_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define VR_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

#ifndef SECCOMP_FILTER_FLAG_TSYNC
#define SECCOMP_FILTER_FLAG_TSYNC (1UL << 0)
#endif

int vr_seccomp_deny_userfaultfd(int error_number, int also_dev_ioctl)
{
#ifndef VR_AUDIT_ARCH
    (void)error_number;
    (void)also_dev_ioctl;
    return -ENOSYS;
#else
    if (error_number <= 0 || error_number > (int)SECCOMP_RET_DATA)
        return -EINVAL;
    const __u32 deny = SECCOMP_RET_ERRNO | ((__u32)error_number & SECCOMP_RET_DATA);
    /* ioctl's request is an unsigned int in the kernel; compare the low 32 bits of args[1]
     * (little-endian on both supported architectures). */
    struct sock_filter program[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, VR_AUDIT_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, deny),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, USERFAULTFD_IOC_NEW, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, deny),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog fprog = {
        .len = (unsigned short)(sizeof program / sizeof program[0]),
        .filter = program,
    };
    if (!also_dev_ioctl) {
        /* Stop after the userfaultfd check: turn the ioctl test into "allow". */
        program[6] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    long result = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog);
    if (result < 0)
        return -errno;
    if (result > 0)
        return -ESRCH; /* names a thread that could not take the filter: no filter was installed */
    return 0;
#endif
}
