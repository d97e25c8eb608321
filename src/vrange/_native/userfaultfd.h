/* The userfaultfd itself (userfaultfd.c): shared by the uffd backend, the sigbus backend's
 * userfaultfd trap and the probes. */
#ifndef VRANGE_USERFAULTFD_H
#define VRANGE_USERFAULTFD_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

/* Register [start, start + length) in MISSING mode; `ioctls_out` (may be NULL): the range ioctls the
 * kernel allows on it. 0 or -errno. */
int vr_userfaultfd_register_missing(int uffd, uintptr_t start, size_t length, uint64_t *ioctls_out);

/* A simulated older kernel (seccomp.c): hide these features and ioctls from every answer of
 * vr_userfaultfd_api and the register calls, and refuse a handshake that requests such a feature
 * (EINVAL). Irreversible. */
void vr_userfaultfd_hide(uint64_t features, uint64_t ioctls);

/* `ioctls` without the hidden ones (for callers that issue UFFDIO_REGISTER themselves). */
uint64_t vr_userfaultfd_visible_ioctls(uint64_t ioctls);

enum vr_fill_kind { VR_FILL_COPY, VR_FILL_ZEROS, VR_FILL_ZEROPAGE, VR_FILL_POISON };

/* Fill the missing pages of [start, start + length) from `source` (COPY), with zeros (ZEROPAGE) or
 * with poison markers (POISON); present pages are kept; nobody is woken. 0 or -errno.
 * Async-signal-safe. */
int vr_userfaultfd_fill_missing(int uffd, size_t page_size, uintptr_t start, size_t length,
                                const char *source, enum vr_fill_kind kind);

/* Wake the threads waiting in a fault on [start, start + length). Async-signal-safe. */
void vr_userfaultfd_wake(int uffd, uintptr_t start, size_t length);

#endif /* VRANGE_USERFAULTFD_H */
