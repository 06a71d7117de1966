// Shared device helpers for the madx_fast CUDA kernels: dtype conversion, activations and their
// derivatives, and the kernel-launch helper.
//
// The same sources also compile as plain C++ with MADX_EMULATE defined (csrc/emulation/cuda_emu.h): the
// kernels then run on the CPU, one fiber per CUDA thread, which is how the indexing, bounds checks and
// barrier placement are tested on machines without a GPU (tests/kernels/cuda/test_emulator.py).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef MADX_EMULATE
#include "emulation/cuda_emu.h"
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#define MADX_DEVICE __host__ __device__ __forceinline__

// Dynamic shared memory of a kernel as a byte array (the emulator hands out a poisoned per-block buffer).
#ifdef MADX_EMULATE
#define MADX_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
#else
#define MADX_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace madx {

// ---------------------------------------------------------------------------------------------------
// dtype conversion: every product is done on values converted to float32 (or on tensor cores with a
// float32 accumulator); results are rounded once to the storage type with round-to-nearest-even.
// ---------------------------------------------------------------------------------------------------
MADX_DEVICE float to_f32(float v) { return v; }
MADX_DEVICE float to_f32(__half v) { return __half2float(v); }
MADX_DEVICE float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> MADX_DEVICE T from_f32(float v);
template <> MADX_DEVICE float from_f32<float>(float v) { return v; }
template <> MADX_DEVICE __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> MADX_DEVICE __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

MADX_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MADX_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------------
// Activations: codes as in madx_fast.reference.ACTIVATION_CODES. The formulas follow PyTorch's own
// kernels (F.gelu exact / approximate="tanh", F.silu, F.leaky_relu(0.01)). NaN propagates through every
// branch (relu(NaN) = NaN as in torch), which also keeps poisoned memory visible in the emulator tests.
// The backward (activation_backward) follows torch's autograd for NaN/Inf too: relu and leaky relu select
// rather than multiply, the identity passes the gradient through, the smooth ones multiply by act'(z).
// ---------------------------------------------------------------------------------------------------
enum Activation : int {
  kIdentity = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kTanh = 5, kLeakyRelu = 6,
};
constexpr int kNumActivations = 7;
constexpr float kLeakySlope = 0.01f;
constexpr float kInvSqrt2 = 0.70710678118654752440f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kGeluKappa = 0.044715f;

// act(z)
MADX_DEVICE float activation_forward(int act, float z) {
  switch (act) {
    case kRelu: return z < 0.f ? 0.f : z;
    case kGelu: return 0.5f * z * (1.f + erff(z * kInvSqrt2));
    case kGeluTanh: return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + kGeluKappa * z * z * z)));
    case kSilu: return z / (1.f + expf(-z));
    case kTanh: return tanhf(z);
    case kLeakyRelu: return z < 0.f ? kLeakySlope * z : z;
    default: return z;
  }
}

// d act(z) / dz of the smooth activations (relu, leaky relu and identity: see activation_backward)
MADX_DEVICE float activation_grad(int act, float z) {
  switch (act) {
    case kGelu: {
      const float cdf = 0.5f * (1.f + erff(z * kInvSqrt2));
      const float pdf = expf(-0.5f * z * z) * kInvSqrt2Pi;
      return cdf + z * pdf;
    }
    case kGeluTanh: {
      const float z2 = z * z;
      const float t = tanhf(kSqrt2OverPi * (z + kGeluKappa * z2 * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluKappa * z2);
    }
    case kSilu: {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f + z * (1.f - s));
    }
    case kTanh: {
      const float t = tanhf(z);
      return 1.f - t * t;
    }
    default: return 1.f;
  }
}

// g * act'(z) as torch's autograd computes it: relu is threshold_backward(g, relu(z), 0) = (relu(z) <= 0 ?
// 0 : g), so a NaN z passes g through and z <= 0 gives 0 even for an Inf or NaN g; leaky relu is
// (z > 0 ? g : g * slope); the identity is g; the others g * act'(z) (Inf * 0 = NaN as in torch).
MADX_DEVICE float activation_backward(int act, float g, float z) {
  switch (act) {
    case kIdentity: return g;
    case kRelu: return z <= 0.f ? 0.f : g;
    case kLeakyRelu: return z > 0.f ? g : g * kLeakySlope;
    default: return g * activation_grad(act, z);
  }
}

// ---------------------------------------------------------------------------------------------------
// Launch helper: `launch(kernel, grid, block, smem, stream, args...)`. Empty grids are skipped (a launch
// with a zero dimension is an error in CUDA), and launch errors become C++ exceptions with the kernel's
// role in the message. Under MADX_EMULATE the kernel runs on the CPU emulator instead.
// ---------------------------------------------------------------------------------------------------
inline void check_cuda(cudaError_t err, const char* what) {
#ifndef MADX_EMULATE
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("madx_fast CUDA kernel '") + what + "' failed: " + cudaGetErrorString(err));
  }
#else
  (void)err;
  (void)what;
#endif
}

template <typename... KernelArgs, typename... Args>
void launch(const char* what, void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
            cudaStream_t stream, Args... args) {
  static_assert(sizeof...(KernelArgs) == sizeof...(Args), "wrong number of kernel arguments");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
#ifdef MADX_EMULATE
  (void)stream;
  ::emu::launch(what, grid, block, smem_bytes, [&]() { kernel(static_cast<KernelArgs>(args)...); });
#else
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<KernelArgs>(args)...);
  check_cuda(cudaGetLastError(), what);
#endif
}

}  // namespace madx
