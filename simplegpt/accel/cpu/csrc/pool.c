/* The library's two ways of splitting work over threads.
 *
 * Training kernels (layernorm.c, gelu.c, attention.c's causal attention, adamw.c, block.c's and
 * model.c's training passes) use OpenMP. The library is linked against libgomp, and in a process
 * where torch (built with OpenMP, as its Linux wheels are) is loaded, the loader binds it to torch's
 * own copy: these loops run on torch's threads, with torch.set_num_threads' count, beside the MKL
 * sgemm calls of the same step, instead of a second pool fighting the first for the cores.
 *
 * Decoding kernels (gemv.c, attention.c's attend_cached, block.c's sg_blocks1) use the pool below:
 * the calling thread and (threads - 1) workers. A decode step is ~50 memory-bound products back to
 * back, each a few to a few hundred microseconds, so between calls the workers spin (SPIN_NS) and
 * only then sleep. A call's parts are handed out through one atomic word: whoever comes first takes
 * the next part, the caller included, so a call never waits for a worker that has not started.
 * That matters where another process holds a core: when each worker had its own part, every one of
 * the ~50 calls of a token waited for a worker the scheduler had put aside until its turn came
 * back (with one busy process on a 2-core machine, 2 threads decoded a small model at 50-73
 * tokens/s, 1 thread at 2,632-2,714). A caller waiting for a part a worker took spins briefly,
 * then sleeps, so that the scheduler can move that worker onto its core. A worker that finds it
 * was put aside while it spun (its clock jumped), or one the caller waited for longer than its own
 * parts took, starts a backoff: for BACKOFF_NS the caller runs every part itself and wakes no one
 * (the workers fall asleep), so the core stays with the process that holds it instead of being
 * spun for. The parts are the same whoever runs them: the results do not depend on the load.
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
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SPIN_NS 500000L      /* a worker spins this long for the next call, then sleeps */
#define PREEMPTED_NS 250000L /* a gap this long in a spin: put aside for another thread (interrupts are shorter) */
#define WAIT_SPIN_NS 100000L /* the caller spins this long for the parts the workers started */
#define BACKOFF_NS 20000000L /* how long the caller runs alone once a worker could not get a core */
#define CHECK_EVERY 64       /* pauses between two looks at the clock (~1.5 us) */

/* which code paths this build has: "avx512", "avx2" or "portable" (simd.h), checked by lib.py against the
 * variant it built */
const char *sg_variant(void) { return SG_VARIANT; }

int sg_omp_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* pool.state: the call's number (high 32 bits), its parts (next 16) and the next part to take (low 16) */
#define STATE(call, parts) ((uint64_t)(call) << 32 | (uint64_t)(parts) << 16)
#define PARTS(s) ((int)((s) >> 16 & 0xffff))
#define NEXT(s) ((int)((s) & 0xffff))

static struct {
    pthread_mutex_t call;      /* one call at a time (Python threads may call concurrently) */
    pthread_mutex_t mu;        /* for sleeping: workers on `wake`, the caller on `done` */
    pthread_cond_t wake, done;
    _Atomic uint64_t state;    /* see STATE */
    atomic_int finished;       /* parts of the current call done */
    atomic_int sleepers;       /* workers asleep on `wake`, not yet woken */
    atomic_int waiting;        /* the caller is asleep on `done` */
    _Atomic int64_t backoff;   /* until when (CLOCK_MONOTONIC ns) the caller runs alone; 0: it does not */
    pool_fn fn;                /* the current call: fn(arg, part, parts) */
    void *arg;
    uint32_t calls;            /* the caller's count of calls */
    int workers, started;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000L + t.tv_nsec;
}

static void back_off(int64_t now) { atomic_store_explicit(&pool.backoff, now + BACKOFF_NS, memory_order_relaxed); }

/* Takes the next part of the current call: its number, or -1 when all are taken; *seen: the state read */
static int take_part(uint64_t *seen) {
    uint64_t s = atomic_load_explicit(&pool.state, memory_order_acquire);
    while (NEXT(s) < PARTS(s))
        if (atomic_compare_exchange_weak_explicit(&pool.state, &s, s + 1, memory_order_acq_rel, memory_order_acquire))
            break;
    *seen = s;
    return NEXT(s) < PARTS(s) ? NEXT(s) : -1;
}

/* Runs part `part` of the current call (which cannot end before it is counted) and counts it */
static void run_part(int part, int parts) {
    pool.fn(pool.arg, part, parts);
    if (atomic_fetch_add(&pool.finished, 1) + 1 == parts && atomic_load(&pool.waiting)) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_signal(&pool.done);
        pthread_mutex_unlock(&pool.mu);
    }
}

/* A worker's wait for a state other than `seen`: spin, then sleep on `wake`. A worker that finds it
 * was put aside (a gap between two looks at the clock, a new call or not) backs off: it sleeps
 * until a call after the backoff wakes it. */
static void wait_for_call(uint64_t seen) {
    int64_t start = now_ns(), last = start;
    for (;;) {
        int called = 0;
        for (int i = 0; i < CHECK_EVERY && !called; i++) {
            called = atomic_load_explicit(&pool.state, memory_order_acquire) != seen;
            cpu_relax();
        }
        int64_t t = now_ns();
        if (t - last > PREEMPTED_NS) { /* put aside for another thread: it needs the core more */
            back_off(t);
            seen = atomic_load(&pool.state); /* the caller takes what is left of this call */
            break;
        }
        if (called) return;
        if (t - start > SPIN_NS) break;
        last = t;
    }
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.sleepers, 1); /* before looking at the state: pool_run looks at sleepers after */
    while (atomic_load(&pool.state) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
}

static void *worker(void *unused) {
    (void)unused;
    for (;;) {
        uint64_t seen;
        int part;
        while ((part = take_part(&seen)) >= 0) run_part(part, PARTS(seen));
        wait_for_call(seen);
    }
    return NULL;
}

/* a forked child has no workers, and nobody holds its copy of the sleeping lock */
static void forget_workers(void) {
    pool.workers = 0;
    pool.started = 0;
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.waiting, 0);
}

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
        int failed = pthread_create(&t, &attr, worker, NULL);
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

/* fn(arg, 0..parts-1): the caller takes parts as the workers do; returns when all are done */
void pool_run(pool_fn fn, void *arg, int parts) {
    int alone = parts == 1;
    int64_t until = atomic_load_explicit(&pool.backoff, memory_order_relaxed);
    if (until && !alone) {
        if (now_ns() < until) alone = 1;
        else atomic_store_explicit(&pool.backoff, 0, memory_order_relaxed);
    }
    if (alone) { /* the same parts, one after another */
        for (int part = 0; part < parts; part++) fn(arg, part, parts);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    atomic_store(&pool.state, STATE(++pool.calls, parts)); /* publishes fn and arg (and finished) */
    int woke = atomic_load(&pool.sleepers) > 0;
    if (woke) { /* sleepers is zeroed here, not by the woken: one wake-up each, however late they run */
        pthread_mutex_lock(&pool.mu);
        atomic_store(&pool.sleepers, 0);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    uint64_t seen;
    int part;
    int64_t mine = now_ns();
    while ((part = take_part(&seen)) >= 0) run_part(part, parts);
    int64_t start = now_ns();
    mine = start - mine; /* how long the caller's parts took */
    do {
        for (int i = 0; i < CHECK_EVERY; i++) {
            if (atomic_load_explicit(&pool.finished, memory_order_acquire) == parts) return;
            cpu_relax();
        }
    } while (now_ns() - start < WAIT_SPIN_NS);
    /* A worker has not finished its part yet. Unless it was just woken (it starts late) or its part
     * is merely slower than the caller's, it was put aside for another thread mid-part: sleeping
     * here lets the scheduler move it onto this core, and the next calls run alone. */
    pthread_mutex_lock(&pool.mu);
    atomic_store(&pool.waiting, 1); /* before looking at finished: run_part looks at waiting after */
    while (atomic_load(&pool.finished) < parts) pthread_cond_wait(&pool.done, &pool.mu);
    atomic_store(&pool.waiting, 0);
    pthread_mutex_unlock(&pool.mu);
    int64_t now = now_ns();
    if (!woke && now - start > mine) back_off(now);
}
