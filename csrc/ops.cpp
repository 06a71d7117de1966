// The adapter and NICE ops of the CUDA backend, composed from the six fused MLP steps of madx_cuda.h.
// Host code only: input checks, dtype casts of the (small) weights, allocation, launch order.
//
// Bottleneck adapter, y = r + s * (W_up act(W_down x + b_down) + b_up), MLP = (W_down, W_up):
//   forward   z = down(x); y = up(z, base = r, scale = s)                        2 kernels, 3 passes
//   backward  dz = s * (dy W_up) * act'(z)                                        grad_preact
//             dx = dz W_down (+ dy when r is x)                                   grad_input
//             dW_up = s * dy^T act(z), db_up = s * sum dy                          grad_up_weights
//             dW_down = dz^T x, db_down = sum dz                                  grad_down_weights
//
// NICE coupling, x = [x1 | x2] split at H // 2, F: x2 -> x1 side, G: x1 -> x2 side. Both directions are
// two "coupling steps" `out[:, target] = in[:, target] + sign * MLP(cond)`:
//   forward (sign +1):  step A = F (target x1, cond x2), then step B = G (target x2, cond = new x1)
//   inverse (sign -1):  step A = G (target x2, cond y1), then step B = F (target x1, cond = new x2)
// Step B's condition is the output of step A, step A's condition is the input columns step B rewrites.
//
// Backward of the coupling (derivation; g = upstream gradient, s = sign):
//   out[:, tB] = in[:, tB] + s MLP_B(out[:, tA])   ->  d in[:, tB] gets g[:, tB] directly, and
//                                                      d out[:, tA] (total) = g[:, tA] + MLP_B backward(g[:, tB])
//   out[:, tA] = in[:, tA] + s MLP_A(in[:, tB])     ->  d in[:, tA] = d out[:, tA] (total), and
//                                                      d in[:, tB] = g[:, tB] + MLP_A backward(d in[:, tA])
// where "MLP backward(g)" is grad_preact + grad_input of that MLP with scale s, and its weight gradients
// are the grad_*_weights steps with the same g. MLP_A's condition in[:, tB] is read from `inp` or, when
// inp is None, rebuilt from the output: in[:, tB] = out[:, tB] - s MLP_B(out[:, tA]) (one up step on the
// z_B that the backward needs anyway). A row whose output holds Inf/NaN cannot be rebuilt: its z_a and dz_a
// are set to NaN, so MLP_A's weight gradients and d in[:, tB] are NaN there, never a wrong finite value.
#include "ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "madx_cuda.h"

#ifndef MADX_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace madx {
namespace {

constexpr int kNumActivationCodes = 7;  // madx_fast.reference.ACTIVATION_CODES

// Device guard and current stream of the inputs' device. The emulator build runs on CPU tensors.
struct DeviceContext {
#ifndef MADX_EMULATE
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit DeviceContext(const at::Tensor& t)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()) {}
#else
  cudaStream_t stream = nullptr;
  explicit DeviceContext(const at::Tensor&) {}
#endif
};

// Outputs, scratch and workspaces. In the emulator build every allocation is a NaN-poisoned view into a
// larger NaN buffer, and check() verifies after the op that no kernel wrote outside its tensors.
class Buffers {
 public:
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef MADX_EMULATE
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    at::Tensor flat = at::full({numel + 2 * kGuard}, NAN, options);
    guarded_.emplace_back(flat, numel);
    return flat.narrow(0, kGuard, numel).view(sizes);
#else
    return at::empty(sizes, options);
#endif
  }
  void check() const {
#ifdef MADX_EMULATE
    for (const auto& [flat, numel] : guarded_) {
      const bool intact = flat.narrow(0, 0, kGuard).isnan().all().item<bool>() &&
                          flat.narrow(0, kGuard + numel, kGuard).isnan().all().item<bool>();
      TORCH_CHECK(intact, "madx_fast emulated kernels wrote outside an output or scratch tensor");
    }
#endif
  }

 private:
#ifdef MADX_EMULATE
  static constexpr int64_t kGuard = 1024;
  std::vector<std::pair<at::Tensor, int64_t>> guarded_;
#endif
};

void check_device(const at::Tensor& t, const char* name) {
#ifdef MADX_EMULATE
  TORCH_CHECK(t.device().is_cpu(), "emulated madx_fast CUDA kernels take CPU tensors; ", name, " is on ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), "madx_fast CUDA backend: ", name, " must be a CUDA tensor, got one on ", t.device());
#endif
}

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "madx_fast CUDA backend supports float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

void check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation < kNumActivationCodes, "unknown activation code ", activation);
}

// A [rows, cols] activation tensor with unit column stride (any row stride); copies only when needed.
at::Tensor as_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, at::ScalarType dtype,
                   const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape [", rows, ", ", cols,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), ", expected ", device);
  if (cols > 1 && t.stride(1) != 1) return t.contiguous();
  return t;
}

// Weights and biases: cast to the activation dtype (as the reference does) and made contiguous.
at::Tensor as_weight(const at::Tensor& w, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                     const at::Device& device) {
  TORCH_CHECK(w.sizes() == shape, name, " has shape ", w.sizes(), ", expected ", shape);
  TORCH_CHECK(w.device() == device, name, " is on ", w.device(), ", expected ", device);
  kernel_dtype(w);  // a float dtype
  return w.to(dtype).contiguous();
}

ConstView cview(const at::Tensor& t, int64_t col0 = 0) {
  return {static_cast<const char*>(t.data_ptr()) + col0 * t.element_size(), t.stride(0)};
}
View view(const at::Tensor& t, int64_t col0 = 0) {
  return {static_cast<char*>(t.data_ptr()) + col0 * t.element_size(), t.stride(0)};
}
float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

// ---- NICE coupling steps -------------------------------------------------------------------------------
struct CouplingStep {
  const at::Tensor *w1, *b1, *w2, *b2;  // prepared weights of this step's MLP (F or G)
  int64_t target0, target_len;           // columns the step rewrites
  int64_t cond0, cond_len;               // columns the MLP reads
  int64_t hidden;
  int grad_slot;                         // 0 for F, 4 for G in the gradient list
  MlpShape shape(int64_t rows) const { return {rows, cond_len, hidden, target_len}; }
};

struct Coupling {
  CouplingStep first, second;  // A, then B
  float sign;
};

// weights: prepared (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2).
Coupling make_coupling(const std::vector<at::Tensor>& w, int64_t h, bool inverse) {
  const int64_t len1 = h / 2, len2 = h - len1;
  const CouplingStep f{&w[0], &w[1], &w[2], &w[3], 0, len1, len1, len2, w[0].size(0), 0};
  const CouplingStep g{&w[4], &w[5], &w[6], &w[7], len1, len2, 0, len1, w[4].size(0), 4};
  return inverse ? Coupling{g, f, -1.f} : Coupling{f, g, 1.f};
}

std::vector<at::Tensor> prepare_nice_weights(const std::vector<at::Tensor>& weights, int64_t h,
                                             at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(weights.size() == 8, "NICE expects 8 weight tensors (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2), got ",
              weights.size());
  const int64_t len1 = h / 2, len2 = h - len1;
  TORCH_CHECK(weights[0].dim() == 2 && weights[4].dim() == 2, "f_w1 and g_w1 must be 2-D");
  const int64_t hf = weights[0].size(0), hg = weights[4].size(0);
  return {as_weight(weights[0], "f_w1", {hf, len2}, dtype, device), as_weight(weights[1], "f_b1", {hf}, dtype, device),
          as_weight(weights[2], "f_w2", {len1, hf}, dtype, device), as_weight(weights[3], "f_b2", {len1}, dtype, device),
          as_weight(weights[4], "g_w1", {hg, len1}, dtype, device), as_weight(weights[5], "g_b1", {hg}, dtype, device),
          as_weight(weights[6], "g_w2", {len2, hg}, dtype, device), as_weight(weights[7], "g_b2", {len2}, dtype, device)};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Bottleneck adapter
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
                                                   const at::Tensor& w_down, const at::Tensor& b_down,
                                                   const at::Tensor& w_up, const at::Tensor& b_up, double scaling,
                                                   int64_t activation) {
  check_device(x_in, "x");
  check_activation(activation);
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [N, H], got ", x_in.sizes());
  TORCH_CHECK(w_down.dim() == 2, "w_down must be 2-D [d, H], got ", w_down.sizes());
  const DType kind = kernel_dtype(x_in);
  const at::ScalarType dt = x_in.scalar_type();
  const at::Device dev = x_in.device();
  const int64_t n = x_in.size(0), h = x_in.size(1), d = w_down.size(0);

  const at::Tensor x = as_rows(x_in, "x", n, h, dt, dev);
  const at::Tensor r = residual.has_value() ? as_rows(*residual, "residual", n, h, dt, dev) : x;
  const at::Tensor wd = as_weight(w_down, "w_down", {d, h}, dt, dev), bd = as_weight(b_down, "b_down", {d}, dt, dev);
  const at::Tensor wu = as_weight(w_up, "w_up", {h, d}, dt, dev), bu = as_weight(b_up, "b_up", {h}, dt, dev);

  DeviceContext ctx(x);
  Buffers buffers;
  at::Tensor z = buffers.empty({n, d}, x.options());
  at::Tensor y = buffers.empty({n, h}, x.options());
  const MlpShape shape{n, h, d, h};
  mlp_down_forward(kind, ctx.stream, shape, cview(x), wd.data_ptr(), bd.data_ptr(), view(z));
  mlp_up_forward(kind, ctx.stream, shape, cview(z), (int)activation, wu.data_ptr(), bu.data_ptr(), (float)scaling,
                 cview(r), view(y));
  buffers.check();
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& z_in, const at::Tensor& w_down,
    const at::Tensor& w_up, double scaling, int64_t activation, bool residual_is_input) {
  check_device(x_in, "x");
  check_activation(activation);
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [N, H], got ", x_in.sizes());
  TORCH_CHECK(w_down.dim() == 2, "w_down must be 2-D [d, H], got ", w_down.sizes());
  const DType kind = kernel_dtype(x_in);
  const at::ScalarType dt = x_in.scalar_type();
  const at::Device dev = x_in.device();
  const int64_t n = x_in.size(0), h = x_in.size(1), d = w_down.size(0);

  const at::Tensor x = as_rows(x_in, "x", n, h, dt, dev);
  const at::Tensor dy = as_rows(dy_in, "dy", n, h, dt, dev);
  const at::Tensor z = as_rows(z_in, "z", n, d, dt, dev);
  const at::Tensor wd = as_weight(w_down, "w_down", {d, h}, dt, dev);
  const at::Tensor wu = as_weight(w_up, "w_up", {h, d}, dt, dev);
  const int act = (int)activation;
  const float s = (float)scaling;

  DeviceContext ctx(x);
  Buffers buffers;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const MlpShape shape{n, h, d, h};
  const int sm = device_sm_count();
  at::Tensor dz = buffers.empty({n, d}, x.options());
  at::Tensor dx = buffers.empty({n, h}, x.options());
  at::Tensor dwd = buffers.empty({d, h}, f32), dbd = buffers.empty({d}, f32);
  at::Tensor dwu = buffers.empty({h, d}, f32), dbu = buffers.empty({h}, f32);
  at::Tensor workspace = buffers.empty(
      {std::max(mlp_grad_up_weights_workspace(shape, sm), mlp_grad_down_weights_workspace(shape, sm))}, f32);

  mlp_grad_preact(kind, ctx.stream, shape, cview(dy), wu.data_ptr(), cview(z), act, s, view(dz));
  mlp_grad_input(kind, ctx.stream, shape, cview(dz), wd.data_ptr(), residual_is_input ? cview(dy) : ConstView{nullptr, 0},
                 view(dx));
  mlp_grad_up_weights(kind, ctx.stream, shape, cview(dy), cview(z), act, s, fptr(dwu), fptr(dbu), fptr(workspace), sm);
  mlp_grad_down_weights(kind, ctx.stream, shape, cview(dz), cview(x), fptr(dwd), fptr(dbd), fptr(workspace), sm);
  buffers.check();
  return {dx, dwd, dbd, dwu, dbu};
}

// ---------------------------------------------------------------------------------------------------------
// NICE coupling
// ---------------------------------------------------------------------------------------------------------
at::Tensor nice_coupling(const at::Tensor& x_in, const std::vector<at::Tensor>& weights, int64_t activation,
                         bool inverse) {
  check_device(x_in, "x");
  check_activation(activation);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) >= 2, "x must be 2-D [N, H] with H >= 2, got ", x_in.sizes());
  const DType kind = kernel_dtype(x_in);
  const at::ScalarType dt = x_in.scalar_type();
  const at::Device dev = x_in.device();
  const int64_t n = x_in.size(0), h = x_in.size(1);
  const at::Tensor x = as_rows(x_in, "x", n, h, dt, dev);
  const std::vector<at::Tensor> w = prepare_nice_weights(weights, h, dt, dev);
  const Coupling c = make_coupling(w, h, inverse);
  const int act = (int)activation;

  DeviceContext ctx(x);
  Buffers buffers;
  at::Tensor out = buffers.empty({n, h}, x.options());
  at::Tensor z_a = buffers.empty({n, c.first.hidden}, x.options());
  at::Tensor z_b = buffers.empty({n, c.second.hidden}, x.options());
  const CouplingStep& a = c.first;
  const CouplingStep& b = c.second;
  // step A: out[:, tA] = x[:, tA] + sign * MLP_A(x[:, cA])
  mlp_down_forward(kind, ctx.stream, a.shape(n), cview(x, a.cond0), a.w1->data_ptr(), a.b1->data_ptr(), view(z_a));
  mlp_up_forward(kind, ctx.stream, a.shape(n), cview(z_a), act, a.w2->data_ptr(), a.b2->data_ptr(), c.sign,
                 cview(x, a.target0), view(out, a.target0));
  // step B: out[:, tB] = x[:, tB] + sign * MLP_B(out[:, tA])
  mlp_down_forward(kind, ctx.stream, b.shape(n), cview(out, b.cond0), b.w1->data_ptr(), b.b1->data_ptr(), view(z_b));
  mlp_up_forward(kind, ctx.stream, b.shape(n), cview(z_b), act, b.w2->data_ptr(), b.b2->data_ptr(), c.sign,
                 cview(x, b.target0), view(out, b.target0));
  buffers.check();
  return out;
}

std::vector<at::Tensor> nice_coupling_backward(const at::Tensor& dout_in, const at::Tensor& out_in,
                                               const std::optional<at::Tensor>& inp_in,
                                               const std::vector<at::Tensor>& weights, int64_t activation,
                                               bool inverse) {
  check_device(out_in, "out");
  check_activation(activation);
  TORCH_CHECK(out_in.dim() == 2 && out_in.size(1) >= 2, "out must be 2-D [N, H] with H >= 2, got ", out_in.sizes());
  const DType kind = kernel_dtype(out_in);
  const at::ScalarType dt = out_in.scalar_type();
  const at::Device dev = out_in.device();
  const int64_t n = out_in.size(0), h = out_in.size(1);
  const at::Tensor out = as_rows(out_in, "out", n, h, dt, dev);
  const at::Tensor dout = as_rows(dout_in, "dout", n, h, dt, dev);
  const std::vector<at::Tensor> w = prepare_nice_weights(weights, h, dt, dev);
  const Coupling c = make_coupling(w, h, inverse);
  const CouplingStep& a = c.first;
  const CouplingStep& b = c.second;
  const float s = c.sign;
  const int act = (int)activation;

  DeviceContext ctx(out);
  Buffers buffers;
  const at::TensorOptions f32 = out.options().dtype(at::kFloat);
  const int sm = device_sm_count();
  at::Tensor d_inp = buffers.empty({n, h}, out.options());
  std::vector<at::Tensor> grads(8);
  for (const CouplingStep* step : {&a, &b}) {
    grads[step->grad_slot + 0] = buffers.empty({step->hidden, step->cond_len}, f32);
    grads[step->grad_slot + 1] = buffers.empty({step->hidden}, f32);
    grads[step->grad_slot + 2] = buffers.empty({step->target_len, step->hidden}, f32);
    grads[step->grad_slot + 3] = buffers.empty({step->target_len}, f32);
  }
  int64_t workspace_floats = 0;
  for (const CouplingStep* step : {&a, &b}) {
    workspace_floats = std::max({workspace_floats, mlp_grad_up_weights_workspace(step->shape(n), sm),
                                 mlp_grad_down_weights_workspace(step->shape(n), sm)});
  }
  at::Tensor workspace = buffers.empty({workspace_floats}, f32);

  // Pre-activations of both MLPs (not saved by the forward), and MLP_A's condition in[:, tB].
  at::Tensor z_b = buffers.empty({n, b.hidden}, out.options());
  mlp_down_forward(kind, ctx.stream, b.shape(n), cview(out, b.cond0), b.w1->data_ptr(), b.b1->data_ptr(), view(z_b));
  at::Tensor cond_a;  // [n, a.cond_len] view of in[:, tB]
  if (inp_in.has_value()) {
    cond_a = as_rows(*inp_in, "inp", n, h, dt, dev).narrow(1, a.cond0, a.cond_len);
  } else {
    cond_a = buffers.empty({n, a.cond_len}, out.options());
    mlp_up_forward(kind, ctx.stream, b.shape(n), cview(z_b), act, b.w2->data_ptr(), b.b2->data_ptr(), -s,
                   cview(out, b.target0), view(cond_a));
  }
  at::Tensor z_a = buffers.empty({n, a.hidden}, out.options());
  mlp_down_forward(kind, ctx.stream, a.shape(n), cview(cond_a), a.w1->data_ptr(), a.b1->data_ptr(), view(z_a));
  // Where the output held Inf/NaN the rebuilt condition is lost (x + Inf - Inf): such a row's z_a and dz_a
  // become NaN, so everything that depends on in[:, tB] is NaN rather than a wrong finite number.
  at::Tensor lost_rows;
  if (!inp_in.has_value()) {
    lost_rows = at::isfinite(cond_a).all(1, /*keepdim=*/true).logical_not();
    z_a.masked_fill_(lost_rows, NAN);
  }

  // Step B backward: upstream dout[:, tB]; writes d_inp[:, tA] = dout[:, tA] + MLP_B input gradient.
  at::Tensor dz_b = buffers.empty({n, b.hidden}, out.options());
  mlp_grad_preact(kind, ctx.stream, b.shape(n), cview(dout, b.target0), b.w2->data_ptr(), cview(z_b), act, s,
                  view(dz_b));
  mlp_grad_input(kind, ctx.stream, b.shape(n), cview(dz_b), b.w1->data_ptr(), cview(dout, b.cond0),
                 view(d_inp, b.cond0));
  mlp_grad_up_weights(kind, ctx.stream, b.shape(n), cview(dout, b.target0), cview(z_b), act, s,
                      fptr(grads[b.grad_slot + 2]), fptr(grads[b.grad_slot + 3]), fptr(workspace), sm);
  mlp_grad_down_weights(kind, ctx.stream, b.shape(n), cview(dz_b), cview(out, b.cond0), fptr(grads[b.grad_slot + 0]),
                        fptr(grads[b.grad_slot + 1]), fptr(workspace), sm);

  // Step A backward: upstream d_inp[:, tA]; writes d_inp[:, tB] = dout[:, tB] + MLP_A input gradient.
  at::Tensor dz_a = buffers.empty({n, a.hidden}, out.options());
  mlp_grad_preact(kind, ctx.stream, a.shape(n), cview(d_inp, a.target0), a.w2->data_ptr(), cview(z_a), act, s,
                  view(dz_a));
  if (lost_rows.defined()) dz_a.masked_fill_(lost_rows, NAN);
  mlp_grad_input(kind, ctx.stream, a.shape(n), cview(dz_a), a.w1->data_ptr(), cview(dout, a.cond0),
                 view(d_inp, a.cond0));
  mlp_grad_up_weights(kind, ctx.stream, a.shape(n), cview(d_inp, a.target0), cview(z_a), act, s,
                      fptr(grads[a.grad_slot + 2]), fptr(grads[a.grad_slot + 3]), fptr(workspace), sm);
  mlp_grad_down_weights(kind, ctx.stream, a.shape(n), cview(dz_a), cview(cond_a), fptr(grads[a.grad_slot + 0]),
                        fptr(grads[a.grad_slot + 1]), fptr(workspace), sm);
  buffers.check();

  std::vector<at::Tensor> result{d_inp};
  result.insert(result.end(), grads.begin(), grads.end());
  return result;
}

}  // namespace madx
