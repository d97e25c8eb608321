/* Filling the missing pages of a userfaultfd-registered range: UFFDIO_COPY, UFFDIO_ZEROPAGE and
 * UFFDIO_POISON, page by page where part of the range is present already.
 *
 * Shared by the uffd backend (called on its handler thread and workers) and by the sigbus backend's
 * userfaultfd trap (called inside the SIGBUS handler of the faulting thread): it uses only ioctls on
 * the descriptor and the memory it is handed, so it is async-signal-safe and never needs the GIL. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <sys/ioctl.h>

#include "uffd_fill.h"

#define COPY_EAGAIN_RETRIES 1000

/* Pages that are already present (EEXIST) are kept as they are: a write made by the program is
 * never overwritten. Nothing is woken here (DONTWAKE): the uffd backend clears IN_FLIGHT first and
 * then wakes the range, so a thread whose fault was set aside while the chunk was in flight is always
 * woken after the chunk is done; the trap has no waiters at all (its faults are SIGBUS). */
int vr_uffd_fill_missing(int uffd, size_t page_size, uintptr_t start, size_t length,
                         const char *source, enum vr_fill_kind kind)
{
    size_t done = 0;
    int eagain_retries = 0;
    while (done < length) {
        int64_t progress;
        int rc;
        if (kind == VR_FILL_COPY) {
            struct uffdio_copy copy = { .dst = start + done, .src = (uintptr_t)(source + done),
                                        .len = length - done, .mode = UFFDIO_COPY_MODE_DONTWAKE };
            rc = ioctl(uffd, UFFDIO_COPY, &copy);
            progress = copy.copy;
        } else if (kind == VR_FILL_ZEROPAGE) {
            struct uffdio_zeropage zero = { .range = { .start = start + done, .len = length - done },
                                            .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE };
            rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zero);
            progress = zero.zeropage;
        } else {
            struct vr_uffdio_poison poison = { .range = { .start = start + done, .len = length - done },
                                               .mode = UFFDIO_COPY_MODE_DONTWAKE };
            rc = ioctl(uffd, VR_UFFDIO_POISON, &poison);
            progress = poison.updated;
        }
        if (rc == 0)
            break;
        int err = errno;
        if (progress > 0) {
            done += (size_t)progress;
            continue;
        }
        if (err == EEXIST) {
            done += page_size; /* present already: keep it */
            continue;
        }
        if (err == EAGAIN && eagain_retries++ < COPY_EAGAIN_RETRIES) {
            sched_yield(); /* the mm is changing (an event is queued): try again */
            continue;
        }
        return -err;
    }
    return 0;
}
