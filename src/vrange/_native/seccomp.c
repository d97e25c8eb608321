/* Seccomp filters for tests and compatibility profiles: one that denies userfaultfd, the way container
 * runtimes' default profiles do, and older-kernel profiles that make the advice or ioctl such a kernel
 * lacks fail with EINVAL, as that kernel does.
 *
 * A filter cannot be removed, and installing one sets no_new_privs on the calling thread, so callers
 * do this in a forked child. With TSYNC the filter covers every thread of the process, as a
 * container's would. */
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
#include "userfaultfd.h"

#if defined(__x86_64__)
#define VR_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define VR_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

#ifndef SECCOMP_FILTER_FLAG_TSYNC
#define SECCOMP_FILTER_FLAG_TSYNC (1UL << 0)
#endif

static int install_filter(struct sock_filter *program, size_t length)
{
    struct sock_fprog fprog = { .len = (unsigned short)length, .filter = program };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    long result = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog);
    if (result < 0)
        return -errno;
    if (result > 0)
        return -ESRCH; /* names a thread that could not take the filter: no filter was installed */
    return 0;
}

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
    return install_filter(fprog.filter, fprog.len);
#endif
}

#ifdef VR_AUDIT_ARCH
#define MAX_PROFILE_INSTRUCTIONS 48

struct filter_builder {
    struct sock_filter code[MAX_PROFILE_INSTRUCTIONS];
    size_t length;
};

static void emit(struct filter_builder *builder, struct sock_filter instruction)
{
    if (builder->length < MAX_PROFILE_INSTRUCTIONS)
        builder->code[builder->length] = instruction;
    builder->length++; /* an overflow is caught before the filter is installed */
}

/* System call `nr` fails with EINVAL when the low 32 bits of its argument `arg` equal one of
 * `values` (`count` of them), or, with `any_bit`, share a bit with values[0]. The block falls
 * through to the next one otherwise. */
static void deny_when(struct filter_builder *builder, int nr, int arg, const __u32 *values,
                      unsigned count, int any_bit)
{
    const __u32 deny = SECCOMP_RET_ERRNO | (EINVAL & SECCOMP_RET_DATA);
    emit(builder, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                               offsetof(struct seccomp_data, nr)));
    /* Not this call: skip the argument load, the tests, the jump over the return and the return. */
    emit(builder, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (__u32)nr, 0,
                                               (unsigned char)(count + 3)));
    emit(builder, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                               offsetof(struct seccomp_data, args[arg])));
    for (unsigned i = 0; i < count; i++) {
        /* A match jumps over the remaining tests and the jump, to the return. */
        unsigned char to_deny = (unsigned char)(count - 1 - i + 1);
        emit(builder, (struct sock_filter)BPF_JUMP(BPF_JMP | (any_bit ? BPF_JSET : BPF_JEQ) | BPF_K,
                                                   values[i], to_deny, 0));
    }
    emit(builder, (struct sock_filter)BPF_STMT(BPF_JMP | BPF_JA, 1));
    emit(builder, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny));
}
#endif

/* Make this process see an older kernel (profiles in common.h); see vrange.testing.KERNEL_PROFILES for
 * what each simulates and what it cannot. ioctl's request and madvise's advice are compared on the
 * low 32 bits of the argument (little-endian on both supported architectures). */
int vr_seccomp_simulate_kernel(int profile)
{
#ifndef VR_AUDIT_ARCH
    (void)profile;
    return -ENOSYS;
#else
    struct filter_builder builder = { .length = 0 };
    uint64_t hide_features = 0, hide_ioctls = 0;
    emit(&builder, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                                offsetof(struct seccomp_data, arch)));
    emit(&builder, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, VR_AUDIT_ARCH, 1, 0));
    emit(&builder, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    switch (profile) {
    case VR_KERNEL_NO_POPULATE_WRITE: { /* Linux < 5.14 */
        const __u32 advice[] = { MADV_POPULATE_READ, MADV_POPULATE_WRITE };
        deny_when(&builder, __NR_madvise, 2, advice, 2, 0);
        break;
    }
    case VR_KERNEL_NO_PAGEOUT: { /* Linux < 5.4 (process_madvise, 5.10, takes the same advice) */
        const __u32 advice[] = { MADV_COLD, MADV_PAGEOUT };
        deny_when(&builder, __NR_madvise, 2, advice, 2, 0);
#ifdef __NR_process_madvise
        deny_when(&builder, __NR_process_madvise, 3, advice, 2, 0);
#endif
        break;
    }
    case VR_KERNEL_NO_POISON: { /* Linux < 6.6 */
        const __u32 request[] = { (__u32)VR_UFFDIO_POISON };
        deny_when(&builder, __NR_ioctl, 1, request, 1, 0);
        hide_features = UFFD_FEATURE_POISON;
        hide_ioctls = 1ULL << _UFFDIO_POISON;
        break;
    }
    case VR_KERNEL_NO_UFFD_THREAD_ID_SIGBUS: { /* Linux < 4.14 */
        /* Such a kernel predates UFFD_USER_MODE_ONLY (5.11) too, and rejects the flag. */
        const __u32 flag[] = { UFFD_USER_MODE_ONLY };
        deny_when(&builder, __NR_userfaultfd, 0, flag, 1, 1);
        hide_features = UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_SIGBUS;
        break;
    }
    default:
        return -EINVAL;
    }
    emit(&builder, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    if (builder.length > MAX_PROFILE_INSTRUCTIONS)
        return -E2BIG;
    int rc = install_filter(builder.code, builder.length);
    if (rc == 0 && (hide_features || hide_ioctls))
        vr_userfaultfd_hide(hide_features, hide_ioctls);
    return rc;
#endif
}
