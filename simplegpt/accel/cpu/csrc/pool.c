/* The library's two ways of splitting work over threads.
 *
 * Training kernels (layernorm.c, gelu.c, attention.c's causal attention, adamw.c, block.c's and
 * model.c's training passes) use OpenMP. The library is linked against libgomp, and in a process
 * where torch (built with OpenMP, as its Linux wheels are) is loaded, the loader binds it to torch's
 * own copy: these loops run on torch's threads, with torch.set_num_threads' count, beside the MKL
 * sgemm calls of the same step, instead of a second pool fighting the first for the cores.
 *
 * Decoding kernels (gemv.c, attention.c's attend_cached, block.c's sg_blocks1) use the pool below:
 * the calling thread and (threads - 1) workers that spin briefly for the next call and then sleep.
 * A decode step is ~50 memory-bound products back to back, each a few to a few hundred
 * microseconds; the pool hands one out with an atomic counter and no barrier on the way in.
 * Why not OpenMP here as well (one pool for the whole library): measured on the 2-core machine, the
 * same row split of GPT-2 124M's 49 products a token (batch 1) on an OpenMP team of 2 took
 * 15.7-16.3 ms against the pool's 14.8-17.4 ms (separate processes, median of 15 tokens, three runs
 * each, a quiet moment): nothing to gain. With the other cores busy it lost: 206-787 ms against
 * 78-163 ms (likely libgomp's barrier, which sleeps after its spin and is woken through the
 * kernel, ~50 times a token). And it would cost what the pool has: decoding on every core where the compiler has
 * no OpenMP (lib.py then builds without it), a fresh start in a forked child (sg_init's atfork,
 * decode.py's register_at_fork), and one call at a time from concurrent Python threads (pool_lock)
 * instead of a team per caller oversubscribing the cores.
 */
#include "kernels.h"
#include <pthread.h>
#include <stdatomic.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SPIN_ROUNDS 20000

int sg_omp_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static struct {
    pthread_mutex_t call;  /* one call at a time (Python threads may call concurrently) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;       /* bumped for every call */
    atomic_int done;       /* workers finished with the current call */
    int sleepers, workers, started;
    pool_fn fn;            /* the current call: fn(arg, part, parts) */
    void *arg;
    int parts;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void *worker(void *arg) {
    /* arg: the part number in the low 8 bits, above them the call count when the worker was made */
    int part = (int)((uintptr_t)arg & 0xff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 8);
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            pool.sleepers++;
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pool.sleepers--;
            pthread_mutex_unlock(&pool.mu);
            spins = 0;
        }
        seen = gen;
        if (part < pool.parts) pool.fn(pool.arg, part, pool.parts);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void forget_workers(void) { pool.workers = 0; pool.started = 0; } /* a forked child has none */

/* Start (threads - 1) workers; returns the number of threads calls will use. */
int sg_init(int threads) {
    pthread_mutex_lock(&pool.call);
    if (!pool.started) {
        pthread_atfork(NULL, NULL, forget_workers);
        pool.started = 1;
    }
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    while (pool.workers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uintptr_t arg = ((uintptr_t)atomic_load(&pool.gen) << 8) | (uintptr_t)(pool.workers + 1);
        int failed = pthread_create(&t, &attr, worker, (void *)arg);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    int n = pool.workers + 1;
    pthread_mutex_unlock(&pool.call);
    return n;
}

void pool_lock(void) { pthread_mutex_lock(&pool.call); }

void pool_unlock(void) { pthread_mutex_unlock(&pool.call); }

/* the parts a call of `threads` threads gets: at most the pool's threads */
int pool_parts(int threads) { return threads < pool.workers + 1 ? threads : pool.workers + 1; }

/* fn(arg, 0..parts-1): part 0 here, the others on the workers; returns when all are done */
void pool_run(pool_fn fn, void *arg, int parts) {
    pool.fn = fn;
    pool.arg = arg;
    pool.parts = parts;
    if (parts == 1) {
        fn(arg, 0, 1);
        return;
    }
    atomic_store(&pool.done, 0);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    if (pool.sleepers) pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(arg, 0, parts);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < pool.workers) _mm_pause();
}
