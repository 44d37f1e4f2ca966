// A CPU emulation of the part of CUDA that the kernels in kernels/cuda/*.cuh use, so that their
// logic (indexing, barriers, warp collectives, tensor-core fragment layouts, copy pipelines) is
// tested on machines without a GPU. Each block's threads run as fibers (ucontext) on the calling
// thread, one block at a time; a thread runs until it waits, then the next one runs:
//  - __shared__ variables become function statics (one block at a time shares them); dynamic
//    shared memory is a buffer filled with 0xff bytes before each block;
//  - __syncthreads is a barrier that exited threads leave, as on the GPU;
//  - warp collectives (shuffles, mma.sync, ldmatrix) exchange through per-warp slots between two
//    warp barriers; mma.sync (m16n8k16 16-bit, m16n8k32 E4M3) reads its fragments by the PTX ISA's
//    layouts and sums the products in double;
//  - cp.async copies land when waited for (or at once, with eager_copies);
//  - Hopper's wgmma (m64n128 over a 32-byte K slice: BF16/F16 k16, FP8 E4M3 k32; B, and A unless it
//    comes from registers, in shared memory through descriptors with the 128-byte swizzle) runs
//    when its group is waited for, reading shared memory then; A from registers is gathered when
//    issued, and the wait checks that the thread left its registers unchanged; shared memory
//    addresses start at a base that is not 1024-aligned, as kernels must not assume;
//  - mbarriers keep their phase by address; cp.async.mbarrier.arrive lands the thread's copies
//    first;
//  - a block whose every live thread waits for what none of them will do throws (a deadlock);
//  - atomics take a lock.
// Not emulated: the memory model beyond what the barriers order, the hardware's rounding inside
// the tensor cores, and everything else CUDA has. The tests are built with ThreadSanitizer, which
// sees each fiber as a thread and the barriers, mbarriers and atomics as their only ordering, so it
// reports what no barrier orders: one thread's shared memory read against another's write with no
// __syncthreads / __syncwarp / wait between them is a data race, whatever order the fibers ran in.
// Blocks are ordered one after the other (a block's threads see the previous blocks' writes).
// Include it before any kernel header.
#pragma once

#include <cuda_runtime.h>
#undef __launch_bounds__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#error "cuda_emulation.h switches stacks without AddressSanitizer's fiber annotations: build it without ASan"
#endif

#include "engine/dtype.h"

#define LLMQ_CUDA_EMULATION 1
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace llmq::emulation {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline Dim block_index, grid_dim, block_dim;

// The ordering ThreadSanitizer knows about: a release on an address happens before every later
// acquire on it. Fibers switch without ordering (see switch_to), so these and the atomics' lock
// are all it sees, as the GPU's threads have nothing else.
#if defined(__SANITIZE_THREAD__)
inline void order_release(const void* address) { __tsan_release(const_cast<void*>(address)); }
inline void order_acquire(const void* address) { __tsan_acquire(const_cast<void*>(address)); }
#else
inline void order_release(const void*) {}
inline void order_acquire(const void*) {}
#endif

// The scheduler's own bookkeeping, shared by the fibers: relaxed atomics, which ThreadSanitizer
// neither reports nor counts as ordering (a plain variable would be a reported race; a
// sequentially consistent one would order every thread after every other and hide the kernels' races).
template <typename T>
class Untracked {
 public:
  Untracked(T value = T{}) : value_(value) {}
  T get() const { return value_.load(std::memory_order_relaxed); }
  void set(T value) { value_.store(value, std::memory_order_relaxed); }

 private:
  std::atomic<T> value_;
};

struct Copy {
  void* dst;
  const void* src;
  bool valid;
  size_t bytes = 16;
};
// wgmma operations issued and not yet waited for (see the end of this file).
struct Wgmma {
  float* d;
  uint64_t a, b;
  DType type;  // the operands' element type: BF16, F16 or F8_E4M3
  // A from registers: the thread's registers, their values when issued, and the values of A's rows
  // this thread's accumulators need (16w + g and 16w + g + 8), gathered from the warp when issued.
  const uint32_t* a_registers = nullptr;
  uint32_t a_issued[4] = {};
  float a_rows[2][16] = {};
};

// One CUDA thread: a fiber with its own stack, kept for later launches, and the state CUDA keeps
// per thread (its index, its copies and wgmmas in flight).
struct Fiber {
  static constexpr size_t kStackBytes = size_t(8) << 20;  // reserved, not committed; a guard page below
  Fiber() {
    stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                 -1, 0);
    if (stack == MAP_FAILED) throw std::runtime_error("emulation: cannot map a fiber's stack");
    mprotect(stack, 4096, PROT_NONE);
#if defined(__SANITIZE_THREAD__)
    tsan = __tsan_create_fiber(0);
#endif
  }
  ~Fiber() {
#if defined(__SANITIZE_THREAD__)
    __tsan_destroy_fiber(tsan);
#endif
    munmap(stack, kStackBytes);
  }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  // Thread `thread` of a new block: nothing in flight, no error yet.
  void begin_block(Dim thread) {
    index = thread;
    error = nullptr;
    open_copies.clear();
    copy_groups.clear();
    open_wgmma.clear();
    wgmma_groups.clear();
    done.set(false);
  }

  ucontext_t context{};
  void* stack = nullptr;
  void* tsan = nullptr;  // ThreadSanitizer's state for this fiber
  Untracked<bool> done{true};
  std::exception_ptr error;  // what the kernel threw, in this block
  Dim index;
  std::vector<Copy> open_copies;
  std::deque<std::vector<Copy>> copy_groups;
  std::vector<Wgmma> open_wgmma;
  std::deque<std::vector<Wgmma>> wgmma_groups;
};

inline std::vector<std::unique_ptr<Fiber>> fibers;  // fiber t runs thread t of each block
inline Untracked<Fiber*> running;                   // null while the scheduler runs
inline Untracked<uint64_t> progress;                // counts every arrival, release and exit
inline ucontext_t scheduler_context;
inline Untracked<void*> scheduler_tsan;
inline const std::function<void()>* kernel = nullptr;
inline char block_start, block_end;  // the addresses that order one block after the previous one

inline Fiber& self() { return *running.get(); }

inline void switch_to(ucontext_t* from, ucontext_t* to, void* to_tsan) {
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(to_tsan, __tsan_switch_to_fiber_no_sync);
#else
  (void)to_tsan;
#endif
  swapcontext(from, to);
}
inline Untracked<bool> abandoning;  // the block deadlocked: every wait throws Abandoned
struct Abandoned {};

// The running thread waits: the scheduler runs the others, and comes back to it later.
inline void yield() {
  switch_to(&self().context, &scheduler_context, scheduler_tsan.get());
  if (abandoning.get()) throw Abandoned{};
}

// A reusable barrier for `count` threads; a thread that leaves lowers the count. Each arrival
// releases, and the passing acquires, the generation's address (two alternate: nobody arrives at
// generation g + 2 before everyone has passed g).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    const uint64_t generation = generation_.get();
    order_release(&order_[generation % 2]);
    progress.set(progress.get() + 1);
    arrived_.set(arrived_.get() + 1);
    if (arrived_.get() >= count_.get())
      release();
    else
      while (generation_.get() == generation) yield();
    order_acquire(&order_[generation % 2]);
  }
  void leave() {
    count_.set(count_.get() - 1);
    progress.set(progress.get() + 1);
    if (arrived_.get() > 0 && arrived_.get() >= count_.get()) release();
  }

 private:
  void release() {
    arrived_.set(0);
    generation_.set(generation_.get() + 1);
  }
  Untracked<int> count_, arrived_;
  Untracked<uint64_t> generation_;
  char order_[2] = {};
};

// An mbarrier's state: arrivals a phase, arrivals still pending in the current one, phases
// completed; arrivals release, and waits acquire, their phase's address (16 alternate).
struct Mbarrier {
  Untracked<int> expected, pending;
  Untracked<unsigned> phase;
  char order[16] = {};
};

struct Block {
  explicit Block(int threads, size_t shared_bytes) : barrier(threads), exchange(size_t(threads) * 4) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Barrier>(32));
    shared.assign(shared_bytes / 16 + 1, make_uint4(~0u, ~0u, ~0u, ~0u));
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> exchange;  // four 64-bit slots per thread for warp collectives
  std::vector<uint4> shared;       // dynamic shared memory
  std::map<const void*, Mbarrier> mbarriers;
};
inline Block* current = nullptr;
inline std::mutex atomics;
inline bool eager_copies = false;

inline void land(const Copy& c) {
  if (c.valid)
    std::memcpy(c.dst, c.src, c.bytes);
  else
    std::memset(c.dst, 0, c.bytes);
}

// A fiber's life: thread `index` of one block after another, handing back to the scheduler at the end of each.
inline void fiber_main() {
  for (;;) {
    Fiber& me = self();
    order_acquire(&block_start);
    try {
      (*kernel)();
    } catch (const Abandoned&) {
    } catch (...) {
      me.error = std::current_exception();
    }
    current->barrier.leave();
    me.done.set(true);
    order_release(&block_end);  // the block's last write to this thread's state: the scheduler may free it
    yield();
  }
}

// Points the fiber's context at fiber_main on its own stack (getcontext returns twice: kept out of launch).
[[gnu::noinline]] inline void start(Fiber& f) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = Fiber::kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
}

inline void resume(Fiber& f) {
  running.set(&f);
  switch_to(&scheduler_context, &f.context, f.tsan);
  running.set(nullptr);
}

// Runs the block's threads until all have returned: each in turn until it waits or returns. A
// whole round in which no thread arrived, released or returned means all of them wait on each
// other: then each is unwound from its wait, and the deadlock is returned (else "").
inline std::string run_block(unsigned threads) {
  unsigned live = threads, idle = 0;
  for (unsigned t = 0; live > 0; t = (t + 1) % threads) {
    Fiber& f = *fibers[t];
    if (f.done.get()) continue;
    const uint64_t before = progress.get();
    resume(f);
    if (f.done.get()) {
      --live;
      idle = 0;
    } else if (progress.get() != before) {
      idle = 0;
    } else if (++idle >= live) {
      abandoning.set(true);
      for (unsigned u = 0; u < threads; ++u)
        if (!fibers[u]->done.get()) resume(*fibers[u]);
      abandoning.set(false);
      return "emulation: every thread of block (" + std::to_string(block_index.x) + ", " +
             std::to_string(block_index.y) + ", " + std::to_string(block_index.z) + ") waits for the others: a deadlock";
    }
  }
  return "";
}

// Runs fn() as every thread of every block of the grid, block after block (x fastest).
inline void launch(dim3 grid, unsigned threads, size_t shared_bytes, const std::function<void()>& fn) {
  grid_dim = {grid.x, grid.y, grid.z};
  block_dim = {threads, 1, 1};
  kernel = &fn;
#if defined(__SANITIZE_THREAD__)
  scheduler_tsan.set(__tsan_get_current_fiber());
#endif
  while (fibers.size() < threads) {
    fibers.push_back(std::make_unique<Fiber>());
    start(*fibers.back());
  }
  const unsigned blocks = grid.x * grid.y * grid.z;
  for (unsigned i = 0; i < blocks; ++i) {
    block_index = {i % grid.x, i / grid.x % grid.y, i / (grid.x * grid.y)};
    Block block(int(threads), shared_bytes);
    current = &block;
    for (unsigned t = 0; t < threads; ++t) fibers[t]->begin_block({t, 0, 0});
    order_release(&block_start);
    const std::string deadlock = run_block(threads);
    order_acquire(&block_end);
    current = nullptr;
    if (!deadlock.empty()) throw std::logic_error(deadlock);
    for (unsigned t = 0; t < threads; ++t)
      if (fibers[t]->error) std::rethrow_exception(fibers[t]->error);
  }
  kernel = nullptr;
}

inline int lane() { return int(self().index.x) % 32; }
inline Barrier& warp_barrier() { return *current->warps[self().index.x / 32]; }
inline uint64_t* slots(int lane_in_warp) {
  return &current->exchange[size_t((int(self().index.x) / 32 * 32 + lane_in_warp) * 4)];
}

template <typename T>
T shuffle(T v, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 64 bits");
  std::memcpy(slots(lane()), &v, sizeof v);
  warp_barrier().wait();
  T out;
  std::memcpy(&out, slots(source_lane), sizeof out);
  warp_barrier().wait();  // nobody writes its slot again before everyone has read
  return out;
}

inline float half_of(uint32_t reg, int high, __nv_bfloat16) {
  return llmq::bf16_to_f32(static_cast<uint16_t>((high ? reg >> 16 : reg) & 0xffffu));
}
inline float half_of(uint32_t reg, int high, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>((high ? reg >> 16 : reg) & 0xffffu)));
}

}  // namespace llmq::emulation

#define threadIdx (llmq::emulation::self().index)
#define blockIdx (llmq::emulation::block_index)
#define blockDim (llmq::emulation::block_dim)
#define gridDim (llmq::emulation::grid_dim)
#define LLMQ_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(llmq::emulation::current->shared.data())

inline void __syncthreads() { llmq::emulation::current->barrier.wait(); }
// Every lane of the warp (the kernels call it with full warps only).
inline void __syncwarp(unsigned = 0xffffffffu) { llmq::emulation::warp_barrier().wait(); }
// The atomics' lock taken and released: a full fence here, and one that ThreadSanitizer understands
// (it does not model std::atomic_thread_fence).
inline void __threadfence() { std::lock_guard<std::mutex> lock(llmq::emulation::atomics); }

template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  const int lane = llmq::emulation::lane();
  return llmq::emulation::shuffle(v, lane + offset < 32 ? lane + offset : lane);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int offset) {
  const int lane = llmq::emulation::lane();
  return llmq::emulation::shuffle(v, lane - offset >= 0 ? lane - offset : lane);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src_lane) {
  return llmq::emulation::shuffle(v, src_lane % 32);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return llmq::emulation::shuffle(v, llmq::emulation::lane() ^ mask);
}
template <typename T>
T atomicAdd(T* address, T v) {
  std::lock_guard<std::mutex> lock(llmq::emulation::atomics);
  const T old = *address;
  *address = old + v;
  return old;
}
inline unsigned atomicMax(unsigned* address, unsigned v) {
  std::lock_guard<std::mutex> lock(llmq::emulation::atomics);
  const unsigned old = *address;
  *address = std::max(old, v);
  return old;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
T __ldcs(const T* p) {
  return *p;
}
inline float __uint_as_float(uint32_t u) { return llmq::f32_from_bits(u); }
inline uint32_t __float_as_uint(float f) { return llmq::f32_bits(f); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
  const uint64_t bytes = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned s = (selector >> (4 * i)) & 7u;  // the sign-replicating mode (bit 3) is not used
    r |= uint32_t((bytes >> (8 * s)) & 0xffu) << (8 * i);
  }
  return r;
}
using std::isfinite;
using std::max;
using std::min;

// ---- The PTX instructions of kernels/cuda/common.cuh ---------------------------------------

namespace llmq::emulation {
// The value of an FP8 E4M3 code (by cuda_fp8.h's host conversion).
inline float fp8_value(uint32_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(code & 0xffu), __NV_E4M3)));
}

// One mma.sync m16n8kK of the warp (A 16 x K, B K x 8, kK / 8 elements a register, lowest k in the
// lowest bits): the lanes' fragments are exchanged, then each lane adds its C elements' products,
// summed in double, to its accumulators. element(reg, i) is the i-th element of a register.
// A[row][k] is in lane 4 (row % 8) + (k % (K/2)) / (K/8), register (row >= 8) + 2 (k >= K/2);
// B[k][col] in lane 4 col + (k % (K/2)) / (K/8), register k >= K/2; C[row][col] in lane
// 4 (row % 8) + col / 2, register 2 (row >= 8) + col % 2.
template <int kK, typename Element>
void warp_mma(float* c, const uint32_t* a, const uint32_t* b, Element&& element) {
  constexpr int kPer = kK / 8, kHalf = kK / 2;
  uint64_t* mine = slots(lane());
  mine[0] = uint64_t(a[0]) | uint64_t(a[1]) << 32;
  mine[1] = uint64_t(a[2]) | uint64_t(a[3]) << 32;
  mine[2] = uint64_t(b[0]) | uint64_t(b[1]) << 32;
  warp_barrier().wait();
  auto reg = [&](int l, int i) { return uint32_t(slots(l)[i / 2] >> (32 * (i % 2))); };
  auto A = [&](int row, int k) {
    return element(reg(4 * (row % 8) + (k % kHalf) / kPer, (row >= 8) + 2 * (k >= kHalf)), k % kPer);
  };
  auto B = [&](int k, int col) { return element(reg(4 * col + (k % kHalf) / kPer, 4 + (k >= kHalf)), k % kPer); };
  const int g = lane() / 4, t = lane() % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    double sum = 0;
    for (int k = 0; k < kK; ++k) sum += double(A(row, k)) * double(B(k, col));
    out[e] = float(double(c[e]) + sum);
  }
  warp_barrier().wait();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}
}  // namespace llmq::emulation

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: two 16-bit values a register.
template <typename T>
void mma16816(float* c, const uint32_t* a, const uint32_t* b, T) {
  llmq::emulation::warp_mma<16>(c, a, b, [](uint32_t r, int i) { return llmq::emulation::half_of(r, i, T{}); });
}

// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3: four FP8 E4M3 codes a register.
template <typename Fp8>  // the kernels' fp8 code type, declared after this header
void mma16832(float* c, const uint32_t* a, const uint32_t* b, Fp8) {
  static_assert(sizeof(Fp8) == 1, "one-byte codes");
  llmq::emulation::warp_mma<32>(c, a, b, [](uint32_t r, int i) { return llmq::emulation::fp8_value(r >> (8 * i)); });
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8 m + r gives the address of row r of 8 x 8
// matrix m (8 16-bit values); register m of lane l gets M_m[l / 4][2 (l % 4)] (low half) and
// M_m[l / 4][2 (l % 4) + 1] (high half), or with .trans M_m[2 (l % 4)][l / 4] and
// M_m[2 (l % 4) + 1][l / 4].
inline void ldmatrix_x4_any(uint32_t* r, const void* row, bool transposed) {
  using namespace llmq::emulation;
  std::memcpy(slots(lane()), &row, sizeof row);
  warp_barrier().wait();
  auto element = [&](int m, int i, int j) {
    const void* p;
    std::memcpy(&p, slots(8 * m + i), sizeof p);
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(p) + 2 * j, 2);
    return uint32_t(v);
  };
  const int g = lane() / 4, t = lane() % 4;
  uint32_t out[4];
  for (int m = 0; m < 4; ++m)
    out[m] = transposed ? element(m, 2 * t, g) | element(m, 2 * t + 1, g) << 16
                        : element(m, g, 2 * t) | element(m, g, 2 * t + 1) << 16;
  warp_barrier().wait();
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}
inline void ldmatrix_x4(uint32_t* r, const void* row) { ldmatrix_x4_any(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t* r, const void* row) { ldmatrix_x4_any(r, row, true); }

// cp.async.{cg,ca}.shared.global 16 or 4 bytes (zeros when !valid), commit_group, wait_group.
inline void cp_async_n(void* shared, const void* src, bool valid, size_t bytes) {
  using namespace llmq::emulation;
  if (eager_copies)
    land({shared, src, valid, bytes});
  else
    self().open_copies.push_back({shared, src, valid, bytes});
}
inline void cp_async16(void* shared, const void* src, bool valid) { cp_async_n(shared, src, valid, 16); }
inline void cp_async4(void* shared, const void* src, bool valid) { cp_async_n(shared, src, valid, 4); }
inline void cp_async_commit() {
  using namespace llmq::emulation;
  Fiber& me = self();
  me.copy_groups.push_back(std::move(me.open_copies));
  me.open_copies.clear();
}
template <int kPending>
void cp_async_wait() {
  using namespace llmq::emulation;
  Fiber& me = self();
  while (int(me.copy_groups.size()) > kPending) {
    for (const Copy& c : me.copy_groups.front()) land(c);
    me.copy_groups.pop_front();
  }
}

// mbarriers (common.cuh's mbarrier_*).
inline llmq::emulation::Mbarrier& mbarrier_at(const void* bar) {
  auto it = llmq::emulation::current->mbarriers.find(bar);
  if (it == llmq::emulation::current->mbarriers.end()) throw std::logic_error("mbarrier emulation: not initialized");
  return it->second;
}
inline void mbarrier_init(uint64_t* bar, unsigned count) {
  using namespace llmq::emulation;
  Mbarrier& m = current->mbarriers[bar];
  m.expected.set(int(count));
  m.pending.set(int(count));
  m.phase.set(0);
}
inline void mbarrier_arrive(uint64_t* bar) {
  using namespace llmq::emulation;
  Mbarrier& m = mbarrier_at(bar);
  order_release(&m.order[m.phase.get() % 16]);
  progress.set(progress.get() + 1);
  m.pending.set(m.pending.get() - 1);
  if (m.pending.get() > 0) return;
  m.pending.set(m.expected.get());
  m.phase.set(m.phase.get() + 1);
}
inline void cp_async_mbarrier_arrive(uint64_t* bar) {
  using namespace llmq::emulation;
  Fiber& me = self();
  for (const std::vector<Copy>& group : me.copy_groups)
    for (const Copy& c : group) land(c);
  me.copy_groups.clear();
  for (const Copy& c : me.open_copies) land(c);
  me.open_copies.clear();
  mbarrier_arrive(bar);
}
// Waits until the phase of parity `parity` has completed; acquires the last completed phase.
inline void mbarrier_wait(uint64_t* bar, unsigned parity) {
  using namespace llmq::emulation;
  while ((mbarrier_at(bar).phase.get() & 1u) == (parity & 1u)) yield();
  Mbarrier& m = mbarrier_at(bar);
  order_acquire(&m.order[(m.phase.get() - 1) % 16]);
}

// ---- Shared-memory addresses and Hopper's wgmma -------------------------------------------------

namespace llmq::emulation {
// The shared-memory address of the dynamic shared memory's first byte: not 1024-aligned, so that
// kernels that align their tiles for wgmma's swizzle have to.
constexpr uint32_t kSharedBase = 48;
inline const uint8_t* shared_at(uint32_t address) {
  return reinterpret_cast<const uint8_t*>(current->shared.data()) + (address - kSharedBase);
}

// Byte `byte` of row `row` of a K-major wgmma operand: a descriptor's start address, its stride
// between 8-row groups, 128-byte rows and the 128-byte swizzle (bits 4-6 of the address XOR bits 7-9).
inline uint32_t operand_address(uint64_t desc, int row, int byte) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4, stride = uint32_t((desc >> 32) & 0x3FFF) << 4;
  if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) throw std::logic_error("wgmma emulation: 128-byte swizzle only");
  uint32_t a = start + uint32_t(row / 8) * stride + uint32_t(row % 8) * 128 + uint32_t(byte);
  return a ^ (((a >> 7) & 7) << 4);
}

// This thread's 64 accumulators of one wgmma (one 32-byte slice of K), from shared memory as it is now.
inline void run(const Wgmma& op) {
  const int size = op.type == DType::F8_E4M3 ? 1 : 2, k_slice = 32 / size;
  auto value = [&](uint64_t desc, int row, int k) {
    uint16_t v = 0;
    std::memcpy(&v, shared_at(operand_address(desc, row, k * size)), size_t(size));
    if (op.type == DType::F8_E4M3) return fp8_value(v);
    return op.type == DType::BF16 ? half_of(v, 0, __nv_bfloat16{}) : half_of(v, 0, __half{});
  };
  if (op.a_registers && !std::equal(op.a_issued, op.a_issued + 4, op.a_registers))
    throw std::logic_error("wgmma emulation: A's registers changed before the wgmma was waited for");
  const int warp = int(self().index.x) / 32 % 4, g = lane() / 4, t = lane() % 4;
  for (int j = 0; j < 16; ++j)
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) {
        const int row = 16 * warp + g + 8 * h, col = 8 * j + 2 * t + e;
        double sum = 0;
        for (int k = 0; k < k_slice; ++k)
          sum += double(op.a_registers ? op.a_rows[h][k] : value(op.a, row, k)) * double(value(op.b, col, k));
        float& d = op.d[4 * j + 2 * h + e];
        d = float(double(d) + sum);
      }
}
}  // namespace llmq::emulation

inline uint32_t smem_address(const void* p) {
  using namespace llmq::emulation;
  return kSharedBase + uint32_t(static_cast<const uint8_t*>(p) - reinterpret_cast<const uint8_t*>(current->shared.data()));
}
inline void wgmma_fence() {}
inline void wgmma_hold(float*, int) {}
inline void wgmma_m64n128(float* d, uint64_t a, uint64_t b, __nv_bfloat16) {
  llmq::emulation::self().open_wgmma.push_back({d, a, b, llmq::DType::BF16});
}
inline void wgmma_m64n128(float* d, uint64_t a, uint64_t b, __half) {
  llmq::emulation::self().open_wgmma.push_back({d, a, b, llmq::DType::F16});
}
// A from registers (16-bit T): the warp's fragments are exchanged now, as mma.sync's are.
template <typename T>
void wgmma_m64n128(float* d, const uint32_t* a, uint64_t b, T) {
  using namespace llmq::emulation;
  Wgmma op{d, 0, b, std::is_same_v<T, __half> ? llmq::DType::F16 : llmq::DType::BF16};
  op.a_registers = a;
  std::copy(a, a + 4, op.a_issued);
  uint64_t* mine = slots(lane());
  mine[0] = uint64_t(a[0]) | uint64_t(a[1]) << 32;
  mine[1] = uint64_t(a[2]) | uint64_t(a[3]) << 32;
  warp_barrier().wait();
  // A[row][k] (row < 16 of the warp's) is in lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) +
  // 2 (k >= 8), half k % 2.
  const int g = lane() / 4;
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k) {
      const int reg = h + 2 * (k >= 8);
      const uint32_t r = uint32_t(slots(4 * g + (k % 8) / 2)[reg / 2] >> (32 * (reg % 2)));
      op.a_rows[h][k] = half_of(r, k % 2, T{});
    }
  warp_barrier().wait();
  self().open_wgmma.push_back(op);
}
template <typename Fp8>  // the kernels' fp8 code type, declared after this header
void wgmma_m64n128(float* d, uint64_t a, uint64_t b, Fp8) {
  static_assert(sizeof(Fp8) == 1, "one-byte codes");
  llmq::emulation::self().open_wgmma.push_back({d, a, b, llmq::DType::F8_E4M3});
}
inline void wgmma_commit() {
  using namespace llmq::emulation;
  Fiber& me = self();
  me.wgmma_groups.push_back(std::move(me.open_wgmma));
  me.open_wgmma.clear();
}
template <int kPending>
void wgmma_wait() {
  using namespace llmq::emulation;
  Fiber& me = self();
  while (int(me.wgmma_groups.size()) > kPending) {
    for (const Wgmma& op : me.wgmma_groups.front()) run(op);
    me.wgmma_groups.pop_front();
  }
}
