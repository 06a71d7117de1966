// Raw-pointer C++ API of the madx_fast CUDA kernels (csrc/bottleneck_mlp.cu). No torch types here, so
// the .cu files compile with nothing but the CUDA toolkit; csrc/ops.cpp composes these steps into the
// adapter and NICE ops on torch tensors.
//
// Every op of madx_fast is built from one small MLP, `x -> W2 act(W1 x + b1) + b2` (the bottleneck
// adapter, and NICE's F and G), so the kernels are the six fused steps of that MLP's forward and backward:
//
//   forward   z  = x W1^T + b1                               mlp_down_forward      (K = n_in)
//             y  = base + scale * (act(z) W2^T + b2)         mlp_up_forward        (K = hidden)
//   backward  dz = scale * (dy W2) * act'(z)                 mlp_grad_preact       (K = n_out)
//             dx = dz W1 (+ add)                             mlp_grad_input        (K = hidden)
//             dW2 = scale * dy^T act(z), db2 = scale * sum dy    mlp_grad_up_weights   (K = rows, split-K)
//             dW1 = dz^T x,              db1 = sum dz            mlp_grad_down_weights (K = rows, split-K)
//
// Activations (x, base, y, z, dy, dz, dx) are row-major views with unit column stride and any leading
// dimension `ld` (so column slices of [N, H] tensors work without copies); weights and biases are
// contiguous and have the activation dtype; weight gradients are float32.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>  // cudaStream_t

namespace madx {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConstView {  // element (r, c) at ((const T*)ptr)[r * ld + c]
  const void* ptr;
  int64_t ld;
};
struct View {
  void* ptr;
  int64_t ld;
};

// Sizes of one MLP application: `rows` tokens, x [rows, n_in] -> hidden -> y [rows, n_out].
// W1 [hidden, n_in], b1 [hidden], W2 [n_out, hidden], b2 [n_out].
struct MlpShape {
  int64_t rows, n_in, hidden, n_out;
};

// Streaming multiprocessors of the current device (cached); sizes the split-K weight-gradient grids.
int device_sm_count();

void mlp_down_forward(DType dtype, cudaStream_t stream, MlpShape shape, ConstView x, const void* w1,
                      const void* b1, View z);

void mlp_up_forward(DType dtype, cudaStream_t stream, MlpShape shape, ConstView z, int activation,
                    const void* w2, const void* b2, float scale, ConstView base, View y);

void mlp_grad_preact(DType dtype, cudaStream_t stream, MlpShape shape, ConstView dy, const void* w2, ConstView z,
                     int activation, float scale, View dz);

// `add.ptr` may be null (then dx = dz W1).
void mlp_grad_input(DType dtype, cudaStream_t stream, MlpShape shape, ConstView dz, const void* w1, ConstView add,
                    View dx);

// Workspace sizes (float32 elements) for the split-K weight gradients.
int64_t mlp_grad_up_weights_workspace(MlpShape shape, int sm_count);
int64_t mlp_grad_down_weights_workspace(MlpShape shape, int sm_count);

// dw2 [n_out, hidden] and db2 [n_out], float32, contiguous.
void mlp_grad_up_weights(DType dtype, cudaStream_t stream, MlpShape shape, ConstView dy, ConstView z, int activation,
                         float scale, float* dw2, float* db2, float* workspace, int sm_count);

// dw1 [hidden, n_in] and db1 [hidden], float32, contiguous.
void mlp_grad_down_weights(DType dtype, cudaStream_t stream, MlpShape shape, ConstView dz, ConstView x, float* dw1,
                           float* db1, float* workspace, int sm_count);

}  // namespace madx
