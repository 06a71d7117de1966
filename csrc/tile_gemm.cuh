// One tiled GEMM kernel with pluggable operand loaders and epilogue, used for every matrix product of the
// adapter and NICE kernels:
//
//     C[m, n] = sum_{k in split} A(m, k) * B(k, n)          then  epilogue(m, n, split, C[m, n])
//
// * A(m, k) and B(k, n) are functors returning float32 values; they apply the fused prologue (e.g. the
//   activation on the saved pre-activation z) and may describe a virtual row/column of ones, which turns
//   a bias gradient sum_k B(k, n) into one more output row of the same GEMM.
// * The epilogue functor receives the float32 accumulator of one in-bounds output element and writes it:
//   bias + residual + scaling, activation derivative, or a float32 split-K partial.
// * blockIdx.x enumerates output tiles with the N tile index fastest, so the blocks that share one row
//   block of A (e.g. the tokens x) run next to each other and read it from L2, not HBM; blockIdx.z is
//   the split of the K range (weight gradients reduce over tokens: K = N tokens).
//
// Tile: BM x BN = 64 x 64 outputs, BK = 32, 128 threads. Operand tiles go global -> shared memory as the
// operand dtype T (exact for loaded values; prologue results are rounded to T there, as the reference
// rounds act(z) to x.dtype before its matmul). Products:
//   * fp16 / bf16 on sm_80+: WMMA 16x16x16 tensor-core tiles with float32 accumulators (4 warps, each a
//     32 x 32 sub-tile of 2 x 2 fragments);
//   * fp32 (and fp16/bf16 on older GPUs): CUDA-core FMA, each thread an 8 x 4 micro-tile. No TF32: the
//     reference runs fp32 matmuls in full fp32.
// The accumulators then go through a float32 tile in shared memory so one bounds-checked epilogue loop
// serves both paths. Every global access is guarded by m < M, n < N, k < k_end: any M, N, K works.
#pragma once

#include "common.cuh"

#if !defined(MADX_EMULATE)
#include <mma.h>
#endif

// Tensor-core path: device code for sm_80+ (bf16 WMMA needs sm_80), and the emulator (which implements
// the WMMA calls used here). Host passes and older architectures use the CUDA-core path.
#if defined(MADX_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define MADX_WMMA 1
#else
#define MADX_WMMA 0
#endif

namespace madx {

constexpr int kBM = 64, kBN = 64, kBK = 32, kGemmThreads = 128;
// Shared-memory leading dimensions, padded against bank conflicts. WMMA needs ldm % 8 == 0 (16-bit
// operands) / % 4 == 0 (float accumulators) and 32-byte aligned fragment pointers: the offsets used below
// are multiples of 16 rows / 16 columns, which keeps every fragment pointer 32-byte aligned.
constexpr int kALd = kBK + 8;  // A tile [kBM][kALd]  (m, k)
constexpr int kBLd = kBN + 8;  // B tile [kBK][kBLd]  (k, n)
constexpr int kCLd = kBN + 4;  // C tile [kBM][kCLd]  float32

constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

template <typename T>
struct GemmSmem {
  static constexpr size_t a_offset = 0;
  static constexpr size_t b_offset = align_up(sizeof(T) * kBM * kALd, 128);
  static constexpr size_t c_offset = b_offset + align_up(sizeof(T) * kBK * kBLd, 128);
  static constexpr size_t bytes = c_offset + sizeof(float) * kBM * kCLd;
  static_assert(bytes <= 48 * 1024, "tile must fit the default 48 KiB of dynamic shared memory");
};

// CUDA-core accumulator: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty*8 .. ty*8+7 and columns
// tx, tx+16, tx+32, tx+48 of the 64 x 64 tile (consecutive threads read consecutive B columns).
template <typename T>
struct SimtAccumulator {
  float acc[8][4];

  __device__ __forceinline__ void zero() {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ void multiply(const T* As, const T* Bs, int tid) {
    const int ty = tid / 16, tx = tid % 16;
    for (int kk = 0; kk < kBK; ++kk) {
      float b[4];
      for (int j = 0; j < 4; ++j) b[j] = to_f32(Bs[kk * kBLd + tx + 16 * j]);
      for (int i = 0; i < 8; ++i) {
        const float a = to_f32(As[(ty * 8 + i) * kALd + kk]);
        for (int j = 0; j < 4; ++j) acc[i][j] += a * b[j];
      }
    }
  }
  __device__ __forceinline__ void store(float* Cs, int tid) const {
    const int ty = tid / 16, tx = tid % 16;
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) Cs[(ty * 8 + i) * kCLd + tx + 16 * j] = acc[i][j];
  }
};

#if MADX_WMMA
// Tensor-core accumulator: warp w owns the 32 x 32 sub-tile at rows (w / 2) * 32, columns (w % 2) * 32,
// as 2 x 2 WMMA 16x16 float32 fragments. All 32 lanes of a warp execute these calls together.
template <typename T>
struct WmmaAccumulator {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ __forceinline__ void zero() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ __forceinline__ void multiply(const T* As, const T* Bs, int tid) {
    using namespace nvcuda;
    const int warp = tid / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (row0 + 16 * i) * kALd + kk, kALd);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + kk * kBLd + col0 + 16 * j, kBLd);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs, int tid) const {
    using namespace nvcuda;
    const int warp = tid / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (row0 + 16 * i) * kCLd + col0 + 16 * j, acc[i][j], kCLd,
                                wmma::mem_row_major);
  }
};
#endif

template <typename T> struct AccumulatorFor { using type = SimtAccumulator<T>; };
#if MADX_WMMA
template <> struct AccumulatorFor<__half> { using type = WmmaAccumulator<__half>; };
template <> struct AccumulatorFor<__nv_bfloat16> { using type = WmmaAccumulator<__nv_bfloat16>; };
#endif

// Loaders declare which index is contiguous in memory (`kContiguousInner`: k for A, n for B) so that
// consecutive threads read consecutive addresses; the tile they fill is the same either way.
template <typename T, typename LoadA, typename LoadB, typename Epilogue>
__global__ void __launch_bounds__(kGemmThreads)
tile_gemm_kernel(int64_t M, int64_t N, int64_t K, int64_t k_per_split, LoadA load_a, LoadB load_b, Epilogue epilogue) {
  using Smem = GemmSmem<T>;
  MADX_DYNAMIC_SMEM(smem);
  T* As = reinterpret_cast<T*>(smem + Smem::a_offset);
  T* Bs = reinterpret_cast<T*>(smem + Smem::b_offset);
  float* Cs = reinterpret_cast<float*>(smem + Smem::c_offset);

  const int tid = threadIdx.x;
  const int64_t n_tiles = ceil_div(N, kBN);
  const int64_t tile = blockIdx.x;
  const int64_t m0 = (tile / n_tiles) * kBM;
  const int64_t n0 = (tile % n_tiles) * kBN;
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);

  typename AccumulatorFor<T>::type acc;
  acc.zero();

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    for (int idx = tid; idx < kBM * kBK; idx += kGemmThreads) {
      int i, kk;
      if (LoadA::kContiguousInner) { i = idx / kBK; kk = idx % kBK; } else { kk = idx / kBM; i = idx % kBM; }
      const int64_t m = m0 + i, k = k0 + kk;
      As[i * kALd + kk] = from_f32<T>((m < M && k < k_end) ? load_a(m, k) : 0.f);
    }
    for (int idx = tid; idx < kBK * kBN; idx += kGemmThreads) {
      int kk, j;
      if (LoadB::kContiguousInner) { kk = idx / kBN; j = idx % kBN; } else { j = idx / kBK; kk = idx % kBK; }
      const int64_t k = k0 + kk, n = n0 + j;
      Bs[kk * kBLd + j] = from_f32<T>((k < k_end && n < N) ? load_b(k, n) : 0.f);
    }
    __syncthreads();
    acc.multiply(As, Bs, tid);
    __syncthreads();  // the next iteration overwrites As / Bs
  }

  acc.store(Cs, tid);
  __syncthreads();
  for (int idx = tid; idx < kBM * kBN; idx += kGemmThreads) {
    const int i = idx / kBN, j = idx % kBN;
    const int64_t m = m0 + i, n = n0 + j;
    if (m < M && n < N) epilogue(m, n, split, Cs[i * kCLd + j]);
  }
}

// Launches tile_gemm_kernel over all output tiles and `splits` slices of K (k_per_split a multiple of kBK).
template <typename T, typename LoadA, typename LoadB, typename Epilogue>
void tile_gemm(const char* what, cudaStream_t stream, int64_t M, int64_t N, int64_t K, int64_t splits,
               int64_t k_per_split, LoadA load_a, LoadB load_b, Epilogue epilogue) {
  if (M <= 0 || N <= 0) return;
  const int64_t tiles = ceil_div(M, kBM) * ceil_div(N, kBN);
  if (tiles > 0x7fffffffLL || splits > 65535) throw std::runtime_error(std::string(what) + ": problem too large");
  launch(what, tile_gemm_kernel<T, LoadA, LoadB, Epilogue>, dim3((unsigned)tiles, 1, (unsigned)splits),
         dim3(kGemmThreads), GemmSmem<T>::bytes, stream, M, N, K, k_per_split, load_a, load_b, epilogue);
}

// ---------------------------------------------------------------------------------------------------
// Split-K for the weight gradients (K = tokens, outputs small): each split writes a float32 partial
// tile to workspace[split][M][N]; splitk_reduce_kernel sums the splits in a fixed order (deterministic,
// no atomics) and scatters the result to the weight gradient (with any strides) and the bias gradient,
// which the GEMM computed as one extra output row (bias_is_extra_row) or column.
// ---------------------------------------------------------------------------------------------------
struct SplitK {
  int64_t splits;
  int64_t k_per_split;
};

// Enough splits to give every SM a few blocks, each split covering at least kMinRowsPerSplit tokens so
// that the float32 partials stay small next to the operands they reduce.
inline SplitK plan_splitk(int64_t K, int64_t M, int64_t N, int sm_count) {
  constexpr int64_t kMinRowsPerSplit = 256;
  const int64_t tiles = ceil_div(M, kBM) * ceil_div(N, kBN);
  if (K <= 0 || tiles <= 0) return {1, kBK};
  int64_t splits = ceil_div(4 * (int64_t)(sm_count > 0 ? sm_count : 1), tiles);
  const int64_t max_splits = ceil_div(K, kMinRowsPerSplit);
  if (splits > max_splits) splits = max_splits;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  int64_t k_per_split = ceil_div(ceil_div(K, splits), kBK) * kBK;
  splits = ceil_div(K, k_per_split);  // no empty split
  return {splits, k_per_split};
}

static __global__ void splitk_reduce_kernel(const float* __restrict__ workspace, int64_t splits, int64_t M, int64_t N,
                                     float scale, float* __restrict__ out, int64_t out_stride_m,
                                     int64_t out_stride_n, float* __restrict__ bias_out, bool bias_is_extra_row) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= M * N) return;
  const int64_t m = idx / N, n = idx % N;
  float sum = 0.f;
  for (int64_t s = 0; s < splits; ++s) sum += workspace[(s * M + m) * N + n];
  sum *= scale;
  if (bias_is_extra_row) {
    if (m == M - 1) bias_out[n] = sum; else out[m * out_stride_m + n * out_stride_n] = sum;
  } else {
    if (n == N - 1) bias_out[m] = sum; else out[m * out_stride_m + n * out_stride_n] = sum;
  }
}

struct SplitKStore {
  float* workspace;
  int64_t M, N;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int64_t split, float acc) const {
    workspace[(split * M + m) * N + n] = acc;
  }
};

inline void splitk_reduce(const char* what, cudaStream_t stream, const float* workspace, SplitK plan, int64_t M,
                          int64_t N, float scale, float* out, int64_t out_stride_m, int64_t out_stride_n,
                          float* bias_out, bool bias_is_extra_row) {
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div(M * N, kThreads);
  if (blocks > 0x7fffffffLL) throw std::runtime_error(std::string(what) + ": problem too large");
  launch(what, splitk_reduce_kernel, dim3((unsigned)blocks), dim3(kThreads), 0, stream, workspace, plan.splits, M,
         N, scale, out, out_stride_m, out_stride_n, bias_out, bias_is_extra_row);
}

}  // namespace madx
