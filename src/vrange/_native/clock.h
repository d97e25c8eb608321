/* Time and short waits, for every file of the native core (clock.c).
 *
 * All three are async-signal-safe (clock_gettime and nanosleep are), so the fault paths (signal
 * handlers, the uffd handler thread and workers) use them as freely as library calls do. */
#ifndef VRANGE_CLOCK_H
#define VRANGE_CLOCK_H

#include <stdint.h>

/* CLOCK_MONOTONIC in nanoseconds, and in milliseconds. */
int64_t vr_monotonic_ns(void);
int64_t vr_monotonic_ms(void);

/* The monotonic time, in nanoseconds, `timeout_ms` milliseconds from now (for a deadline loop). */
int64_t vr_deadline_ns(int64_t timeout_ms);

/* Sleep 50 us: the step of every loop that waits for another thread to let go of something. */
void vr_pause_briefly(void);

/* One step of a busy wait: tells the CPU (and a hypervisor) that this thread is spinning. */
static inline void vr_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif /* VRANGE_CLOCK_H */
