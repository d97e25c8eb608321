/* Deliberate sanitizer reports. .ci/sanitizers builds this with the sanitizer flags the native core
 * gets and triggers each function in the kinds of process a test can report from (a forked child, a
 * subprocess whose stderr is captured) before it runs the tests: a run only passes on an empty report
 * directory if the reports of such processes do reach it. Not part of vrange. */
#include <stdlib.h>

int canary_heap_overflow(size_t size)
{
    char *volatile buffer = malloc(size);
    buffer[size] = 1; /* one byte past the end: AddressSanitizer, heap-buffer-overflow */
    int value = buffer[0];
    free(buffer);
    return value;
}

int canary_shift(int bits)
{
    return 1 << bits; /* bits >= 32: UndefinedBehaviorSanitizer, shift exponent too large */
}
