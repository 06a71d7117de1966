// The six fused steps of the bottleneck MLP `x -> W2 act(W1 x + b1) + b2` (see madx_cuda.h), each one
// tile_gemm with a loader prologue and an epilogue:
//
//   step                   A(m, k)               B(k, n)             epilogue
//   mlp_down_forward       x[m, k]               W1[n, k]            z = acc + b1[n]
//   mlp_up_forward         act(z[m, k])          W2[n, k]            y = base + scale (acc + b2[n])
//   mlp_grad_preact        dy[m, k]              W2[k, n]            dz = scale acc act'(z[m, n])
//   mlp_grad_input         dz[m, k]              W1[k, n]            dx = acc (+ add[m, n])
//   mlp_grad_up_weights    act(z[k, m]) | 1      dy[k, n]            split-K partial -> dW2^T | db2
//   mlp_grad_down_weights  dz[k, m]              x[k, n] | 1         split-K partial -> dW1 | db1
//
// The "| 1" is a virtual row (column) of ones appended to the operand: the extra output row (column)
// of that GEMM is the bias gradient, so db2 and db1 cost no separate pass over dy or dz.
// Passes over [rows, H] data: forward reads x (down), reads base and writes y (up) = 3; the saved z and
// the hidden activations are [rows, hidden] only.
#include "madx_cuda.h"
#include "tile_gemm.cuh"

#include <atomic>

namespace madx {
namespace {

// ---- operand loaders --------------------------------------------------------------------------------
// Called as A(m, k) or B(k, n); kContiguousInner says whether the second index is the contiguous one.

template <typename T>
struct RowMajor {  // (outer, inner) -> p[outer * ld + inner]
  static constexpr bool kContiguousInner = true;
  const T* p;
  int64_t ld;
  __device__ __forceinline__ float operator()(int64_t outer, int64_t inner) const { return to_f32(p[outer * ld + inner]); }
};

template <typename T>
struct Transposed {  // (outer, inner) -> p[inner * ld + outer]
  static constexpr bool kContiguousInner = false;
  const T* p;
  int64_t ld;
  __device__ __forceinline__ float operator()(int64_t outer, int64_t inner) const { return to_f32(p[inner * ld + outer]); }
};

template <typename T>
struct ActivatedRowMajor {  // A(m, k) = act(z[m, k])
  static constexpr bool kContiguousInner = true;
  const T* z;
  int64_t ld;
  int act;
  __device__ __forceinline__ float operator()(int64_t m, int64_t k) const {
    return activation_forward(act, to_f32(z[m * ld + k]));
  }
};

template <typename T>
struct ActivatedTransposedOnesRow {  // A(j, r) = act(z[r, j]) for j < hidden, 1 for j == hidden
  static constexpr bool kContiguousInner = false;
  const T* z;
  int64_t ld;
  int64_t hidden;
  int act;
  __device__ __forceinline__ float operator()(int64_t j, int64_t r) const {
    return j < hidden ? activation_forward(act, to_f32(z[r * ld + j])) : 1.f;
  }
};

template <typename T>
struct RowMajorOnesColumn {  // B(r, i) = x[r, i] for i < n_in, 1 for i == n_in
  static constexpr bool kContiguousInner = true;
  const T* p;
  int64_t ld;
  int64_t n_in;
  __device__ __forceinline__ float operator()(int64_t r, int64_t i) const {
    return i < n_in ? to_f32(p[r * ld + i]) : 1.f;
  }
};

// ---- epilogues ----------------------------------------------------------------------------------------
// Called once per in-bounds output element with the float32 accumulator; one rounding to T at the end.

template <typename T>
struct BiasStore {  // out = acc + bias[n]
  const T* bias;
  T* out;
  int64_t ld;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int64_t, float acc) const {
    out[m * ld + n] = from_f32<T>(acc + to_f32(bias[n]));
  }
};

template <typename T>
struct ScaledBiasResidualStore {  // out = base + scale * (acc + bias[n])
  const T* bias;
  const T* base;
  int64_t ld_base;
  float scale;
  T* out;
  int64_t ld_out;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int64_t, float acc) const {
    out[m * ld_out + n] = from_f32<T>(to_f32(base[m * ld_base + n]) + scale * (acc + to_f32(bias[n])));
  }
};

template <typename T>
struct ActivationGradStore {  // dz = (scale * acc) * act'(z), torch's NaN/Inf rules
  const T* z;
  int64_t ld_z;
  int act;
  float scale;
  T* dz;
  int64_t ld_dz;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int64_t, float acc) const {
    dz[m * ld_dz + n] = from_f32<T>(activation_backward(act, scale * acc, to_f32(z[m * ld_z + n])));
  }
};

template <typename T>
struct AddStore {  // out = acc (+ add)
  const T* add;  // may be null
  int64_t ld_add;
  T* out;
  int64_t ld_out;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int64_t, float acc) const {
    const float extra = add != nullptr ? to_f32(add[m * ld_add + n]) : 0.f;
    out[m * ld_out + n] = from_f32<T>(acc + extra);
  }
};

// ---- dtype dispatch -------------------------------------------------------------------------------------
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(__half{}); return;
    case DType::kBFloat16: f(__nv_bfloat16{}); return;
  }
  throw std::runtime_error("madx_fast CUDA kernels: unsupported dtype");
}

template <typename T> const T* cptr(const void* p) { return static_cast<const T*>(p); }
template <typename T> T* ptr(void* p) { return static_cast<T*>(p); }

}  // namespace

int device_sm_count() {
#ifdef MADX_EMULATE
  return 8;
#else
  static std::atomic<int> cache[64] = {};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 0 || device >= 64) device = 0;
  int count = cache[device].load();
  if (count <= 0) {
    check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cache[device].store(count);
  }
  return count;
#endif
}

void mlp_down_forward(DType dtype, cudaStream_t stream, MlpShape s, ConstView x, const void* w1, const void* b1,
                      View z) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_gemm<T>("mlp_down_forward", stream, s.rows, s.hidden, s.n_in, 1, s.n_in, RowMajor<T>{cptr<T>(x.ptr), x.ld},
                 Transposed<T>{cptr<T>(w1), s.n_in}, BiasStore<T>{cptr<T>(b1), ptr<T>(z.ptr), z.ld});
  });
}

void mlp_up_forward(DType dtype, cudaStream_t stream, MlpShape s, ConstView z, int activation, const void* w2,
                    const void* b2, float scale, ConstView base, View y) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_gemm<T>("mlp_up_forward", stream, s.rows, s.n_out, s.hidden, 1, s.hidden,
                 ActivatedRowMajor<T>{cptr<T>(z.ptr), z.ld, activation}, Transposed<T>{cptr<T>(w2), s.hidden},
                 ScaledBiasResidualStore<T>{cptr<T>(b2), cptr<T>(base.ptr), base.ld, scale, ptr<T>(y.ptr), y.ld});
  });
}

void mlp_grad_preact(DType dtype, cudaStream_t stream, MlpShape s, ConstView dy, const void* w2, ConstView z,
                     int activation, float scale, View dz) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_gemm<T>("mlp_grad_preact", stream, s.rows, s.hidden, s.n_out, 1, s.n_out, RowMajor<T>{cptr<T>(dy.ptr), dy.ld},
                 RowMajor<T>{cptr<T>(w2), s.hidden},
                 ActivationGradStore<T>{cptr<T>(z.ptr), z.ld, activation, scale, ptr<T>(dz.ptr), dz.ld});
  });
}

void mlp_grad_input(DType dtype, cudaStream_t stream, MlpShape s, ConstView dz, const void* w1, ConstView add,
                    View dx) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_gemm<T>("mlp_grad_input", stream, s.rows, s.n_in, s.hidden, 1, s.hidden, RowMajor<T>{cptr<T>(dz.ptr), dz.ld},
                 RowMajor<T>{cptr<T>(w1), s.n_in}, AddStore<T>{cptr<T>(add.ptr), add.ld, ptr<T>(dx.ptr), dx.ld});
  });
}

// dW2^T = act(z)^T dy as an [hidden + 1, n_out] GEMM over the rows; its last row is sum_r dy = db2 / scale.
int64_t mlp_grad_up_weights_workspace(MlpShape s, int sm_count) {
  const SplitK plan = plan_splitk(s.rows, s.hidden + 1, s.n_out, sm_count);
  return plan.splits * (s.hidden + 1) * s.n_out;
}

void mlp_grad_up_weights(DType dtype, cudaStream_t stream, MlpShape s, ConstView dy, ConstView z, int activation,
                         float scale, float* dw2, float* db2, float* workspace, int sm_count) {
  const int64_t M = s.hidden + 1, N = s.n_out;
  const SplitK plan = plan_splitk(s.rows, M, N, sm_count);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_gemm<T>("mlp_grad_up_weights", stream, M, N, s.rows, plan.splits, plan.k_per_split,
                 ActivatedTransposedOnesRow<T>{cptr<T>(z.ptr), z.ld, s.hidden, activation},
                 RowMajor<T>{cptr<T>(dy.ptr), dy.ld}, SplitKStore{workspace, M, N});
  });
  // workspace element (j, o) -> dW2[o, j] (stride_m 1, stride_n hidden); row j == hidden -> db2[o].
  splitk_reduce("mlp_grad_up_weights/reduce", stream, workspace, plan, M, N, scale, dw2, 1, s.hidden, db2, true);
}

// dW1 = dz^T x as a [hidden, n_in + 1] GEMM over the rows; its last column is sum_r dz = db1.
int64_t mlp_grad_down_weights_workspace(MlpShape s, int sm_count) {
  const SplitK plan = plan_splitk(s.rows, s.hidden, s.n_in + 1, sm_count);
  return plan.splits * s.hidden * (s.n_in + 1);
}

void mlp_grad_down_weights(DType dtype, cudaStream_t stream, MlpShape s, ConstView dz, ConstView x, float* dw1,
                           float* db1, float* workspace, int sm_count) {
  const int64_t M = s.hidden, N = s.n_in + 1;
  const SplitK plan = plan_splitk(s.rows, M, N, sm_count);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tile_gemm<T>("mlp_grad_down_weights", stream, M, N, s.rows, plan.splits, plan.k_per_split,
                 Transposed<T>{cptr<T>(dz.ptr), dz.ld}, RowMajorOnesColumn<T>{cptr<T>(x.ptr), x.ld, s.n_in},
                 SplitKStore{workspace, M, N});
  });
  // workspace element (j, i) -> dW1[j, i] (stride_m n_in, stride_n 1); column i == n_in -> db1[j].
  splitk_reduce("mlp_grad_down_weights/reduce", stream, workspace, plan, M, N, 1.f, dw1, s.n_in, 1, db1, false);
}

}  // namespace madx
