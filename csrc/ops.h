// The four launchers of the madx_fast kernel contract (madx_fast/kernels/__init__.py) on torch tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace madx {

// (y [N, H], z [N, d]) with z = W_down x + b_down and y = r + scaling * (W_up act(z) + b_up);
// residual = nullopt means r = x.
std::tuple<at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                   const at::Tensor& w_down, const at::Tensor& b_down,
                                                   const at::Tensor& w_up, const at::Tensor& b_up, double scaling,
                                                   int64_t activation);

// (dx, dw_down, db_down, dw_up, db_up); weight gradients float32; dx includes dy when residual_is_input.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down, const at::Tensor& w_up,
    double scaling, int64_t activation, bool residual_is_input);

// NICE coupling (inverse = false) or its inverse; weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2).
at::Tensor nice_coupling(const at::Tensor& x, const std::vector<at::Tensor>& weights, int64_t activation,
                         bool inverse);

// [d_inp, df_w1, df_b1, df_w2, df_b2, dg_w1, dg_b1, dg_w2, dg_b2]; inp = nullopt rebuilds the input from out.
std::vector<at::Tensor> nice_coupling_backward(const at::Tensor& dout, const at::Tensor& out,
                                               const std::optional<at::Tensor>& inp,
                                               const std::vector<at::Tensor>& weights, int64_t activation,
                                               bool inverse);

}  // namespace madx
