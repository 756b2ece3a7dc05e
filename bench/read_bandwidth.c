/* The memory-bandwidth limit for bench/generate.py: read a buffer once with several threads, each
 * a contiguous slice summed with eight independent accumulators (so the adds never wait on each
 * other and the loop is bound by the loads alone). Compiled by generate.py with the machine's C
 * compiler at -O3 and no ISA flag: 16-byte loads already keep a core's memory requests at the
 * limit, so the figure does not depend on the kernels' vector width. */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_PARTS 256

struct part {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
};

static void *read_part(void *arg) {
    struct part *t = arg;
    uint64_t a[8] = {0};
    size_t i = 0;
    for (; i + 8 <= t->n; i += 8)
        for (int j = 0; j < 8; j++) a[j] += t->p[i + j];
    for (; i < t->n; i++) a[0] += t->p[i];
    t->sum = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
    return NULL;
}

/* reads `bytes` (a multiple of 8) of buf with `threads` threads (part 0 on the caller); returns the
 * sum of its 64-bit words, which the caller checks so that no read can be left out */
uint64_t read_all(const void *buf, size_t bytes, int threads) {
    struct part parts[MAX_PARTS];
    pthread_t ids[MAX_PARTS];
    if (threads < 1) threads = 1;
    if (threads > MAX_PARTS) threads = MAX_PARTS;
    size_t words = bytes / 8, per = (words + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        size_t lo = t * per < words ? t * per : words, hi = lo + per < words ? lo + per : words;
        parts[t] = (struct part){(const uint64_t *)buf + lo, hi - lo, 0};
    }
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, read_part, &parts[started])) break;
    read_part(&parts[0]);
    for (int t = started; t < threads; t++) read_part(&parts[t]); /* threads that did not start */
    uint64_t sum = parts[0].sum;
    for (int t = 1; t < threads; t++) {
        if (t < started) pthread_join(ids[t], NULL);
        sum += parts[t].sum;
    }
    return sum;
}
