// CPU stand-ins for the CUDA features that bn_act.cu and bn_act_kernels.cuh use, so the same
// source compiles with a host C++ compiler and its kernels run on CPU tensors. For the tests
// only (tests/host_emulation.py builds it with FUSEDRES_HOST_EMULATION defined); the shipped
// extension never includes this file.
//
// A launch runs the grid's blocks one after another. A block's threads are fibers (ucontext)
// on the calling OS thread: each runs until __syncthreads() or its end, and the barrier opens
// once every thread still running waits at it (threads that returned no longer count, as on
// sm_70+). __shared__ variables become function statics, which is right while one block at a
// time uses them. Between barriers the threads run one after another, in the order
// FUSEDRES_EMULATION_ORDER names: "forward" (thread 0 first, the default), "reverse", or a
// number, the seed of a fresh shuffle per barrier phase. A kernel whose results depend on that
// order reads shared memory that another thread writes in the same phase: a race on the GPU.
//
// What this shows: the kernels' indexing, tiling, vector and scalar paths, reductions and the
// order of their merges, on the host's IEEE fp32 (fmaf fused, 1/x correctly rounded, as
// __frcp_rn), and races between barriers (by comparing orders). What it cannot show: races
// inside a warp's instruction (no two threads run at once), memory ordering of global memory
// between blocks, real occupancy (the plans are an imaginary GPU's, below), speed.

#pragma once

#include <math.h>  // fmaf in the global namespace, as device code calls it
#include <ucontext.h>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's coordinates, set by the scheduler before it switches to the thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __frcp_rn(float x) { return 1.0f / x; }

namespace host_emulation {

struct Fiber {
  static constexpr std::size_t kStackBytes = 128 * 1024;
  ucontext_t context;
  std::unique_ptr<char[]> stack{new char[kStackBytes]};  // left uninitialised: a stack needs no zeros
  bool done;
};

// At least `threads` fibers, kept for the process: stacks are allocated once, not per launch.
inline std::vector<Fiber>& fiber_pool(unsigned threads) {
  static std::vector<Fiber> pool;
  if (pool.size() < threads) pool.resize(threads);
  return pool;
}

inline ucontext_t scheduler;        // where a fiber returns at a barrier or at its end
inline Fiber* running = nullptr;    // the fiber being run
inline void (*thread_body)(void*);  // what every thread of the launch runs ...
inline void* thread_body_arg;       // ... and its argument

inline void fiber_main() {
  thread_body(thread_body_arg);
  running->done = true;  // then uc_link resumes the scheduler
}

// The order of a block's threads within each barrier phase (FUSEDRES_EMULATION_ORDER, above).
class ThreadOrder {
 public:
  explicit ThreadOrder(unsigned threads) : order_(threads) {
    const char* env = std::getenv("FUSEDRES_EMULATION_ORDER");
    const std::string name = env == nullptr ? "forward" : env;
    std::iota(order_.begin(), order_.end(), 0u);
    if (name == "reverse") {
      std::reverse(order_.begin(), order_.end());
    } else if (name != "forward") {
      shuffle_ = true;
      try {
        rng_.seed(std::stoul(name));
      } catch (const std::exception&) {
        TORCH_CHECK(false, "FUSEDRES_EMULATION_ORDER must be forward, reverse or a seed, got ", name);
      }
    }
  }
  const std::vector<unsigned>& next_phase() {
    if (shuffle_) std::shuffle(order_.begin(), order_.end(), rng_);
    return order_;
  }

 private:
  std::vector<unsigned> order_;
  bool shuffle_ = false;
  std::mt19937 rng_;
};

// Runs body() once per thread of a (grid.x, grid.y) x block.x launch.
template <class Body>
void run_grid(dim3 grid, dim3 block, Body& body) {
  TORCH_INTERNAL_ASSERT(block.y == 1 && block.z == 1 && grid.z == 1,
                        "host emulation: 1-D blocks and 2-D grids only");
  thread_body = [](void* b) { (*static_cast<Body*>(b))(); };
  thread_body_arg = &body;
  gridDim = grid;
  blockDim = block;
  std::vector<Fiber>& fibers = fiber_pool(block.x);
  ThreadOrder order(block.x);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = dim3(bx, by);
      for (unsigned t = 0; t < block.x; ++t) {
        Fiber& f = fibers[t];
        TORCH_INTERNAL_ASSERT(getcontext(&f.context) == 0, "host emulation: getcontext failed");
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = Fiber::kStackBytes;
        f.context.uc_link = &scheduler;
        makecontext(&f.context, fiber_main, 0);
        f.done = false;
      }
      // One pass per barrier phase: every live thread runs to the next barrier or its end.
      for (unsigned live = block.x; live > 0;) {
        for (unsigned t : order.next_phase()) {
          if (fibers[t].done) continue;
          threadIdx = dim3(t);
          running = &fibers[t];
          swapcontext(&scheduler, &fibers[t].context);
          live -= fibers[t].done;
        }
      }
    }
  }
}

}  // namespace host_emulation

inline void __syncthreads() { swapcontext(&host_emulation::running->context, &host_emulation::scheduler); }

// ------------------------------------------------------------------ the launcher's platform
namespace platform {

constexpr c10::DeviceType kDeviceType = c10::kCPU;

struct DeviceGuard {  // one device: nothing to switch
  explicit DeviceGuard(c10::Device) {}
};

inline c10::DeviceIndex current_device() { return -1; }

// An imaginary GPU holding 2 blocks per SM, of 3 SMs (small grids, as the emulator runs blocks
// one by one, that still split rows over several blocks and uneven waves) or of
// FUSEDRES_EMULATION_SMS SMs (132: an H100's plans, with hundreds of row slices).
template <class Kernel>
std::pair<int, int> resident_blocks_and_sms(Kernel, int) {
  const char* env = std::getenv("FUSEDRES_EMULATION_SMS");
  int sms = 3;
  if (env != nullptr) {
    try {
      sms = std::stoi(env);
    } catch (const std::exception&) {
      sms = 0;
    }
    TORCH_CHECK(sms > 0, "FUSEDRES_EMULATION_SMS must be a positive number of SMs, got ", env);
  }
  return {2, sms};
}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, const A&... args) {
  auto body = [&] { kernel(args...); };
  host_emulation::run_grid(grid, block, body);
}

}  // namespace platform
