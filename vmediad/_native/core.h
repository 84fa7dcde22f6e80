/* vmediad's C core: atomics on shared-region words and futexes.
 *
 * Relies on: Linux futex(2) and futex_waitv(2) (5.16+; the number is defined here when the
 * headers are older), GCC/Clang __atomic builtins.  No Python or FFmpeg internals.
 * cffi reads the prototypes below as its cdef: keep this header free of preprocessor lines
 * between the markers.
 */
#pragma once
#include <stdint.h>

/* cdef-begin */
uint32_t vm_load32(uintptr_t addr);
uint64_t vm_load64(uintptr_t addr);
void vm_store32(uintptr_t addr, uint32_t value);
void vm_store64(uintptr_t addr, uint64_t value);
uint32_t vm_xchg32(uintptr_t addr, uint32_t value);
uint32_t vm_cas32(uintptr_t addr, uint32_t expected, uint32_t desired);
uint64_t vm_cas64(uintptr_t addr, uint64_t expected, uint64_t desired);
uint32_t vm_fadd32(uintptr_t addr, uint32_t delta);
uint64_t vm_fadd64(uintptr_t addr, uint64_t delta);
void vm_fence(void);
int vm_futex_wait(uintptr_t addr, uint32_t expected, int64_t timeout_ns);
int vm_futex_wake(uintptr_t addr, int count);
int vm_futex_waitv(uintptr_t *addrs, uint32_t *expected, unsigned int n, int64_t timeout_ns);
uint32_t vm_spin_wait32(uintptr_t addr, uint32_t unexpected, uint32_t spins);
uint64_t vm_monotonic_ns(void);
int vm_set_pdeathsig(int sig);
/* cdef-end */
