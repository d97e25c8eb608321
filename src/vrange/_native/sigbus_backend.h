/* The sigbus backend: a SIGBUS handler on the faulting thread refills missing chunks, behind one of
 * two traps (how an access to a missing page becomes a SIGBUS):
 *   - the userfaultfd trap (sigbus_uffd_trap.c): the region is registered with a SIGBUS-mode
 *     userfaultfd (UFFD_FEATURE_SIGBUS, user-mode-only where that is all the process may open);
 *     volatile pages are MADV_FREE'd and the kernel discards them by itself under pressure;
 *   - the memfd trap (sigbus_memfd_trap.c): an empty memfd is mapped over missing chunks; only
 *     vrange itself purges (where no userfaultfd can be opened at all, e.g. under a container's
 *     default seccomp profile).
 * sigbus.c holds what both share: the handler, chaining to the previous one, the region table and
 * the per-chunk claim/wait helpers. */
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

/* What a trap tells the shared fault path (sigbus.c). Every function is async-signal-safe. */
struct vr_sigbus_trap {
    /* Is the page at `address` (in `chunk`) still missing? Called with the chunk held. */
    int (*page_missing)(vr_region *region, size_t chunk, uintptr_t address);
    /* Does the chunk have any missing page? */
    int (*chunk_missing)(vr_region *region, size_t chunk);
    /* Fill the chunk's missing pages, regenerated (`zeros` 0) or with zeros (the explicit
     * on_error="zeros" policy); the caller holds the chunk (IN_FLIGHT). 0 or -errno. */
    int (*refill)(vr_region *region, size_t chunk, int zeros);
};

extern const struct vr_sigbus_trap vr_sigbus_memfd_trap;
extern const struct vr_sigbus_trap vr_sigbus_uffd_trap;

/* Shared by the two traps (sigbus.c). */
int vr_sigbus_regenerate(vr_region *region, size_t chunk, char *buffer);
/* Serve a SIGBUS on a missing page: 1 if the access may restart, 0 to chain to the previous
 * handler. Called with the region entered (`active` raised). */
int vr_sigbus_serve_chunk(vr_region *region, uintptr_t address, const struct vr_sigbus_trap *trap);
/* Populate path (a library call, GIL released): regenerate the chunk on this thread if it has
 * missing pages. 0, 1 (another thread held it: look again), or -errno (the regeneration failed). */
int vr_sigbus_populate_chunk(vr_region *region, size_t chunk, const struct vr_sigbus_trap *trap);

int vr_sigbus_memfd_attach(vr_region *region);
int vr_sigbus_uffd_attach(vr_region *region, int trap_uffd);

#endif /* VRANGE_SIGBUS_BACKEND_H */
