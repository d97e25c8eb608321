/* The small exported helpers every part of the core shares (declared in common.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <unistd.h>

#include "common.h"

int vr_native_version(void) { return VR_NATIVE_VERSION; }

long vr_page_size(void) { return sysconf(_SC_PAGESIZE); }

int vr_close(int fd)
{
    /* Linux always releases the descriptor, even when close() reports EINTR: never retry. */
    if (close(fd) < 0 && errno != EINTR)
        return -errno;
    return 0;
}
