/* Time and short waits: see clock.h. */
#define _GNU_SOURCE
#include <time.h>

#include "clock.h"

int64_t vr_monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now); /* async-signal-safe; cannot fail for this clock */
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

int64_t vr_monotonic_ms(void) { return vr_monotonic_ns() / 1000000; }

int64_t vr_deadline_ns(int64_t timeout_ms) { return vr_monotonic_ns() + timeout_ms * 1000000; }

void vr_pause_briefly(void)
{
    struct timespec step = { .tv_sec = 0, .tv_nsec = 50000 };
    nanosleep(&step, NULL);
}
