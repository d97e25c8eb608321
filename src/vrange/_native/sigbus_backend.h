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
void vr_sigbus_resume(vr_region *region);
void vr_sigbus_after_fork(vr_region *region);

int64_t vr_sigbus_memfd_purge(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_sigbus_memfd_discard(vr_region *region, size_t first_chunk, size_t end_chunk,
                            int only_poisoned);
int vr_sigbus_memfd_populate(vr_region *region, size_t first_chunk, size_t end_chunk);

int vr_sigbus_uffd_trap_open(int *fd_out);
int vr_sigbus_uffd_trap_probe(int uffd);
int vr_sigbus_uffd_rebind(vr_region *region, int trap_uffd);
int vr_sigbus_uffd_populate(vr_region *region, size_t first_chunk, size_t end_chunk, int dirty);
/* cffi: end */

/* Shared by the two traps (sigbus.c). */
pid_t vr_sigbus_current_tid(void);
int vr_sigbus_claim_chunk(vr_region *region, size_t chunk);
void vr_sigbus_release_chunk(vr_region *region, size_t chunk);
void vr_sigbus_wait_for_chunk(vr_region *region, size_t chunk);
void vr_sigbus_note_refill(vr_region *region, size_t chunk);
int vr_sigbus_regenerate(vr_region *region, size_t chunk, char *buffer);
int vr_sigbus_policy_after_failure(vr_region *region, size_t chunk,
                                   int (*install_zeros)(vr_region *, size_t));

/* Each trap's fault path: 1 if the access may restart, 0 to chain to the previous handler. Called
 * with the chunk's region entered (`active` raised) and the region open. */
int vr_sigbus_memfd_serve(vr_region *region, uintptr_t address);
int vr_sigbus_memfd_attach(vr_region *region);
int vr_sigbus_uffd_serve(vr_region *region, uintptr_t address);
int vr_sigbus_uffd_attach(vr_region *region, int trap_uffd);

#endif /* VRANGE_SIGBUS_BACKEND_H */
