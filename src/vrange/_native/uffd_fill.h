/* Filling missing pages of a userfaultfd-registered range (uffd_fill.c). */
#ifndef VRANGE_UFFD_FILL_H
#define VRANGE_UFFD_FILL_H

#include <stddef.h>
#include <stdint.h>

#include "kernel_defs.h"

enum vr_fill_kind { VR_FILL_COPY, VR_FILL_ZEROPAGE, VR_FILL_POISON };

/* Fill the missing pages of [start, start + length) from `source` (COPY), with zeros (ZEROPAGE) or
 * with poison markers (POISON); present pages are kept. 0 or -errno. Async-signal-safe. */
int vr_uffd_fill_missing(int uffd, size_t page_size, uintptr_t start, size_t length,
                         const char *source, enum vr_fill_kind kind);

#endif /* VRANGE_UFFD_FILL_H */
