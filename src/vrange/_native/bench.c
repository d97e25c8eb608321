/* Benchmark helper: touch one byte per stride over a range and time it, without Python in the loop.
 * Runs with the GIL released (cffi), so Python-regenerator faults it causes take the worker path. */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>

#include "common.h"

int vr_touch_pages(uintptr_t address, size_t length, size_t stride, int write, uint64_t *ns_out)
{
    if (stride == 0)
        return -EINVAL;
    struct timespec start, end;
    if (clock_gettime(CLOCK_MONOTONIC, &start) < 0)
        return -errno;
    volatile unsigned char *bytes = (volatile unsigned char *)address;
    unsigned sum = 0;
    for (size_t offset = 0; offset < length; offset += stride) {
        if (write)
            bytes[offset] = 1;
        else
            sum += bytes[offset];
    }
    if (clock_gettime(CLOCK_MONOTONIC, &end) < 0)
        return -errno;
    (void)sum;
    *ns_out = (uint64_t)(end.tv_sec - start.tv_sec) * 1000000000u + (uint64_t)(end.tv_nsec - start.tv_nsec);
    return 0;
}
