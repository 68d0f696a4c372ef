// cuda_emu's runtime: grid execution with one fiber per CUDA thread, the block and warp
// barriers, emulated devices, and the few CUDA runtime calls the launchers make.
//
// A block's threads are ucontext fibers on the calling OS thread, run round-robin by a
// scheduler: a fiber runs until it waits at a barrier or returns from the kernel, and a
// barrier opens when every thread still in the block has arrived (a returned thread
// counts as arrived, as on a GPU). If no fiber can run and some have not returned, the
// block is deadlocked (threads wait at different barriers): the run aborts saying so.
//
// Sanitizers: for AddressSanitizer the stack switches are announced
// (__sanitizer_start/finish_switch_fiber). For ThreadSanitizer each CUDA thread is a
// TSan fiber, switched to *without* synchronisation; the only happens-before edges
// between threads are the ones a GPU gives: the barriers (__tsan_release on arrival,
// __tsan_acquire on leaving), atomics (instrumented in cuda_emu.h), and the launch
// itself (the host's writes before it, the threads' writes before the host reads).
// This file is compiled without -fsanitize=thread (with -DCUDA_EMU_TSAN) so that the
// scheduler's own bookkeeping is not mistaken for races between the threads.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_emu_api.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif
#if defined(CUDA_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace cuda_emu {

uint3 thread_idx;
uint3 block_idx;
dim3 block_dim;
dim3 grid_dim;

void fail(const char* what) {
  std::fprintf(stderr, "%s\n", what);
  std::fflush(stderr);
  std::abort();
}

namespace {

constexpr size_t kStackBytes = 64 << 10;  // ASan clears a stack's shadow at each switch: keep it small
constexpr long kMaxSpins = 100000;  // __nanosleep calls in one block before it counts as hung

void tsan_release(void* addr) {
#if defined(CUDA_EMU_TSAN)
  __tsan_release(addr);
#else
  (void)addr;
#endif
}

void tsan_acquire(void* addr) {
#if defined(CUDA_EMU_TSAN)
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

// A barrier over the threads of the block (or warp) that have not returned.
struct Barrier {
  int active = 0;
  int arrived = 0;
  uint64_t gen = 0;
  char sync_obj[2];  // TSan addresses, one per generation parity
};

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;
  void* tsan = nullptr;
  uint3 tid;
  unsigned linear = 0;
  Barrier* waiting = nullptr;  // set while blocked at a barrier
  uint64_t wait_gen = 0;
  bool done = false;
  void* asan_fake_stack = nullptr;
};

struct Warp {
  Barrier bar;
  uint64_t slot[2][32];  // exchange k uses slot[k & 1]
};

struct Scheduler {
  ucontext_t main_ctx;
  void* tsan_main = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  Barrier block;
  std::vector<Warp> warps;
  const Kernel* kernel = nullptr;
  long spins = 0;
  char launch_obj = 0;  // TSan: host before the launch -> every thread
  char done_obj = 0;    // TSan: every thread -> host after the launch
};

Scheduler S;

void switch_to_main(bool for_good) {
  Fiber* f = S.current;
#if defined(CUDA_EMU_TSAN)
  __tsan_switch_to_fiber(S.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(for_good ? nullptr : &f->asan_fake_stack, S.main_stack_bottom,
                                 S.main_stack_size);
#else
  (void)for_good;
#endif
  swapcontext(&f->ctx, &S.main_ctx);
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, nullptr, nullptr);
#endif
}

void switch_to(Fiber* f) {
  S.current = f;
  thread_idx = f->tid;
#if defined(CUDA_EMU_TSAN)
  __tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(CUDA_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack, kStackBytes);
#endif
  swapcontext(&S.main_ctx, &f->ctx);
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, &S.main_stack_bottom, &S.main_stack_size);
#endif
  S.current = nullptr;
}

// Returns the generation the barrier opened at (its slot parity for warp exchanges).
uint64_t wait_at(Barrier& b) {
  const uint64_t g = b.gen;
  tsan_release(&b.sync_obj[g & 1]);
  if (++b.arrived >= b.active) {  // the last one in opens it and runs on
    b.arrived = 0;
    ++b.gen;
  } else {
    S.current->waiting = &b;
    S.current->wait_gen = g;
    switch_to_main(false);
    S.current->waiting = nullptr;
  }
  tsan_acquire(&b.sync_obj[g & 1]);
  return g;
}

void leave(Barrier& b) {
  --b.active;
  if (b.arrived > 0 && b.arrived >= b.active) {
    b.arrived = 0;
    ++b.gen;
  }
}

void fiber_entry(unsigned index) {
  Fiber* f = &S.fibers[index];
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &S.main_stack_bottom, &S.main_stack_size);
#endif
  tsan_acquire(&S.launch_obj);
  S.kernel->run(S.kernel->args);
  tsan_release(&S.done_obj);
  f = S.current;
  leave(S.block);
  leave(S.warps[f->linear / 32].bar);
  f->done = true;
  switch_to_main(true);
  fail("cuda_emu: a finished thread was resumed");
}

void ensure_fibers(size_t n) {
  while (S.fibers.size() < n) {
    S.fibers.emplace_back();
    Fiber& f = S.fibers.back();
    void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) fail("cuda_emu: cannot map a fiber stack");
    f.stack = static_cast<unsigned char*>(mem);
#if defined(CUDA_EMU_TSAN)
    f.tsan = __tsan_create_fiber(0);
#endif
  }
#if defined(CUDA_EMU_TSAN)
  if (S.tsan_main == nullptr) S.tsan_main = __tsan_get_current_fiber();
#endif
}

// Kept out of run_block: getcontext returns twice, which would make its locals suspect.
__attribute__((noinline)) void prepare(unsigned t) {
  Fiber& f = S.fibers[t];
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_entry), 1, t);
  f.linear = t;
  f.tid = make_uint3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
  f.waiting = nullptr;
  f.done = false;
}

void run_block(unsigned threads) {
  S.block = Barrier();
  S.block.active = static_cast<int>(threads);
  for (size_t w = 0; w < S.warps.size(); ++w) {
    S.warps[w].bar = Barrier();
    const int lanes = static_cast<int>(threads) - static_cast<int>(w) * 32;
    S.warps[w].bar.active = lanes < 32 ? lanes : 32;
  }
  S.spins = 0;
  for (unsigned t = 0; t < threads; ++t) prepare(t);
  unsigned left = threads;
  while (left > 0) {
    bool ran = false;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = S.fibers[t];
      if (f.done || (f.waiting != nullptr && f.waiting->gen == f.wait_gen)) continue;
      switch_to(&f);
      ran = true;
      if (f.done) --left;
    }
    if (!ran && left > 0)
      fail("cuda_emu: deadlock: the block's threads wait at different barriers (or at a barrier some "
           "thread never reaches)");
  }
}

struct Device {
  int sms;
  int l2_bytes;
};
std::vector<Device> g_devices{{4, 4 << 20}};
int g_current = 0;
cudaError_t g_last_error = cudaSuccess;
std::vector<cuda_emu_launch_record> g_log;

}  // namespace

unsigned lane_id() { return S.current->linear & 31u; }

void sync_threads() { wait_at(S.block); }

void warp_exchange(uint64_t mine, uint64_t* all) {
  Warp& w = S.warps[S.current->linear / 32];
  if (w.bar.active != 32) fail("cuda_emu: a full-warp shuffle with lanes missing (returned, or no such lane)");
  w.slot[w.bar.gen & 1][S.current->linear & 31] = mine;
  const uint64_t g = wait_at(w.bar);
  std::memcpy(all, w.slot[g & 1], sizeof w.slot[0]);
}

void spin_pause() {
  if (S.current == nullptr) return;
  if (++S.spins > kMaxSpins)
    fail("cuda_emu: a block keeps waiting (__nanosleep) for work no thread of it will do; blocks run "
         "one at a time, so a block must never wait for a block that starts after it");
  switch_to_main(false);  // the other threads of the block run meanwhile
}

cudaError_t run_grid(const Kernel& k, dim3 grid, dim3 block, size_t shmem, cudaStream_t) {
  if (S.current != nullptr) fail("cuda_emu: a kernel launched from device code");
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  cuda_emu_launch_record rec{};
  std::snprintf(rec.name, sizeof rec.name, "%s", k.name);
  rec.grid[0] = grid.x;
  rec.grid[1] = grid.y;
  rec.grid[2] = grid.z;
  rec.block[0] = block.x;
  rec.block[1] = block.y;
  rec.block[2] = block.z;
  g_log.push_back(rec);
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    return g_last_error;
  }
  if (shmem != 0) fail("cuda_emu: dynamic shared memory is not emulated");
  ensure_fibers(threads);
  S.kernel = &k;
  S.warps.assign((threads + 31) / 32, Warp());
  block_dim = block;
  grid_dim = grid;
  const char* order = std::getenv("CUDA_EMU_BLOCK_ORDER");
  const bool reverse = order != nullptr && std::string(order) == "reverse";
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  tsan_release(&S.launch_obj);
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = reverse ? blocks - 1 - i : i;
    block_idx = make_uint3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                           static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y)));
    run_block(static_cast<unsigned>(threads));
  }
  tsan_acquire(&S.done_obj);
  S.kernel = nullptr;
  return cudaSuccess;
}

}  // namespace cuda_emu

using namespace cuda_emu;

// ------------------------------------------------------------ the CUDA runtime calls
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return g_last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "cuda_emu: unknown error";
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = static_cast<int>(g_devices.size());
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = g_current;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= static_cast<int>(g_devices.size())) return cudaErrorInvalidDevice;
  g_current = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= static_cast<int>(g_devices.size())) return cudaErrorInvalidDevice;
  const Device& d = g_devices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = d.l2_bytes; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  std::memset(dst, value, count);
  return cudaSuccess;
}

// ------------------------------------------------------------ the harness's controls
int cuda_emu_use_device(int sms, int l2_bytes) {
  for (size_t i = 0; i < g_devices.size(); ++i) {
    if (g_devices[i].sms == sms && g_devices[i].l2_bytes == l2_bytes) {
      g_current = static_cast<int>(i);
      return g_current;
    }
  }
  g_devices.push_back(Device{sms, l2_bytes});
  g_current = static_cast<int>(g_devices.size()) - 1;
  return g_current;
}

void cuda_emu_clear_log(void) { g_log.clear(); }

int cuda_emu_launch_count(void) { return static_cast<int>(g_log.size()); }

const cuda_emu_launch_record* cuda_emu_launch(int i) {
  return i >= 0 && i < static_cast<int>(g_log.size()) ? &g_log[i] : nullptr;
}

}  // extern "C"
