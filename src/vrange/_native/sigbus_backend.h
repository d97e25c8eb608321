/* The sigbus backend: a SIGBUS handler on the faulting thread refills missing chunks, behind one of
 * two traps (how an access to a missing page becomes a SIGBUS):
 *   - the userfaultfd trap (sigbus_uffd_trap.c): the region is registered with a SIGBUS-mode
 *     userfaultfd (UFFD_FEATURE_SIGBUS, user-mode-only where that is all the process may open);
 *     volatile pages are MADV_FREE'd and the kernel discards them by itself under pressure;
 *   - the memfd trap (sigbus_memfd_trap.c): an empty memfd is mapped over missing chunks; only
 *     vrange itself purges (where no userfaultfd can be opened at all, e.g. under a container's
 *     default seccomp profile).
 * sigbus.c holds the fault path and what both share: the handler, chaining to the previous one, the
 * region table, claiming and refilling chunks, populating; it reaches a trap only through its
 * struct vr_sigbus_trap. */
#ifndef VRANGE_SIGBUS_BACKEND_H
#define VRANGE_SIGBUS_BACKEND_H

#include <sys/types.h>

#include "region.h"

/* cffi: begin (exported to Python; build.py reads these blocks) */
int vr_sigbus_install(void);
int vr_sigbus_handler_is_ours(void);
void vr_sigbus_python_finalized(void);
int vr_sigbus_attach(vr_region *region, int trap_kind, int trap_uffd);
int vr_sigbus_detach(vr_region *region);
int vr_sigbus_idle(vr_region *region);
void vr_sigbus_resume(vr_region *region);
void vr_sigbus_after_fork(vr_region *region);

int vr_sigbus_memfd_discard(vr_region *region, size_t first_chunk, size_t end_chunk,
                            int only_poisoned);
int vr_sigbus_memfd_populate(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_sigbus_memfd_take_over(vr_region *region);
int vr_sigbus_reinstall_if_replaced(void);

int vr_sigbus_uffd_trap_open(int *fd_out);
int vr_sigbus_uffd_trap_probe(int uffd);
int vr_sigbus_uffd_rebind(vr_region *region, int trap_uffd);
int vr_sigbus_uffd_populate(vr_region *region, size_t first_chunk, size_t end_chunk, int dirty);
/* cffi: end */

/* Fill `buffer` (one chunk) with the chunk's bytes; 0 or -errno. The fault path (sigbus.c) hands its
 * regenerator to a trap's refill, so a trap never needs to know about Python. */
typedef int (*vr_sigbus_regenerator)(vr_region *region, size_t chunk, char *buffer);

/* A trap: how an access to a missing page becomes a SIGBUS, and how a chunk is refilled. The shared
 * fault path (sigbus.c) calls these; a trap calls only code below it (region.c, pressure.c,
 * userfaultfd.c). Every function is async-signal-safe. */
struct vr_sigbus_trap {
    /* Is the page at `address` (in `chunk`) still missing? Called with the chunk held. */
    int (*page_missing)(vr_region *region, size_t chunk, uintptr_t address);
    /* Does the chunk have any missing page? */
    int (*chunk_missing)(vr_region *region, size_t chunk);
    /* Fill the chunk's missing pages with what `regenerate` writes, or with zeros when it is NULL
     * (the explicit on_error="zeros" policy); the caller holds the chunk (IN_FLIGHT). 0 or -errno. */
    int (*refill)(vr_region *region, size_t chunk, vr_sigbus_regenerator regenerate);
    /* Dirty every page of a filled chunk so the kernel may no longer discard it (mark_nonvolatile);
     * 0, -EFAULT when a page was reclaimed meanwhile, or another -errno. NULL: the trap's pages are
     * never discarded by the kernel. */
    int (*dirty)(vr_region *region, size_t chunk);
    /* Set the region up for this trap (attach). 0 or -errno. */
    int (*attach)(vr_region *region, int trap_uffd);
    /* Fill chunks [first, end), wholly missing and held by the caller, with what `regenerate` writes,
     * ahead of a fault (vr_region_ahead_window): 0 or -errno (a chunk left missing is served by a
     * real fault if one comes, which applies the error policy). */
    int (*fill_ahead)(vr_region *region, size_t first, size_t end, vr_sigbus_regenerator regenerate);
};

extern const struct vr_sigbus_trap vr_sigbus_memfd_trap;
extern const struct vr_sigbus_trap vr_sigbus_uffd_trap;

#endif /* VRANGE_SIGBUS_BACKEND_H */
