/* Isolated regenerators: a helper process runs the Python regenerator (isolated.c). */
#ifndef VRANGE_ISOLATED_H
#define VRANGE_ISOLATED_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define VR_ISOLATED_SLOTS 4
#define VR_ISOLATED_ERROR_BYTES 4096

/* cffi: begin (exported to Python; build.py reads these blocks) */
typedef struct vr_isolated vr_isolated;
int vr_isolated_new(int memfd, size_t slot_size, int timeout_ms, vr_isolated **out);
int vr_isolated_claim_all(vr_isolated *isolated, int timeout_ms);
void vr_isolated_set_helper(vr_isolated *isolated, int pid, const int *fds);
void vr_isolated_release_all(vr_isolated *isolated);
int vr_isolated_dead(vr_isolated *isolated);
int vr_isolated_helper_pid(vr_isolated *isolated);
size_t vr_isolated_last_error(vr_isolated *isolated, char *out, size_t size);
void vr_isolated_forget_helper(vr_isolated *isolated);
int vr_isolated_remap(vr_isolated *isolated, int memfd);
void vr_isolated_free(vr_isolated *isolated);
/* cffi: end */

/* The fault path: fill `buffer` with `length` bytes at `offset` from the helper. 0 or -errno
 * (-EPIPE: no helper, -ETIMEDOUT: it hung and was killed, -EIO: the regenerator raised, its
 * traceback in last_error). Async-signal-safe; needs no GIL. */
int vr_isolated_fill(vr_isolated *isolated, uint64_t offset, char *buffer, size_t length);

#endif /* VRANGE_ISOLATED_H */
