// CUDA's execution model on the CPU, for running edgeseg's real kernels under ASan + UBSan.
//
// Included before kernels/_common.cu (whose inline PTX build.py translates into the
// cuda_cpu::ptx functions below) and the kernel file itself. What is modelled:
//  * __global__/__device__/__forceinline__; threadIdx/blockIdx/blockDim/gridDim (CUDA's types);
//  * a launch = every block in order; each block's threads run either
//      - serially, one after another, for kernels that never reach __syncthreads (without a
//        barrier CUDA promises no order between a block's threads, so this is one legal schedule),
//      - or as fibers (one stack each, see Context) for kernels that do: __syncthreads() switches to
//        the next fiber, and a block moves past a barrier only once every thread has reached it.
//        Fibers rather than OS threads: deterministic, so a missing __syncthreads gives the same
//        wrong answer every run instead of a race that shows up only sometimes; the schedule runs
//        each thread as far as it can before the next one starts (the adversarial order for a
//        missed barrier), forward or reversed (the tests run the barrier kernels both ways); and
//        256 fibers a block cost microseconds where 256 OS threads on 2 cores cost milliseconds.
//        A block where some threads wait at a barrier while others have exited is an error; two
//        different __syncthreads reached by different threads are not told apart (neither does
//        the hardware's barrier 0).
//  * __shared__ arrays: build.py rewrites each into cuda_cpu::shared_array<T>(n, site), one heap
//    allocation per block and site, filled with garbage (shared memory starts undefined) and
//    freed at the end of the block: ASan then sees overruns of shared arrays too;
//  * atomicAdd (std::atomic_ref, alignment checked), __float_as_uint/__uint_as_float;
//  * launch arguments copied by value at launch, with their sizes checked against the kernel's
//    parameters (the driver would silently read the wrong bytes).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_CPU_ASAN 1
#else
#define CUDA_CPU_ASAN 0
#endif

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

namespace cuda_cpu {

// -- execution contexts: a 6-register switch on x86-64 (no syscall, nothing for ASan to
// intercept: it is told about every switch through the fiber annotations below), ucontext
// elsewhere (correct, about 10x slower: swapcontext masks signals and ASan clears the stack's
// shadow at every switch).
#if defined(__x86_64__)
extern "C" void cuda_cpu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden cuda_cpu_switch
    .globl cuda_cpu_switch
    .type cuda_cpu_switch,@function
cuda_cpu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_cpu_switch, .-cuda_cpu_switch
)");
struct Context {
    void* sp = nullptr;
};
inline void ctx_switch(Context* from, Context* to) { cuda_cpu_switch(&from->sp, to->sp); }
inline void ctx_make(Context* c, void* stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack) + size;
    top &= ~uintptr_t(15);
    auto* sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                           // entry's return address: it never returns
    *--sp = reinterpret_cast<void*>(entry);    // where the first switch "returns" to
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12-r15 (rbp 0 ends stack traces)
    c->sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void ctx_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
inline void ctx_make(Context* c, void* stack, size_t size, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}
#endif

constexpr size_t kStackSize = 64 * 1024;  // ample for these kernels, even with ASan's larger frames

struct Fiber {
    Context ctx;
    void* stack = nullptr;
    void* fake = nullptr;  // ASan fake stack saved while switched out
    uint3 tid{0, 0, 0};
    bool done = false;
    bool at_barrier = false;
};

struct State {
    uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
    dim3 block_dim{1, 1, 1}, grid_dim{1, 1, 1};
    bool fibers = false;
    bool exiting = false;
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    Context sched;
    Fiber* cur = nullptr;
    void* sched_fake = nullptr;
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
    std::vector<Fiber> pool;
    std::vector<std::pair<int, void*>> shared;  // this block's __shared__ arrays by site
    const char* kernel = "";
    char error[1024] = {0};
};

inline State& st() {
    static thread_local State s;
    return s;
}

[[noreturn]] inline void fatal(const char* what) {
    // A CUDA execution error the GPU would show as a hang, a fault or garbage: stop the process
    // loudly (the test reads stderr), as the sanitizers do.
    std::fprintf(stderr, "CUDA-ON-CPU ERROR in kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s\n",
                 st().kernel, st().block_idx.x, st().block_idx.y, st().block_idx.z, st().thread_idx.x,
                 st().thread_idx.y, st().thread_idx.z, what);
    std::fflush(stderr);
    std::abort();
}

inline const uint3& thread_idx() { return st().thread_idx; }
inline const uint3& block_idx() { return st().block_idx; }
inline const dim3& block_dim() { return st().block_dim; }
inline const dim3& grid_dim() { return st().grid_dim; }

// -- fibers ------------------------------------------------------------------------------------
inline void switch_to_scheduler(Fiber* f, bool final_exit) {
    State& s = st();
#if CUDA_CPU_ASAN
    __sanitizer_start_switch_fiber(final_exit ? nullptr : &f->fake, s.sched_bottom, s.sched_size);
#endif
    ctx_switch(&f->ctx, &s.sched);
#if CUDA_CPU_ASAN
    __sanitizer_finish_switch_fiber(f->fake, nullptr, nullptr);
#endif
}

inline void fiber_main() {
    State& s = st();
#if CUDA_CPU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &s.sched_bottom, &s.sched_size);
#endif
    Fiber* f = s.cur;
    // A fiber serves one thread slot for every block of the launch.
    while (!s.exiting) {
        s.body(s.ctx);
        f->done = true;
        switch_to_scheduler(f, false);
    }
    f->done = true;
    switch_to_scheduler(f, true);  // never resumed
}

inline void resume(Fiber* f) {
    State& s = st();
    s.cur = f;
    s.thread_idx = f->tid;
#if CUDA_CPU_ASAN
    __sanitizer_start_switch_fiber(&s.sched_fake, f->stack, kStackSize);
#endif
    ctx_switch(&s.sched, &f->ctx);
#if CUDA_CPU_ASAN
    __sanitizer_finish_switch_fiber(s.sched_fake, nullptr, nullptr);
#endif
}

inline void syncthreads() {
    State& s = st();
    if (!s.fibers)
        fatal("__syncthreads reached in a kernel that build.py classified as barrier-free (call graph scan missed it)");
    s.cur->at_barrier = true;
    switch_to_scheduler(s.cur, false);
}

// -- __shared__ ------------------------------------------------------------------------------
template <typename T>
T* shared_array(size_t n, int site) {
    State& s = st();
    for (auto& e : s.shared)
        if (e.first == site) return static_cast<T*>(e.second);
    void* p = std::malloc(n * sizeof(T));
    std::memset(p, 0xA5, n * sizeof(T));  // undefined at block start: never zero by luck
    s.shared.emplace_back(site, p);
    return static_cast<T*>(p);
}

inline void free_shared() {
    for (auto& e : st().shared) std::free(e.second);
    st().shared.clear();
}

// -- the launch ------------------------------------------------------------------------------
inline void run_block_serial(const dim3& b) {
    State& s = st();
    for (unsigned z = 0; z < b.z; ++z)
        for (unsigned y = 0; y < b.y; ++y)
            for (unsigned x = 0; x < b.x; ++x) {
                s.thread_idx = uint3{x, y, z};
                s.body(s.ctx);
            }
}

inline void run_block_fibers(size_t n, bool reverse) {
    State& s = st();
    for (size_t i = 0; i < n; ++i) s.pool[i].done = s.pool[i].at_barrier = false;
    for (;;) {
        for (size_t k = 0; k < n; ++k) {
            Fiber* f = &s.pool[reverse ? n - 1 - k : k];
            if (f->done) continue;
            f->at_barrier = false;
            resume(f);
        }
        size_t done = 0, waiting = 0;
        for (size_t i = 0; i < n; ++i) (s.pool[i].done ? done : waiting) += 1;
        if (waiting == 0) return;
        if (done != 0) {
            s.thread_idx = s.pool[0].tid;
            char msg[200];
            std::snprintf(msg, sizeof msg,
                          "__syncthreads reached by %zu of the block's %zu threads (the others exited): "
                          "divergent barrier",
                          waiting, n);
            fatal(msg);
        }
    }
}

inline void make_fibers(const dim3& b, size_t n) {
    State& s = st();
    s.pool.resize(n);
    size_t i = 0;
    for (unsigned z = 0; z < b.z; ++z)
        for (unsigned y = 0; y < b.y; ++y)
            for (unsigned x = 0; x < b.x; ++x, ++i) {
                Fiber& f = s.pool[i];
                f = Fiber{};
                f.tid = uint3{x, y, z};
                f.stack = std::malloc(kStackSize);
                ctx_make(&f.ctx, f.stack, kStackSize, fiber_main);
            }
}

inline void end_fibers() {
    State& s = st();
    s.exiting = true;
    for (auto& f : s.pool) {
        f.done = false;
        resume(&f);  // leaves its loop and switches back for good
    }
    for (auto& f : s.pool) std::free(f.stack);
    s.pool.clear();
    s.exiting = false;
}

template <typename Tuple, typename K, size_t... I>
void call_with(K kernel, Tuple& t, std::index_sequence<I...>) {
    // The kernel gets its own copy of each argument per thread, as parameters are per launch
    // constant memory on the device (a kernel writing its by-value parameter changes nothing else).
    Tuple copy = t;
    kernel(std::get<I>(copy)...);
}

template <typename... A>
int launch(void (*kernel)(A...), const char* name, bool barriers, const unsigned* grid, const unsigned* block,
           unsigned long long shmem, void** args, const unsigned long long* sizes, int n_args, int reverse) {
    State& s = st();
    s.kernel = name;
    if (n_args != (int)sizeof...(A)) {
        std::snprintf(s.error, sizeof s.error, "%s takes %zu arguments, the launch passed %d", name, sizeof...(A),
                      n_args);
        return 1;
    }
    const size_t want[] = {sizeof(std::decay_t<A>)..., 0};
    for (int i = 0; sizes && i < n_args; ++i)
        if (sizes[i] != want[i]) {
            std::snprintf(s.error, sizeof s.error, "argument %d of %s is %llu bytes, the kernel's parameter is %zu",
                          i, name, sizes[i], want[i]);
            return 1;
        }
    const dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
    const size_t threads = (size_t)b.x * b.y * b.z;
    if (!g.x || !g.y || !g.z || !threads || threads > 1024 || b.z > 64 || g.y > 65535 || g.z > 65535 ||
        shmem > 48 * 1024) {
        std::snprintf(s.error, sizeof s.error, "invalid launch of %s: grid (%u,%u,%u) block (%u,%u,%u) shmem %llu",
                      name, g.x, g.y, g.z, b.x, b.y, b.z, shmem);
        return 1;
    }
    using Tuple = std::tuple<std::decay_t<A>...>;
    Tuple values;
    {
        size_t i = 0;
        std::apply([&](auto&... v) { ((std::memcpy(&v, args[i], sizeof v), ++i), ...); }, values);
    }
    struct Ctx {
        void (*kernel)(A...);
        Tuple* values;
    } ctx{kernel, &values};
    s.body = [](void* p) {
        auto* c = static_cast<Ctx*>(p);
        call_with(c->kernel, *c->values, std::index_sequence_for<A...>{});
    };
    s.ctx = &ctx;
    s.grid_dim = g;
    s.block_dim = b;
    s.fibers = barriers;
    if (barriers) make_fibers(b, threads);
    for (unsigned z = 0; z < g.z; ++z)
        for (unsigned y = 0; y < g.y; ++y)
            for (unsigned x = 0; x < g.x; ++x) {
                s.block_idx = uint3{x, y, z};
                if (barriers) run_block_fibers(threads, reverse != 0);
                else run_block_serial(b);
                free_shared();
            }
    if (barriers) end_fibers();
    s.fibers = false;
    s.kernel = "";
    return 0;
}

// What the driver reads from a cubin's metadata: each parameter's size.
template <typename... A>
int param_sizes(void (*)(A...), unsigned long long* out, int cap) {
    const unsigned long long s[] = {sizeof(std::decay_t<A>)..., 0};
    for (int i = 0; i < (int)sizeof...(A) && i < cap; ++i) out[i] = s[i];
    return (int)sizeof...(A);
}

// -- the PTX that _common.cu uses, as plain C++ --------------------------------------------
namespace ptx {

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// cvt.f32.f16: exact.
inline float cvt_f32_f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
    if (e) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
    if (!m) return bits_float(sign);
    // subnormal half: m * 2^-24, exact in float
    const float v = (float)m * 5.9604644775390625e-08f;
    return (h & 0x8000u) ? -v : v;
}

// cvt.rn.f16.f32: round to nearest even, overflow to inf, NaN to the canonical NaN.
inline uint16_t cvt_rn_f16_f32(float f) {
    const uint32_t u = float_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;
    if (a >= 0x477ff000u) return sign | 0x7c00u;  // ≥ 65520 rounds to inf (and inf itself)
    if (a < 0x38800000u) {                        // below 2^-14: subnormal half or zero
        if (a < 0x33000000u) return sign;         // < 2^-25: rounds to 0 (2^-25 itself ties to 0)
        const uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;          // value = mant * 2^(e-150); half ulp is 2^-24
        uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return sign | (uint16_t)q;
    }
    uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
    const uint32_t rem = r & 0x1fffu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return sign | (uint16_t)r;
}

}  // namespace ptx
}  // namespace cuda_cpu

#define threadIdx (::cuda_cpu::thread_idx())
#define blockIdx (::cuda_cpu::block_idx())
#define blockDim (::cuda_cpu::block_dim())
#define gridDim (::cuda_cpu::grid_dim())

inline void __syncthreads() { ::cuda_cpu::syncthreads(); }

template <typename T>
inline T atomicAdd(T* p, std::type_identity_t<T> v) {
    static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned int> ||
                      std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "CUDA has no atomicAdd for this type");
    if (reinterpret_cast<uintptr_t>(p) % alignof(T)) ::cuda_cpu::fatal("misaligned atomicAdd address");
    return std::atomic_ref<T>(*p).fetch_add(v);
}

inline unsigned int __float_as_uint(float f) { return ::cuda_cpu::ptx::float_bits(f); }
inline float __uint_as_float(unsigned int u) { return ::cuda_cpu::ptx::bits_float(u); }

extern "C" const char* cuda_cpu_error() { return ::cuda_cpu::st().error; }
extern "C" unsigned short cuda_cpu_f2h(float f) { return ::cuda_cpu::ptx::cvt_rn_f16_f32(f); }
extern "C" float cuda_cpu_h2f(unsigned short h) { return ::cuda_cpu::ptx::cvt_f32_f16(h); }
