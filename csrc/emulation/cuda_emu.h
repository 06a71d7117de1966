// CPU emulation of the CUDA subset used by csrc/*.cu, for testing the kernels on machines without a GPU.
//
// Compile the .cu sources as C++ with -DMADX_EMULATE (tests/helpers/cuda.py builds them into a CPU
// torch extension). Then every kernel launch runs on the CPU: blocks one after another, and inside a block
// one fiber (ucontext) per CUDA thread. __syncthreads() switches fibers, so the emulation follows the
// barrier semantics exactly, and it is adversarial about missing barriers: between two barriers each
// thread runs to completion before the next one starts, in a shuffled order, so a thread reading shared
// memory that another thread writes without a barrier in between sees stale or poisoned data.
// Also checked: dynamic shared memory is poisoned (all bits set = NaN) for every block; a block whose
// threads do not all reach the same barrier count is an error; WMMA pointers must be 32-byte aligned
// with legal leading dimensions. A WMMA call is warp-collective: lane 0 of the warp does the whole
// 16 x 16 operation on its fragment (which holds the full tile), the other lanes' calls are no-ops.
// Only load/store/fill/mma_sync are provided (what tile_gemm.cuh uses), for 1-D thread blocks.
// Not emulated: warp shuffles, atomics, real concurrency between blocks (the kernels use none of these).
#pragma once

// The CUDA execution-space keywords become nothing (again after the CUDA headers, which may redefine them).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

#include <cuda_runtime_api.h>  // cudaStream_t, cudaError_t, dim3 (host-only declarations)
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// Built-in variables: set by the scheduler before it resumes a thread's fiber.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 thread;
  bool done = false;
  bool at_barrier = false;
};

struct State {
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::vector<std::unique_ptr<Fiber>> fibers;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> smem;
  std::string error;  // first error seen in this launch
  uint64_t rng = 0x9E3779B97F4A7C15ull;
};

inline State& state() {
  static State s;
  return s;
}

inline void fail(const std::string& message) {
  if (state().error.empty()) state().error = message;
}

// 128-byte aligned start of the block's dynamic shared memory.
inline unsigned char* dynamic_smem() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(state().smem.data());
  return reinterpret_cast<unsigned char*>((p + 127) & ~uintptr_t(127));
}

inline uint3 make_index(unsigned x, unsigned y, unsigned z) {
  uint3 v;
  v.x = x;
  v.y = y;
  v.z = z;
  return v;
}

inline void barrier() {
  State& s = state();
  s.current->at_barrier = true;
  swapcontext(&s.current->context, &s.scheduler);
}

inline void fiber_entry() {
  State& s = state();
  (*s.body)();
  s.current->done = true;
  // returning resumes uc_link = the scheduler
}

inline uint64_t next_random() {
  uint64_t& x = state().rng;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

constexpr size_t kStackBytes = 256 * 1024;

inline void run_block(unsigned nthreads) {
  State& s = state();
  while (s.fibers.size() < nthreads) {
    auto f = std::make_unique<Fiber>();
    f->stack.reset(new char[kStackBytes]);
    s.fibers.push_back(std::move(f));
  }
  std::vector<unsigned> order(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = *s.fibers[t];
    f.thread = make_index(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
    f.done = false;
    f.at_barrier = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &s.scheduler;
    makecontext(&f.context, fiber_entry, 0);
    order[t] = t;
  }
  for (;;) {
    // Run every live thread up to its next barrier (or its end), in a shuffled order.
    for (unsigned i = nthreads; i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
    for (unsigned t : order) {
      Fiber& f = *s.fibers[t];
      if (f.done) continue;
      f.at_barrier = false;
      threadIdx = f.thread;
      s.current = &f;
      swapcontext(&s.scheduler, &f.context);
    }
    unsigned done = 0, waiting = 0;
    for (unsigned t = 0; t < nthreads; ++t) {
      done += s.fibers[t]->done;
      waiting += s.fibers[t]->at_barrier;
    }
    if (done == nthreads) return;
    if (done != 0 || waiting != nthreads) {
      fail("__syncthreads() not reached by every thread of the block (divergent barrier)");
      return;  // abandon the block; the launch reports the error
    }
  }
}

// Runs `body` as a kernel over `grid` x `block`; throws on any detected error.
inline void launch(const char* what, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  State& s = state();
  s.error.clear();
  s.body = &body;
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) throw std::runtime_error(std::string(what) + ": bad block size");
  if (smem_bytes > 48 * 1024) throw std::runtime_error(std::string(what) + ": more than 48 KiB of dynamic shared memory");
  blockDim = block;
  gridDim = grid;
  s.smem.assign(smem_bytes + 128, 0xFF);
  for (unsigned z = 0; z < grid.z && s.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && s.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) {
        blockIdx = make_index(x, y, z);
        std::memset(s.smem.data(), 0xFF, s.smem.size());  // poison: NaN in every float format
        run_block(nthreads);
      }
  s.body = nullptr;
  if (!s.error.empty()) throw std::runtime_error(std::string("emulated kernel '") + what + "': " + s.error);
}

}  // namespace emu

inline void __syncthreads() { emu::barrier(); }

// ---- WMMA emulation (the subset used by tile_gemm.cuh) -------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
  float v[kRows][kCols];
};

// Lane 0 of each warp performs the warp-collective operation (1-D blocks: lane = threadIdx.x % 32).
inline bool warp_leader() { return threadIdx.x % 32 == 0; }

inline float value_of(float x) { return x; }
inline float value_of(__half x) { return __half2float(x); }
inline float value_of(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
inline void check_pointer(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("WMMA pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail("WMMA leading dimension not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same<T, P>::value, "fragment and memory types differ");
  check_pointer(p, ldm);
  if (!warp_leader()) return;
  using Frag = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < Frag::kRows; ++r)
    for (int c = 0; c < Frag::kCols; ++c)
      f.v[r][c] = value_of(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
inline void fill_fragment(fragment<accumulator, M, N, K, float>& f, float x) {
  if (!warp_leader()) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.v[r][c] = x;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!warp_leader()) return;
  float out[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < K; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm);
  if (!warp_leader()) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.v[r][c];
}

}  // namespace wmma
}  // namespace nvcuda
