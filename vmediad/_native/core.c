/* vmediad's C core: atomics on shared-region words and futexes (prototypes in core.h). */
#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#include <sys/prctl.h>

#include "core.h"

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#ifndef FUTEX_32
#define FUTEX_32 2
struct futex_waitv { uint64_t val; uint64_t uaddr; uint32_t flags; uint32_t __reserved; };
#endif

/* Loads are acquire, stores release; read-modify-writes and vm_fence are
   sequentially consistent, which the NEED_WAKEUP handshakes rely on
   (store my flag, then load the peer's flag: a store-load pair). */
uint32_t vm_load32(uintptr_t a) { return __atomic_load_n((uint32_t *)a, __ATOMIC_ACQUIRE); }
uint64_t vm_load64(uintptr_t a) { return __atomic_load_n((uint64_t *)a, __ATOMIC_ACQUIRE); }
void vm_store32(uintptr_t a, uint32_t v) { __atomic_store_n((uint32_t *)a, v, __ATOMIC_RELEASE); }
void vm_store64(uintptr_t a, uint64_t v) { __atomic_store_n((uint64_t *)a, v, __ATOMIC_RELEASE); }
uint32_t vm_xchg32(uintptr_t a, uint32_t v) { return __atomic_exchange_n((uint32_t *)a, v, __ATOMIC_SEQ_CST); }
uint32_t vm_cas32(uintptr_t a, uint32_t e, uint32_t d) {
    __atomic_compare_exchange_n((uint32_t *)a, &e, d, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return e;
}
uint64_t vm_cas64(uintptr_t a, uint64_t e, uint64_t d) {
    __atomic_compare_exchange_n((uint64_t *)a, &e, d, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return e;
}
uint32_t vm_fadd32(uintptr_t a, uint32_t d) { return __atomic_fetch_add((uint32_t *)a, d, __ATOMIC_SEQ_CST); }
uint64_t vm_fadd64(uintptr_t a, uint64_t d) { return __atomic_fetch_add((uint64_t *)a, d, __ATOMIC_SEQ_CST); }
void vm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static void to_ts(int64_t ns, struct timespec *ts) {
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
}

/* Shared (not FUTEX_PRIVATE) futexes: the words live in MAP_SHARED memory
   mapped by several processes.  Returns 0 when woken, else -errno
   (-EAGAIN: value already differs, -ETIMEDOUT, -EINTR). timeout_ns < 0: forever. */
int vm_futex_wait(uintptr_t a, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) { to_ts(timeout_ns, &ts); tsp = &ts; }
    long r = syscall(SYS_futex, (uint32_t *)a, FUTEX_WAIT, expected, tsp, NULL, 0);
    return r == 0 ? 0 : -errno;
}

int vm_futex_wake(uintptr_t a, int count) {
    long r = syscall(SYS_futex, (uint32_t *)a, FUTEX_WAKE, count, NULL, NULL, 0);
    return r >= 0 ? (int)r : -errno;
}

/* Wait on up to 128 words at once.  Returns the index of a woken word, or
   -errno.  futex_waitv takes an absolute CLOCK_MONOTONIC timeout. */
int vm_futex_waitv(uintptr_t *addrs, uint32_t *expected, unsigned int n, int64_t timeout_ns) {
    struct futex_waitv w[128];
    struct timespec ts, *tsp = NULL;
    if (n == 0 || n > 128) return -EINVAL;
    for (unsigned int i = 0; i < n; i++) {
        w[i].val = expected[i];
        w[i].uaddr = (uint64_t)addrs[i];
        w[i].flags = FUTEX_32;
        w[i].__reserved = 0;
    }
    if (timeout_ns >= 0) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t abs_ns = (int64_t)now.tv_sec * 1000000000LL + now.tv_nsec + timeout_ns;
        to_ts(abs_ns, &ts);
        tsp = &ts;
    }
    long r = syscall(SYS_futex_waitv, w, n, 0, tsp, CLOCK_MONOTONIC);
    return r >= 0 ? (int)r : -errno;
}

/* Spin (with a CPU pause) while *addr == unexpected, at most `spins` times.
   Returns the last value seen.  Runs without the GIL. */
uint32_t vm_spin_wait32(uintptr_t a, uint32_t unexpected, uint32_t spins) {
    uint32_t v = __atomic_load_n((uint32_t *)a, __ATOMIC_ACQUIRE);
    while (v == unexpected && spins--) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        v = __atomic_load_n((uint32_t *)a, __ATOMIC_ACQUIRE);
    }
    return v;
}

uint64_t vm_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Ask the kernel to send `sig` to this process when its parent thread dies. */
int vm_set_pdeathsig(int sig) { return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 ? 0 : -errno; }
