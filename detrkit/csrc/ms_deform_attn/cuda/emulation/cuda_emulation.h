// A CPU emulation of the few CUDA features the deformable attention kernels use, so that the
// device code in ../kernels.cuh can be compiled as host code and run on machines without a GPU
// (tests/test_ms_deform_attn_cuda.py). Every thread of a block is an OS thread; blocks run one
// after another. Warp shuffles are two barriers on the warp: a lane that skips a shuffle its
// warp-mates execute (divergence) leaves them waiting, which is reported and ends the process
// instead of hanging. Not part of the extension build (setup.py compiles *.cpp / *.cu only).
#pragma once

#define MSDA_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace msda_emulation {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// A reusable barrier that gives up (and ends the process) when not every thread arrives.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait(const char* where) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(30), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "cuda emulation: threads of one %s did not all arrive (divergence)\n",
                   where);
      std::_Exit(70);
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int count_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
};

struct Warp {
  Barrier barrier{32};
  alignas(8) unsigned char slot[32][8];
};

// Bytes after a block's dynamic shared memory that are filled with kGuardByte and checked after
// the block ran: a kernel that uses more shared memory than it was launched with overwrites
// them (on a GPU it would read or write memory it does not own).
constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kGuardByte = 0xA5;

struct Block {
  Dim3 idx, dim;
  Barrier barrier;
  std::vector<Warp> warps;
  size_t shared_bytes;
  std::vector<unsigned char> shared;  // operator new storage: aligned for int64 / double
  Block(unsigned threads, size_t bytes)
      : barrier(static_cast<int>(threads)),
        warps(threads / 32),
        shared_bytes(bytes),
        shared(bytes + kGuardBytes, kGuardByte) {
    dim.x = threads;
  }
  bool guard_intact() const {
    return std::all_of(shared.begin() + static_cast<std::ptrdiff_t>(shared_bytes), shared.end(),
                       [](unsigned char c) { return c == kGuardByte; });
  }
};

struct ThreadState {
  Block* block = nullptr;
  Dim3 thread;
};
inline thread_local ThreadState tls;

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(tls.block->shared.data());
}

inline void syncthreads() { tls.block->barrier.wait("block at __syncthreads"); }

template <typename T>
T exchange(T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Warp& warp = tls.block->warps[tls.thread.x / 32];
  const int lane = static_cast<int>(tls.thread.x % 32);
  std::memcpy(warp.slot[lane], &value, sizeof(T));
  warp.barrier.wait("warp at a shuffle");
  T result;
  std::memcpy(&result, warp.slot[src_lane], sizeof(T));
  warp.barrier.wait("warp at a shuffle");
  return result;
}

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda emulation: only full-warp shuffles are emulated\n");
    std::_Exit(71);
  }
}

inline void check_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    std::fprintf(stderr, "cuda emulation: shuffle width %d is not a power of two <= 32\n", width);
    std::_Exit(72);
  }
}

// Launches kernel() on a grid x block threads, one block at a time, with shared_bytes of
// dynamic shared memory per block. Returns false when a block wrote past its shared memory.
template <typename Kernel>
bool launch(unsigned grid, unsigned block_threads, size_t shared_bytes, Kernel&& kernel) {
  if (block_threads % 32 != 0) {
    std::fprintf(stderr, "cuda emulation: blocks must be whole warps\n");
    std::_Exit(73);
  }
  for (unsigned b = 0; b < grid; ++b) {
    Block block(block_threads, shared_bytes);
    block.idx.x = b;
    std::vector<std::thread> threads;
    threads.reserve(block_threads);
    for (unsigned t = 0; t < block_threads; ++t) {
      threads.emplace_back([&block, &kernel, t] {
        tls.block = &block;
        tls.thread.x = t;
        kernel();
      });
    }
    for (auto& thread : threads) thread.join();
    if (!block.guard_intact()) {
      std::fprintf(stderr, "cuda emulation: block %u wrote past its %zu bytes of shared memory\n",
                   b, shared_bytes);
      return false;
    }
  }
  return true;
}

}  // namespace msda_emulation

#define threadIdx (::msda_emulation::tls.thread)
#define blockIdx (::msda_emulation::tls.block->idx)
#define blockDim (::msda_emulation::tls.block->dim)
#define __syncthreads() ::msda_emulation::syncthreads()

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  msda_emulation::check_mask(mask);
  msda_emulation::check_width(width);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int segment = lane & ~(width - 1);
  return msda_emulation::exchange(value, segment + (src_lane & (width - 1)));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  msda_emulation::check_mask(mask);
  msda_emulation::check_width(width);
  const int lane = static_cast<int>(threadIdx.x % 32);
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment: own
  return msda_emulation::exchange(value, src);
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}
inline double atomicAdd(double* address, double value) {
  return std::atomic_ref<double>(*address).fetch_add(value);
}

using std::min;
