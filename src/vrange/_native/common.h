/* Shared declarations of the vrange native core.
 *
 * Conventions for every function exported to Python:
 *   - return 0 (or a non-negative count) on success and -errno on failure; Python turns a negative
 *     result into an exception in one place (vrange.errors.check);
 *   - state lives in what a function is handed (a region, a handler, a monitor), so two regions (or
 *     two probes) never share anything behind the caller's back. The exceptions are process-wide by
 *     nature, and each says why where it is defined: what a signal handler needs, since a signal
 *     disposition belongs to the process and a handler is handed only an address (the previous
 *     actions in sigbus.c and uffd_fault.c, the sigbus region table), the pressure monitor's watchdog
 *     (pressure.c), the GIL-switch hold (gil_switching.c, only touched with the GIL held), and the
 *     one-way mask of a simulated older kernel (userfaultfd.c, set only by vrange.testing);
 *   - cffi releases the GIL around every call, so an exported function never touches Python objects.
 *     Python is entered only through python_regenerator.h (a regenerator, the GIL around a wait),
 *     from the fault paths (uffd_fault.c, sigbus.c), the uffd workers, and a library call that
 *     refills a chunk itself under 'abort' (vr_uffd_regenerate_for_call). */
#ifndef VRANGE_COMMON_H
#define VRANGE_COMMON_H

#include <fcntl.h>
#include <stdint.h>
#include <stddef.h>

#include "kernel_defs.h"

/* Bumped whenever the exported C interface changes; checked by vrange._native at import. */
#define VR_NATIVE_VERSION 3

/* Older-kernel profiles of vr_seccomp_simulate_kernel (vrange.testing.KERNEL_PROFILES). */
#define VR_KERNEL_NO_POPULATE_WRITE 1
#define VR_KERNEL_NO_PAGEOUT 2
#define VR_KERNEL_NO_POISON 3
#define VR_KERNEL_NO_UFFD_THREAD_ID_SIGBUS 4

/* cffi: begin (exported to Python; build.py reads these blocks) */
int vr_native_version(void);
long vr_page_size(void);

int vr_close(int fd);

/* userfaultfd.c: obtaining and handshaking a userfaultfd. */
int vr_userfaultfd_open_syscall(int flags, int *fd_out);
int vr_userfaultfd_open_dev(int flags, int *fd_out);
int vr_userfaultfd_api(int fd, uint64_t requested_features, uint64_t *features_out,
                       uint64_t *ioctls_out);

/* probe.c: behaviour probes on scratch memory. */
int vr_probe_madvise(int advice);
int vr_probe_memfd(void);
int vr_probe_uffd_kernel_fault(int uffd, int timeout_ms, uint64_t *range_ioctls_out,
                               int *serves_syscalls_out);

/* bench.c: timing loops without Python. */
int vr_touch_pages(uintptr_t address, size_t length, size_t stride, int write, uint64_t *ns_out);
int vr_touch_pages_in_order(uintptr_t address, const uint32_t *pages, size_t count, size_t page,
                            uint64_t *ns_out);
int vr_touch_pages_each(uintptr_t address, size_t length, size_t stride, uint64_t *ns_each,
                        size_t count);
int vr_bench_uffd_floor(size_t length, size_t chunk, uint64_t *ns_out);

/* seccomp.c: filters for tests and compatibility profiles. */
int vr_seccomp_deny_userfaultfd(int error_number, int also_dev_ioctl);
int vr_seccomp_simulate_kernel(int profile);
/* cffi: end */

#endif /* VRANGE_COMMON_H */
